"""Disaster recovery: a repository's vmbackup snapshots listed into this installation's
database (``vmbackup_offsite import``), so they restore like any other backup — with only
the repository's URL and its password, on a fresh install.

A snapshot is untrusted input, like a backup directory found on disk: its tags only choose
what to read; its ``backup.json`` (``restic dump``) is parsed and validated as a manifest
read from disk, and must agree with the tags (VM UUID, kind, parent, run), with its
SHA256SUMS and with its listing (exactly the files SHA256SUMS lists plus SHA256SUMS, each
image of the size the manifest says — what a copy checks after sending). A snapshot that
fails is skipped with the reason; the rest are imported. Nothing is restored here: the
data is read (and checked against SHA256SUMS) by the restore that uses it.

Rows made: the repository (found by its URL, else created); each VM by UUID (a row this
installation has is used, else one marked ``offsite_only`` and gone from ``host``); each
backup (``offsite_only``, ``pruned_at`` = now: no directory here; ``path`` is where it
would be under ``VMBACKUP_ROOT``), its parent linked; and a succeeded ``OffsiteCopy`` with
the snapshot id. Snapshots already recorded are skipped: importing again adds what is new.
"""

from __future__ import annotations

import uuid as uuidlib
from dataclasses import dataclass, field
from pathlib import Path

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import transaction
from django.utils import timezone

from .. import archive, restic
from ..archive.format import BACKUP_RE, MANIFEST, SUMS, Manifest
from ..archive.store import coverage_problems
from ..models import (
    Backup,
    Consistency,
    CopyTrigger,
    Host,
    OffsiteCopy,
    OffsiteRepository,
    RunStatus,
    VirtualMachine,
)
from . import TAG, OffsiteError, decode, files_to_send, listing_problems, restic_repository


@dataclass
class Imported:
    repository: OffsiteRepository
    snapshots: int = 0  # vmbackup snapshots in the repository
    known: int = 0  # recorded here before
    vms: list[str] = field(default_factory=list)  # VM rows made (offsite only)
    backups: list[Backup] = field(default_factory=list)  # backup rows made
    copies: int = 0  # copy rows made (a backup known here already gets one too)
    skipped: list[str] = field(default_factory=list)  # what was not imported, and why

    def summary(self) -> str:
        return (
            f"imported {len(self.backups)} backups of {len(self.vms)} new VMs from "
            f"{self.repository.name} ({self.copies} snapshots recorded, {self.known} known "
            f"before, {len(self.skipped)} skipped)"
        )


@dataclass(frozen=True)
class Found:
    """One snapshot, read and checked: what its backup row is made of."""

    snapshot: restic.Snapshot
    name: str
    manifest: Manifest
    size: int


def import_repository(url: str, password_file: str, *, host: Host, name: str = "") -> Imported:
    """List every vmbackup snapshot of the repository at ``url`` not recorded yet into the
    database; VMs unknown here are placed on ``host``. Raises ``OffsiteError`` when the
    repository cannot be opened."""
    model = _repository(url, password_file, name)
    repo = restic_repository(model)
    try:  # before the row is saved: a mistyped URL or password leaves nothing behind
        found = restic.probe(repo)
    except restic.ResticError as exc:
        raise OffsiteError(str(exc)) from exc
    if not found.ok:
        raise OffsiteError(found.message)
    model.save()
    model.record_probe(found.state, found.message)
    result = Imported(model)
    try:
        snapshots = restic.snapshots(repo, [TAG], timeout=settings.Q_TIMEOUT)
    except restic.ResticError as exc:
        raise OffsiteError(str(exc)) from exc
    recorded = set(
        OffsiteCopy.objects.filter(repository=model).values_list("snapshot_id", flat=True)
    )
    result.snapshots = len(snapshots)
    fresh = []
    for snap in snapshots:
        if snap.id in recorded:
            result.known += 1
            continue
        try:
            fresh.append(read(repo, snap))
        except (restic.ResticError, archive.ArchiveError, OffsiteError, ValueError) as exc:
            result.skipped.append(f"snapshot {snap.short_id}: {exc}")
    # parents first: a parent is older, and within a second its run id is smaller
    for item in sorted(
        fresh, key=lambda f: (f.manifest.vm_uuid, f.snapshot.time, f.manifest.run_id)
    ):
        try:
            with transaction.atomic():
                _record(item, model, host, result)
        except OffsiteError as exc:
            result.skipped.append(f"snapshot {item.snapshot.short_id} ({item.name}): {exc}")
    return result


def read(repo: restic.Repository, snap: restic.Snapshot) -> Found:
    """The snapshot's manifest and sums, checked against its tags and its listing."""
    name = snap.tag("backup") or ""
    if not BACKUP_RE.match(name):
        raise OffsiteError(f"its backup= tag {name!r} does not name a backup directory")
    nodes = restic.ls(repo, snap.id, timeout=settings.Q_TIMEOUT)
    manifest = Manifest.from_json(restic.dump(repo, snap.id, f"/{name}/{MANIFEST}"))
    sums = archive.parse_sums(restic.dump(repo, snap.id, f"/{name}/{SUMS}").decode())
    problems = _disagreements(snap, name, manifest)
    files_to_send(manifest, sums)  # a name the manifest does not explain: refused
    listed = {
        node.path.removeprefix(f"/{name}/"): node.size for node in nodes if node.type == "file"
    }
    sizes = {rel: listed.get(rel, -1) for rel in [*sums, SUMS]}
    problems += coverage_problems(manifest, sums)
    problems += listing_problems(nodes, name, sizes, manifest)
    if problems:
        raise OffsiteError("; ".join(problems[:5]))
    return Found(snap, name, manifest, sum(sizes.values()))


