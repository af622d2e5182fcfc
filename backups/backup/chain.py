"""Incremental chains: which backup an incremental builds on, or why it must be a full.

A push backup creates a libvirt checkpoint (a persistent dirty bitmap in each qcow2 disk);
the next push copies only blocks dirtied since then, into a qcow2 whose backing file is the
parent backup's image by a relative path — an ordinary qcow2 chain. Anything that makes that
chain doubtful (lost checkpoint, missing bitmap, changed disks, parent gone or corrupt, the
policy's ``full_every``) falls back to a full backup, with the reason recorded on the run.
Checkpoints are ours only when named ``vmbackup-<site>-<run id>`` with this installation's
id (or, from versions before it, ``vmbackup-<run id>`` recorded on one of our backups); no
other is ever deleted.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

from .. import hypervisor
from ..archive import ArchiveError
from ..archive import check as archive_check
from ..models import Backup, Compression, Kind, Method, VerifyStatus

CHECKPOINT_PREFIX = "vmbackup-"


def checkpoint_name(site_id: str, run_id: int) -> str:
    return f"{CHECKPOINT_PREFIX}{site_id}-{run_id}"


def is_ours(name: str, site_id: str, recorded: set[str] = frozenset()) -> bool:
    """This installation's checkpoint, or an older unnamed-site one our database recorded."""
    mine = f"{CHECKPOINT_PREFIX}{site_id}-"
    if name.startswith(mine):
        return name[len(mine) :].isdigit()
    legacy = name.startswith(CHECKPOINT_PREFIX) and name[len(CHECKPOINT_PREFIX) :].isdigit()
    return legacy and name in recorded


def recorded_checkpoints(vm) -> set[str]:
    return set(vm.backups.exclude(checkpoint="").values_list("checkpoint", flat=True))


@dataclass(frozen=True)
class Plan:
    kind: str
    reason: str
    parent: Backup | None = None

    @property
    def incremental(self) -> bool:
        return self.kind == Kind.INCREMENTAL


def _full(reason: str) -> Plan:
    return Plan(Kind.FULL, reason)


def chain_length(backup: Backup) -> int:
    """Incrementals between ``backup`` and its full (0 for a full)."""
    length, node = 0, backup
    while node.parent_id is not None:
        length += 1
        node = node.parent
    return length


def plan(
    vm, policy, hv: hypervisor.Session, disks: list[hypervisor.DiskInfo], directory: Path
) -> Plan:
    """Decide full or incremental for a push backup of ``disks`` (pre-flight, read-only).

    Chains never cross policies or directories: the parent is the newest backup made under
    the same policy into the same ``<root>/<vm>/`` directory (the backing path is relative),
    so one policy's retention never folds or deletes what another's chain needs.
    """
    siblings = vm.backups.published().filter(policy=policy).order_by("-created_at", "-id")
    parent = next((b for b in siblings if Path(b.path).parent == directory), None)
    if parent is None:
        return _full("first backup of this VM here" + (f" under {policy}" if policy else ""))
    if parent.method != Method.PUSH or not parent.checkpoint:
        return _full("the last backup has no checkpoint (not a push backup)")
    broken = _broken_ancestor(parent)
    if broken:
        return _full(broken)
    if not Path(parent.path, "backup.json").is_file():
        return _full("the last backup's directory is missing")
    full_every = policy.full_every if policy else 7
    if chain_length(parent) + 1 > full_every:
        return _full(f"full_every={full_every} reached")
    reason = _disks_changed(parent, disks)
    if reason:
        return _full(reason)
    reason = _checkpoint_problem(vm, parent, hv, disks)
    if reason:
        return _full(reason)
    if policy and policy.compression != Compression.NONE:
        reason = _chain_problem(parent)
        if reason:
            return _full(reason)
    return Plan(Kind.INCREMENTAL, f"changes since {parent.checkpoint}", parent)


def _broken_ancestor(parent: Backup) -> str | None:
    """A corrupt or missing backup anywhere up the chain makes it unrestorable."""
    node, depth = parent, 0
    while node is not None:
        if node.verify_status in (VerifyStatus.CORRUPT, VerifyStatus.MISSING):
            what = (
                "the last backup" if depth == 0 else f"an earlier backup of the chain ({node.pk})"
            )
            return f"{what} is {node.verify_status}"
        node, depth = node.parent, depth + 1
    return None


def _disks_changed(parent: Backup, disks: list[hypervisor.DiskInfo]) -> str | None:
    before = {d["target"]: d for d in parent.manifest.get("disks", [])}
    now = {d.target: d for d in disks}
    if set(now) - set(before):
        return "disk added: " + ", ".join(sorted(set(now) - set(before)))
    if set(before) - set(now):
        return "disk removed: " + ", ".join(sorted(set(before) - set(now)))
    for target, disk in now.items():
        if (disk.capacity or 0) != before[target]["virtual_size"]:
            return f"disk {target} resized"
        if disk.source != before[target]["source"]:
            return f"disk {target} now has another source"
    return None


def _checkpoint_problem(vm, parent: Backup, hv, disks) -> str | None:
    """Is the parent's checkpoint known to libvirt, with a consistent bitmap on each disk?

    A running QEMU holds its bitmaps in memory (the qcow2 file shows them only after
    close), so the check asks libvirt: a size query needs every bitmap to be present.
    """
    uuid = str(vm.uuid)
    if parent.checkpoint not in hv.checkpoints(uuid):
        if not parent.checkpoint_xml:
            return f"checkpoint {parent.checkpoint} lost and not stored"
        try:
            hv.redefine_checkpoint(uuid, parent.checkpoint_xml)
        except hypervisor.HypervisorError as exc:
            return f"checkpoint {parent.checkpoint} lost and could not be redefined: {exc}"
    try:
        hv.checkpoint_changed_bytes(uuid, parent.checkpoint)
    except hypervisor.HypervisorError as exc:
        return f"checkpoint {parent.checkpoint} unusable: {exc}"
    return None


def _chain_problem(parent: Backup) -> str | None:
    """A compressed incremental is re-written by ``qemu-img convert -B``, which opens the
    parent's whole chain: every backup of it must be plain, listed and covered, and every
    image header must name only what its manifest says (``archive`` structure check, no
    data read), before qemu-img may open it."""
    try:
        dirs = archive_check.chain_dirs(parent.path)
    except (ArchiveError, OSError) as exc:
        return f"the last backup's chain cannot be read: {exc}"
    for directory in dirs:
        errors = archive_check.structure(directory).errors
        if errors:
            return f"backup {directory.name} of the chain failed its header check: {errors[0]}"
    return None


def relative_backing(parent: Backup, file: str) -> str:
    return f"../{os.path.basename(parent.path)}/{file}"


def needed_checkpoints(vm) -> set[str]:
    """The checkpoint of the newest backup of each chain (per policy and directory): the
    only ones a next incremental can build on."""
    newest: dict[tuple, Backup] = {}
    for backup in vm.backups.published().order_by("created_at", "id"):
        newest[(backup.policy_id, str(Path(backup.path).parent))] = backup
    return {b.checkpoint for b in newest.values() if b.checkpoint}


def drop_old_checkpoints(
    hv: hypervisor.Session, uuid: str, keep: set[str], site_id: str, recorded: set[str]
) -> list[str]:
    """Delete our checkpoints not in ``keep``: each bitmap costs every guest write."""
    dropped = []
    for name in hv.checkpoints(uuid):
        if is_ours(name, site_id, recorded) and name not in keep:
            with contextlib.suppress(hypervisor.HypervisorError):
                hv.delete_checkpoint(uuid, name)
                dropped.append(name)
    return dropped
