"""Restores: a dead one repaired by its mode (or handed to a worker), a lost one expired."""

from __future__ import annotations

import os
import shutil
import socket
from datetime import timedelta
from pathlib import Path

from django.conf import settings
from django.utils import timezone

from .. import hypervisor, requests, worker
from ..models import Restore, RestoreMode, RunStatus
from ..restore import disk as disk_restore
from ..restore import from_offsite, in_place, instant, new_domain, rules
from .report import Report


def repair_restores(report: Report, stale_after: int, mine: dict) -> None:
    """A dead restore: interrupted, what its journal says it left half-made undone. Files
    are only touched by a reconcile on the machine the restore ran on (another machine's
    restore stays running, reported, until its own reconcile gets to it, or for a day); a
    directory already renamed into place is left alone and named in the error: it may hold
    the only copy someone is about to use."""
    _expire_queued_restores(report)
    for restore_id in list(
        Restore.objects.filter(status=RunStatus.RUNNING, **mine).values_list("pk", flat=True)
    ):
        restore = Restore.objects.select_related("vm__host").get(pk=restore_id)
        if restore.status != RunStatus.RUNNING or not worker.is_dead(restore, stale_after):
            continue
        if restore.worker.rpartition(":")[0] != socket.gethostname():
            beat = restore.heartbeat_at or restore.started_at
            if beat and beat > timezone.now() - timedelta(days=1):
                report.errors.append(
                    f"restore {restore.pk}: its worker {restore.worker} stopped answering; "
                    "the reconcile on that machine repairs it"
                )
                continue
            _end_restore(
                restore,
                f"interrupted: its worker {restore.worker} never came back; check its "
                "files there by hand (see the journal)",
                report,
            )
            continue
        try:
            if restore.mode == RestoreMode.IN_PLACE:
                error = _repair_in_place(restore)
            elif restore.mode == RestoreMode.INSTANT:
                error = _repair_instant(restore, report)
            elif restore.mode == RestoreMode.DISK:
                error = disk_restore.repair_dead(restore)
            else:
                error = _repair_new_domain(restore, report)
            if restore.repository_id and from_offsite.discard(restore):
                report.partials.append(str(from_offsite.staging_path(restore)))
        except Exception as exc:  # one bad restore must not stop the rest of reconcile
            report.errors.append(f"restore {restore.pk}: {exc}")
            continue
        if error is not None:
            _end_restore(restore, error, report)


def _repair_in_place(restore: Restore) -> str | None:
    """Undo a dead in-place restore's half switch, but never under a running VM: a VM
    started meanwhile (autostart after a host crash) keeps its files until it is shut off,
    and the restore stays running (so no backup reads the mixed disks) until then."""
    steps = {s.get("step") for s in restore.journal if isinstance(s, dict)}
    uuid = str(restore.vm.uuid)
    with hypervisor.session(restore.vm.host.uri) as hv:
        if "switched" in steps:
            if "genid" not in steps and hv.exists(uuid):
                notes: list[str] = []
                in_place.renew_generation_id(hv, uuid, notes)
        elif "swap" in steps and "undone" not in steps and hv.exists(uuid):
            state = hv.domain(uuid).state
            if state != "shutoff" or hv.has_managed_save(uuid):
                raise RuntimeError(
                    f"{restore.vm.name} was started in the middle of an in-place restore "
                    "(its disks are mixed); shut it down and reconcile puts the old ones back"
                )
    return in_place.repair_dead(restore)


def _repair_instant(restore: Restore, report: Report) -> str | None:
    """A dead instant restore whose domain exists is queued again: a worker finds the block
    copies QEMU kept running (or starts them again) and finishes the move — the domain is
    in use. Otherwise (nothing defined yet, the domain gone, or a cancel was asked) its
    domain and files are removed and the backup made private again."""
    with hypervisor.session(restore.vm.host.uri) as hv:
        if instant.needs_worker(restore, hv):
            restore.log("requeued", reason="the worker died; another one takes the move over")
            if restore.requeue():
                requests.enqueue_restore(restore)
                report.restores_resumed.append(restore.pk)
            return None
        return instant.discard(restore, hv)


def _repair_new_domain(restore: Restore, report: Report) -> str:
    steps = {s.get("step"): s for s in restore.journal if isinstance(s, dict)}
    defined = steps.get("define", {}).get("uuid", "")
    if defined:
        with hypervisor.session(restore.vm.host.uri) as hv:
            if hv.exists(defined):
                return (
                    f"interrupted after defining domain {restore.name} ({defined}): "
                    "check it before using or removing it"
                )
    error = "interrupted: the worker died"
    final = Path(os.path.abspath(restore.root)) / restore.name
    kept = "publish" in steps and final.is_dir()
    if os.path.abspath(restore.root) in rules.allowed_roots():
        for staging in new_domain.staging_paths(restore):
            if staging.is_dir() and not staging.is_symlink():
                shutil.rmtree(staging, ignore_errors=True)
                report.partials.append(str(staging))
    tpm = Path(steps.get("tpm", {}).get("path", ""))
    ours = tpm.parent == Path(settings.VMBACKUP_SWTPM_DIR) and tpm.is_dir() and not tpm.is_symlink()
    if kept:
        error += f"; files left in {final}" + (f" and TPM state in {tpm}" if ours else "")
        error += ", no domain defined"
    elif ours:
        shutil.rmtree(tpm, ignore_errors=True)  # named by the UUID no domain ever got
    return error


def _expire_queued_restores(report: Report, after: timedelta = timedelta(days=1)) -> None:
    """A restore no worker picked up in a day (a lost task) stops holding its name and the
    VM's chains (pruning waits for active restores)."""
    stale = Restore.objects.filter(
        status=RunStatus.QUEUED, created_at__lt=timezone.now() - after
    ).values_list("pk", flat=True)
    for restore_id in list(stale):
        restore = Restore.objects.get(pk=restore_id)
        if restore.mode == RestoreMode.INSTANT and restore.journal:
            continue  # handed over: its domain may run on the backup, it stays pinned
        error = "never picked up by a worker; request it again"
        if restore.mark_interrupted(error, only=(RunStatus.QUEUED,)):
            report.restores_interrupted.append(restore_id)


def _end_restore(restore: Restore, error: str, report: Report) -> None:
    if restore.mark_interrupted(error, only=(RunStatus.RUNNING,)):
        report.restores_interrupted.append(restore.pk)