def _disagreements(snap: restic.Snapshot, name: str, manifest: Manifest) -> list[str]:
    uuidlib.UUID(manifest.vm_uuid)  # ValueError: not a VM's UUID
    tags = {
        "uuid": (snap.tag("uuid"), manifest.vm_uuid),
        "kind": (snap.tag("kind"), manifest.kind),
        "parent": (snap.tag("parent"), manifest.parent),
        "run": (snap.tag("run"), str(manifest.run_id)),
    }
    problems = [
        f"its {key}= tag says {tag!r}, its {MANIFEST} {value!r}"
        for key, (tag, value) in tags.items()
        if tag != value
    ]
    if not name.endswith(f"-{manifest.run_id}"):
        problems.append(f"{name} is not the directory of run {manifest.run_id}")
    return problems


def _repository(url: str, password_file: str, name: str) -> OffsiteRepository:
    """The row for ``url`` (its password file updated to the one given), else a new one;
    checked, not saved."""
    model = OffsiteRepository.objects.filter(url=url).first()
    if model is None:
        model = OffsiteRepository(url=url, name=name or _free_name())
    elif name and name != model.name:
        raise OffsiteError(f"{url} is recorded here already, as {model.name}")
    model.password_file = password_file
    try:
        model.full_clean()
    except ValidationError as exc:
        words = "; ".join(f"{k}: {' '.join(v)}" for k, v in exc.message_dict.items())
        raise OffsiteError(words) from exc
    return model


def _free_name() -> str:
    taken = set(OffsiteRepository.objects.values_list("name", flat=True))
    return next(n for n in ("offsite", *(f"offsite-{i}" for i in range(2, 1000))) if n not in taken)


def _record(item: Found, model: OffsiteRepository, host: Host, result: Imported) -> None:
    now = timezone.now()
    manifest = item.manifest
    vm = _vm(item, host, result)
    backup = Backup.objects.filter(vm=vm, path__endswith=f"/{item.name}").first()
    if backup is None:
        backup = _backup(item, vm, now)
        result.backups.append(backup)
    OffsiteCopy.objects.create(
        backup=backup,
        repository=model,
        trigger=CopyTrigger.IMPORT,
        status=RunStatus.SUCCEEDED,
        snapshot_id=item.snapshot.id,
        created_at=now,
        started_at=now,
        finished_at=now,
        verified_at=now,  # its listing matched its manifest just now
        bytes_total=item.size,
        journal=[
            {
                "at": now.isoformat(),
                "step": "imported",
                "snapshot": item.snapshot.id,
                "site": item.snapshot.tag("site") or "",
                "vm": decode(item.snapshot.tag("vm") or manifest.vm_name),
            }
        ],
    )
    result.copies += 1


def _vm(item: Found, host: Host, result: Imported) -> VirtualMachine:
    manifest, when = item.manifest, item.snapshot.time
    known = VirtualMachine.objects.filter(uuid=manifest.vm_uuid)
    vm = known.filter(host=host).first() or known.first()
    if vm is None:
        vm = VirtualMachine.objects.create(
            host=host,
            uuid=manifest.vm_uuid,
            name=manifest.vm_name,
            offsite_only=True,
            first_seen_at=when,
            last_seen_at=when,
            gone_at=timezone.now(),
        )
        result.vms.append(manifest.vm_name)
    elif vm.offsite_only and when > vm.last_seen_at:  # named as its newest backup names it
        vm.name, vm.last_seen_at = manifest.vm_name, when
        vm.save(update_fields=["name", "last_seen_at"])
    return vm


def _backup(item: Found, vm: VirtualMachine, now) -> Backup:
    manifest = item.manifest
    parent = None
    if manifest.parent:
        parent = Backup.objects.filter(vm=vm, path__endswith=f"/{manifest.parent}").first()
        if parent is None:
            raise OffsiteError(
                f"it builds on {manifest.parent}, which is neither here nor in the repository"
            )
    path = str(Path(settings.VMBACKUP_ROOT) / manifest.vm_name / item.name)
    if Backup.objects.filter(path=path).exists():
        raise OffsiteError(f"another backup is recorded at {path}")
    consistency = manifest.consistency if manifest.consistency in Consistency.values else ""
    return Backup.objects.create(
        vm=vm,
        path=path,
        created_at=item.snapshot.time,
        kind=manifest.kind,
        parent=parent,
        method=manifest.method[:16],
        consistency=consistency,
        size_bytes=item.size,
        manifest=manifest.to_dict(),
        pruned_at=now,
        offsite_only=True,
    )
