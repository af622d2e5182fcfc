"""Apply a retention policy to one VM's backups without ever breaking a kept chain.

The decisions come from the pure ``retention`` module; this module does the I/O: a pruned
backup that a kept incremental depends on is first folded into that incremental (``fold``:
verified first, written beside, switched by rename, journaled), and only then is the pruned
directory deleted. Nothing is rewritten or deleted that was not checked just before: a fold
needs the whole chain it reads to verify (SHA-256, headers against the manifest), and a
deletion needs the directory to be the row's backup that nothing kept still builds on.

Backups without a policy (made by "Back up now" or ``vmbackup_run`` without one, or left
by a deleted policy) follow ``VMBACKUP_KEEP_MANUAL``: the newest N of each VM are kept.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from django.conf import settings
from django.db import IntegrityError, transaction
from django.utils import timezone

from .. import archive, notify, roots, site
from ..archive import check as archive_check
from ..models import (
    ACTIVE_STATUSES,
    Backup,
    BackupPolicy,
    Drill,
    OffsiteCopy,
    PruneLock,
    Restore,
    RestoreMode,
    RunStatus,
)
from . import fold
from . import rules as retention

log = logging.getLogger(__name__)
_BACKUP_NAME = re.compile(r"^\d{8}T\d{6}Z-\d+$")


@dataclass
class Report:
    vm: str
    decisions: list[tuple[Backup, bool, str]] = field(default_factory=list)
    rebased: list[int] = field(default_factory=list)
    deleted: list[int] = field(default_factory=list)
    skipped: str = ""  # why nothing was pruned this time, if something stood in the way
    refused: list[str] = field(default_factory=list)  # folds/deletes refused, with the reason
    recovered: list[str] = field(default_factory=list)  # folds a dead prune left, finished

    def lines(self) -> list[str]:
        return [
            f"{self.vm}\t{b.created_at:%Y-%m-%d %H:%M}\t{b.pk}\t"
            f"{'keep' if keep else 'prune'}\t{reason}"
            for b, keep, reason in self.decisions
        ]


def policy_of(policy: BackupPolicy | None) -> retention.Policy:
    if policy is None:
        return retention.Policy(keep_last=settings.VMBACKUP_KEEP_MANUAL)
    return policy.retention_rules()


def prune_vm(vm, policy: BackupPolicy | None, *, dry_run: bool = False) -> Report:
    """Prune the backups ``policy`` owns (None: the VM's backups without a policy)."""
    # only this policy's own backups: a VM in two policies keeps both retentions apart
    owned = vm.backups.published().retained_by(policy).order_by("created_at", "id")
    backups = {b.pk: b for b in owned}
    points = [
        retention.Point(b.pk, b.created_at, b.parent_id, b.protected) for b in backups.values()
    ]
    plan = retention.plan(points, policy_of(policy), tz=timezone.get_current_timezone())
    report = Report(vm=vm.name)
    report.decisions = [(backups[d.point.id], d.keep, d.reason) for d in plan.decisions]
    if dry_run:
        return report
    _recover_folds(backups.values(), report)
    # A restore reading this VM's chains must not be handed a half-rebased image: checked
    # before every step (a restore that starts meanwhile notices the change and fails
    # cleanly, see restore.common.require_unchanged). The next prune catches up.
    verified: dict[str, archive_check.VerifyResult] = {}
    held: set[int] = set()  # backups a refused fold still needs: never deleted this time
    for step in plan.rebases:
        if _restore_active(vm, report):
            return report
        child = backups[step.point_id]
        problems = _chain_problems(child, verified)
        if problems:
            held |= _chain_ids(child)
            _refuse(vm, policy, child, problems, report)
            continue
        try:
            fold.fold(child, backups.get(step.new_parent_id))
        except (fold.FoldError, archive.ArchiveError, OSError) as exc:
            held |= _chain_ids(child)
            _refuse(vm, policy, child, [str(exc)], report)
            continue
        report.rebased.append(step.point_id)
    # children before their parents: a parent is deleted only once nothing builds on it
    for backup_id in sorted(plan.deletes, key=lambda i: (backups[i].created_at, i), reverse=True):
        if backup_id in held:
            continue
        if _restore_active(vm, report):
            return report
        try:
            delete(backups[backup_id])
        except archive.ArchiveError as exc:
            report.refused.append(f"backup {backup_id} not deleted: {exc}")
            continue
        report.deleted.append(backup_id)
    return report


def _recover_folds(backups, report: Report) -> None:
    """Finish or undo what a prune killed mid-fold left in these backups' directories."""
    for vm_dir in {Path(b.path).parent for b in backups}:
        for journal in fold.journals(vm_dir):
            try:
                done = fold.recover(journal, site.site_id())
            except fold.Foreign:
                continue  # reported by reconcile, never touched
            except (fold.FoldError, archive.ArchiveError, OSError) as exc:
                report.refused.append(str(exc))
                continue
            if done:
                report.recovered.append(done)


def _chain_problems(child: Backup, verified: dict) -> list[str]:
    """Verify everything a fold of ``child`` reads (its whole chain), once per prune."""
    problems = []
    for directory, result in _verify_chain(Path(child.path), verified):
        row = Backup.objects.filter(path=str(directory)).first()
        if row is not None:
            row.mark_verified(result.ok, "; ".join(result.errors))
        if not result.ok:
            problems.append(f"{directory.name}: " + "; ".join(result.errors[:5]))
    return problems


def _verify_chain(top: Path, verified: dict):
    try:
        dirs = archive_check.chain_dirs(top)
    except (archive.ArchiveError, OSError) as exc:
        return [(top, archive_check.VerifyResult(False, (str(exc),), 0, 0))]
    for directory in dirs:
        if str(directory) not in verified:
            verified[str(directory)] = archive_check.verify(directory)
    return [(directory, verified[str(directory)]) for directory in dirs]


def _chain_ids(child: Backup) -> set[int]:
    ids, node = set(), child
    while node is not None and node.pk not in ids:
        ids.add(node.pk)
        node = node.parent
    return ids


def _refuse(vm, policy, child: Backup, problems: list[str], report: Report) -> None:
    reason = (
        f"not folding into backup {child.pk} ({Path(child.path).name}): its chain failed "
        "verification, every file of it kept: " + "; ".join(problems)
    )
    report.refused.append(reason)
    log.error("%s: %s", vm.name, reason)
    notify.prune_refused(vm, policy, reason)


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
    """A restore reads this VM's chains (an instant one for as long as its domain runs on
    them: the chain is pinned, named here and on the backup's page), or an offsite copy
    reads them (it would see a fold as a change and discard its snapshot): prune stands back."""
    active = Restore.objects.filter(vm=vm, status__in=ACTIVE_STATUSES)
    pinned = sorted(active.filter(mode=RestoreMode.INSTANT).values_list("name", flat=True))
    if pinned:
        report.skipped = (
            "its backups are in use by the instantly restored domain "
            f"{', '.join(pinned)} until its data has moved"
        )
        return True
    if active.exists():
        report.skipped = "a restore of this VM is running"
        return True
    if Drill.objects.filter(vm=vm, status=RunStatus.RUNNING).exists():
        report.skipped = "a restore drill of this VM runs on its backups"
        return True
    if OffsiteCopy.objects.filter(vm=vm, status=RunStatus.RUNNING).exists():
        report.skipped = "an offsite copy of this VM is running"
        return True
    return False


def _roots() -> set[Path]:
    return {Path(os.path.realpath(r)) for r in roots.configured()}


def delete(backup: Backup) -> None:
    """Remove a published directory — only one that is what its row says (a plain
    directory named like ours, directly under a VM directory of a root, whose manifest is
    this backup's) and that no other published backup still builds on."""
    path = Path(backup.path)
    real = Path(os.path.realpath(path))
    if not _BACKUP_NAME.match(path.name) or real.parent.parent not in _roots():
        raise archive.ArchiveError(f"refusing to delete {path}: not a backup under a root")
    if os.path.lexists(path):
        if path.is_symlink() or path.parent.is_symlink() or not path.is_dir():
            raise archive.ArchiveError(f"refusing to delete {path}: not a plain directory")
        _require_own_manifest(backup, path)
        needed = Backup.objects.published().filter(parent=backup).exclude(pk=backup.pk)
        if needed.exists():
            raise archive.ArchiveError(f"refusing to delete {path}: backup {needed[0].pk} needs it")
        shutil.rmtree(path)
        archive.fsync_dir(path.parent)
    backup.pruned_at = timezone.now()
    backup.save(update_fields=["pruned_at"])


def _require_own_manifest(backup: Backup, path: Path) -> None:
    try:
        manifest = archive.read_manifest(path)
    except archive.ArchiveError:
        return  # an unreadable manifest is rot in a backup retention prunes anyway
    if manifest.vm_uuid != str(backup.vm.uuid):
        raise archive.ArchiveError(f"refusing to delete {path}: its manifest is another VM's")
