"""Backup runs: a dead one undone from its journal, an ended one's guest thawed or started."""

from __future__ import annotations

import contextlib
import os
import shutil
from datetime import timedelta
from pathlib import Path

from django.conf import settings
from django.utils import timezone

from .. import archive, hypervisor, notify, site
from ..backup import methods
from ..models import BackupRun, RunStatus
from ..roots import refusal as root_refusal
from .report import Report


def _unmatched(steps: list[str], begin: str, end: str) -> bool:
    return steps.count(begin) > steps.count(end)


def repair_finished(report: Report, stale_after: int, mine: dict) -> None:
    """Runs that ended (failed, refused, cancelled, interrupted) with a guest still frozen
    or shut down by us: thaw or start it, once, within a window after the run ended."""
    since = timezone.now() - timedelta(seconds=max(stale_after, 60) * 12)
    ended = BackupRun.objects.filter(
        status__in=[RunStatus.FAILED, RunStatus.CANCELLED, RunStatus.INTERRUPTED],
        finished_at__gte=since,
        **mine,
    ).select_related("vm__host")
    for run in ended:
        steps = [s.get("step") for s in _journal_steps(run)]
        thaw = _unmatched(steps, "freeze", "thaw") and "repaired-thaw" not in steps
        restart = "shutdown" in steps and not {"restart", "repaired-restart"} & set(steps)
        if not (thaw or restart) or run.vm.runs.active().exists():
            continue
        try:
            with hypervisor.session(run.vm.host.uri) as hv:
                uuid = str(run.vm.uuid)
                if thaw:
                    hv.thaw(uuid)
                    run.log("repaired-thaw")
                    report.thawed.append(run.vm.name)
                if restart and hv.domain(uuid).state == "shutoff":
                    hv.start(uuid)
                    run.log("repaired-restart")
                    report.restarted.append(run.vm.name)
        except hypervisor.HypervisorError as exc:
            report.errors.append(f"run {run.pk}: {exc}")


def _journal_steps(run: BackupRun) -> list[dict]:
    return [entry for entry in run.journal if isinstance(entry, dict)]


def repair_run(run: BackupRun, report: Report) -> None:
    """Undo what the journal says the run did, then mark it interrupted."""
    uuid = str(run.vm.uuid)
    steps = _journal_steps(run)
    names = [s.get("step") for s in steps]
    try:
        with hypervisor.session(run.vm.host.uri) as hv:
            if "backup-begin" in names and run.staging_path:
                targets = hv.backup_job_targets(uuid)
                if any(t.startswith(run.staging_path + os.sep) for t in targets):
                    hv.abort_job(uuid)
                    report.jobs_aborted.append(run.vm.name)
            for step in steps:
                if step.get("step") == "snapshot":
                    methods.commit_overlays(hv, uuid, step.get("overlays", {}), run.log)
                    report.overlays.extend(step.get("overlays", {}).values())
            if "shutdown" in names and "restart" not in names:
                if hv.domain(uuid).state == "shutoff":
                    hv.start(uuid)
                    run.log("repaired-restart")
                    report.restarted.append(run.vm.name)
            if _unmatched(names, "freeze", "thaw"):
                with contextlib.suppress(hypervisor.HypervisorError):
                    hv.thaw(uuid)
                    run.log("repaired-thaw")
                    report.thawed.append(run.vm.name)
    except (hypervisor.HypervisorError, methods.MethodError) as exc:
        report.errors.append(f"run {run.pk}: {exc}")
    _remove_socket_dirs(run, steps)
    if run.staging_path and os.path.isdir(run.staging_path):
        try:
            archive.discard(Path(run.staging_path), _root_of(run))
            report.partials.append(run.staging_path)
        except archive.ArchiveError as exc:
            report.errors.append(f"run {run.pk}: {exc}")
    run.log("reconcile", errors=report.errors)
    if run.mark_interrupted("worker stopped during the run (repaired by reconcile)"):
        notify.run_finished(run)
    report.interrupted.append(run.pk)


def _remove_socket_dirs(run: BackupRun, steps: list[dict]) -> None:
    """A pull backup's socket directory (``<pull dir>/<site>-<run>``), left when the worker
    died mid-copy; only a directory of that name, which this run made, is removed."""
    for step in steps:
        socket_path = step.get("socket") if step.get("step") == "backup-begin" else None
        if isinstance(socket_path, str) and os.path.isabs(socket_path):
            directory = os.path.dirname(socket_path)
            if os.path.basename(directory) == f"{site.site_id()}-{run.pk}":
                shutil.rmtree(directory, ignore_errors=True)


def _root_of(run: BackupRun) -> str:
    return settings.VMBACKUP_ROOT if root_refusal(run.root) else run.root  # only our roots


def still_active(run_id: int) -> bool:
    """Asked again right before acting: a run may have started since the first look."""
    return BackupRun.objects.active().filter(pk=run_id).exists()


def active_run_ids() -> set[int]:
    return set(BackupRun.objects.active().values_list("pk", flat=True))
