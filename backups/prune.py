"""Apply a retention policy to one VM's backups without ever breaking a kept chain.

The decisions come from the pure ``retention`` module; this module does the I/O: a pruned
backup that a kept incremental depends on is first folded into that incremental
(``qemu-img rebase`` onto the nearest kept ancestor, or onto nothing to make it a full), its
manifest and SHA256SUMS rewritten, and only then is the pruned directory deleted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from django.conf import settings
from django.db import IntegrityError, transaction
from django.utils import timezone

from . import archive, archive_check, qemu_img, retention
from .models import ACTIVE_STATUSES, Backup, BackupPolicy, Kind, PruneLock, Restore
from .roots import refusal as root_refusal

_BACKUP_NAME = re.compile(r"^\d{8}T\d{6}Z-\d+$")


@dataclass
class Report:
    vm: str
    decisions: list[tuple[Backup, bool, str]] = field(default_factory=list)
    rebased: list[int] = field(default_factory=list)
    deleted: list[int] = field(default_factory=list)
    skipped: str = ""  # why nothing was pruned this time, if something stood in the way

    def lines(self) -> list[str]:
        return [
            f"{self.vm}\t{b.created_at:%Y-%m-%d %H:%M}\t{b.pk}\t"
            f"{'keep' if keep else 'prune'}\t{reason}"
            for b, keep, reason in self.decisions
        ]


def policy_of(policy: BackupPolicy) -> retention.Policy:
    return retention.Policy(
        keep_last=policy.keep_last,
        keep_hourly=policy.keep_hourly,
        keep_daily=policy.keep_daily,
        keep_weekly=policy.keep_weekly,
        keep_monthly=policy.keep_monthly,
        keep_yearly=policy.keep_yearly,
    )


def prune_vm(vm, policy: BackupPolicy, *, dry_run: bool = False) -> Report:
    # only this policy's own backups: a VM in two policies keeps both retentions apart
    owned = vm.backups.published().filter(policy=policy).order_by("created_at", "id")
    backups = {b.pk: b for b in owned}
    points = [
        retention.Point(b.pk, b.created_at, b.parent_id, b.protected) for b in backups.values()
    ]
    plan = retention.plan(points, policy_of(policy), tz=timezone.get_current_timezone())
    report = Report(vm=vm.name)
    report.decisions = [(backups[d.point.id], d.keep, d.reason) for d in plan.decisions]
    if dry_run:
        return report
    # A restore reading this VM's chains must not be handed a half-rebased image: checked
    # before every step (a restore that starts meanwhile notices the change and fails
    # cleanly, see restoring.require_unchanged). The next prune catches up.
    for step in plan.rebases:
        if _restore_active(vm, report):
            return report
        fold(backups[step.point_id], backups.get(step.new_parent_id))
        report.rebased.append(step.point_id)
    for backup_id in plan.deletes:
        if _restore_active(vm, report):
            return report
        delete(backups[backup_id])
        report.deleted.append(backup_id)
    return report


@contextlib.contextmanager
def holding(vm, holder: str):
    """The VM for a prune outside a backup run (``vmbackup_prune``): yields False, holding
    nothing, when a backup of the VM is active; otherwise holds it until the block ends."""
    try:
        with transaction.atomic():
            lock = PruneLock.objects.create(vm=vm, holder=holder)
    except IntegrityError:
        yield False  # another prune holds it
        return
    try:
        # our marker is written; a run claimed before it is visible here, one claimed
        # after it sees the marker in its pre-flight and stands back
        yield not vm.runs.filter(status__in=ACTIVE_STATUSES).exists()
    finally:
        lock.delete()


def _restore_active(vm, report: Report) -> bool:
    if Restore.objects.filter(vm=vm, status__in=ACTIVE_STATUSES).exists():
        report.skipped = "a restore of this VM is running"
        return True
    return False


def fold(child: Backup, new_parent: Backup | None) -> None:
    """Rebase ``child``'s images onto ``new_parent`` (None: standalone) and record it."""
    manifest = archive.read_manifest(child.path)
    parent_files = (
        {d.target: d.file for d in archive.read_manifest(new_parent.path).disks}
        if new_parent
        else {}
    )
    disks = []
    for disk in manifest.disks:
        if disk.backing is None:
            disks.append(disk)
            continue
        backing = None
        if new_parent and disk.target in parent_files:
            backing = f"../{Path(new_parent.path).name}/{parent_files[disk.target]}"
        qemu_img.rebase(
            str(Path(child.path, disk.file)),
            "qcow2",
            backing,
            "qcow2" if backing else None,
            timeout=settings.Q_TIMEOUT,
        )
        disks.append(
            dataclasses.replace(disk, backing=backing, backing_format="qcow2" if backing else None)
        )
    manifest = dataclasses.replace(
        manifest,
        disks=tuple(disks),
        parent=Path(new_parent.path).name if new_parent else None,
        kind=Kind.INCREMENTAL if new_parent else Kind.FULL,
    )
    archive_check.update_after_rebase(child.path, manifest)
    child.parent = new_parent
    child.kind = manifest.kind
    child.manifest = json.loads(archive.read_manifest(child.path).to_json())
    child.save(update_fields=["parent", "kind", "manifest"])


def _roots() -> set[Path]:
    roots = {settings.VMBACKUP_ROOT, *BackupPolicy.objects.values_list("destination", flat=True)}
    return {Path(os.path.realpath(r)) for r in roots if r and not root_refusal(r)}


def delete(backup: Backup) -> None:
    """Remove a published directory — only one that looks exactly like ours under a root."""
    path = Path(backup.path)
    real = Path(os.path.realpath(path))
    if not _BACKUP_NAME.match(path.name) or real.parent.parent not in _roots():
        raise archive.ArchiveError(f"refusing to delete {path}: not a backup under a root")
    if real.exists():
        shutil.rmtree(real)
    backup.pruned_at = timezone.now()
    backup.save(update_fields=["pruned_at"])
