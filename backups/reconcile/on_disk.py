"""Under the backup roots of this machine: partial directories and folds a dead job left."""

from __future__ import annotations

import os
from pathlib import Path

from .. import archive, roots
from ..models import BackupRun
from ..retention import fold
from .report import Report
from .runs import active_run_ids, still_active


def local_roots() -> set[str]:
    """The configured roots that exist here (a root on another machine is not mounted)."""
    return {r for r in roots.configured() if os.path.isdir(r)}


def remove_orphan_partials(me: str, report: Report) -> list[str]:
    """Our partial directories that no active run is writing; returns another
    installation's (left alone)."""
    active = active_run_ids()
    foreign = []
    for root in local_roots():
        for partial in archive.list_partials(root):
            owner = archive.partial_owner(partial)
            if owner is None:
                continue  # not named like a backup's staging directory: not ours to judge
            made_by, run_id = owner
            if made_by != me and not (made_by is None and _staged_by_us(run_id, partial)):
                foreign.append(f"{partial}: a backup in progress of another installation")
                continue
            if run_id in active or still_active(run_id):
                continue
            try:
                archive.discard(partial, root)
                report.partials.append(str(partial))
            except archive.ArchiveError as exc:
                report.errors.append(str(exc))
    report.foreign += foreign
    return foreign


def _staged_by_us(run_id: int, partial: Path) -> bool:
    return BackupRun.objects.filter(pk=run_id, staging_path=str(partial)).exists()


def repair_folds(me: str, report: Report) -> list[str]:
    """Folds a killed prune left half-done: finished when their rewritten images are
    complete and recorded, undone otherwise (see ``fold``); a fold still running, or one
    of another installation, is left."""
    foreign = []
    for root in local_roots():
        for vm_dir in sorted(Path(root).iterdir()):
            if vm_dir.name.startswith(".") or vm_dir.is_symlink() or not vm_dir.is_dir():
                continue
            for journal in fold.journals(vm_dir):
                try:
                    done = fold.recover(journal, me)
                except fold.Foreign as exc:
                    foreign.append(str(exc))
                    continue
                except (fold.FoldError, archive.ArchiveError, OSError) as exc:
                    report.errors.append(str(exc))
                    continue
                if done:
                    report.folds.append(f"{vm_dir.name}: {done}")
    report.foreign += foreign
    return foreign
