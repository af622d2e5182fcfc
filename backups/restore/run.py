"""The one dispatcher of restores: run a claimed restore of any kind (``new_domain``,
``in_place``, ``instant``, ``disk``; drills go beside them), with one heartbeat, one failure
path (undo what was made, record the outcome as data) and one cancel rule."""

from __future__ import annotations

import contextlib
import logging
import shutil
from pathlib import Path

from .. import hypervisor, worker
from ..interrupt import Stopped, WorkerStopped
from ..models import Restore, RestoreMode, RunStatus
from . import disk, from_offsite, in_place, instant, new_domain
from .common import Progress, RestoreCancelled
from .rules import RestoreError

log = logging.getLogger(__name__)


def run(restore_id: int) -> str:
    """Claim a queued restore and run it to its end: the worker's task
    (``jobs.run_restore``) and ``vmbackup_restore --wait``. A second delivery finds
    nothing to claim."""
    if worker.stopping():
        return worker.STOPPING
    if not Restore.claim(restore_id, worker.worker_id()):
        return "not claimed"
    claimed = Restore.objects.select_related("backup__vm__host").get(pk=restore_id)
    try:
        return execute(claimed)
    except WorkerStopped as exc:
        return f"interrupted: {exc}"


def execute(restore: Restore) -> str:
    """Run a claimed restore to its end; returns a one-line outcome for django-q2."""
    with worker.Heartbeat(restore.pk, worker.heartbeat_every(), Restore):
        return _execute(restore)


def _execute(restore: Restore) -> str:
    progress = Progress(restore)
    created: list[Path] = []  # removed again unless the restore succeeds
    defined: list[str] = []  # new domains, undefined again on failure
    swaps: list[tuple[str, str]] = []  # in place: (disk path, kept original), put back
    fetched: list[Path] = []  # from offsite: the staging directory, removed in any case
    try:
        return _attempt(restore, progress, created, defined, swaps, fetched)
    finally:
        _undo(restore, fetched, [])


def _attempt(restore, progress, created, defined, swaps, fetched) -> str:
    try:
        with hypervisor.session(restore.backup.vm.host.uri) as hv:
            in_place_mode = restore.mode == RestoreMode.IN_PLACE
            backup_dir = None
            if restore.repository_id:  # refuse what can be refused before fetching GBs
                (in_place if in_place_mode else new_domain).refusals(restore, hv)
                backup_dir = from_offsite.fetch(restore, progress, fetched)
            if in_place_mode:
                result = in_place.restore(restore, hv, progress, created, swaps, backup_dir)
            elif restore.mode == RestoreMode.INSTANT:
                result = instant.restore(restore, hv, progress, created, defined)
            elif restore.mode == RestoreMode.DISK:  # a file; no domain is defined
                result = disk.restore(restore, progress, created)
            else:
                result = new_domain.restore(restore, hv, progress, created, defined, backup_dir)
        created.clear()
        _finish(restore, RunStatus.SUCCEEDED)
        return result
    except RestoreCancelled as exc:
        _undo(restore, created, defined)
        _finish(restore, RunStatus.CANCELLED, str(exc))
        return "cancelled"
    # every failure is recorded as data on the restore; so is a stop of the command running
    # it (vmbackup_restore --wait), then raised again
    except (Exception, Stopped) as exc:
        if isinstance(exc, Stopped) and restore.mode == RestoreMode.INSTANT:
            if instant.left_running(restore):  # still running: reconcile hands it over
                log.warning("restore %s: %s; its domain runs on", restore.pk, exc)
                raise
        if isinstance(exc, Stopped):
            log.warning("restore %s: %s", restore.pk, exc)
        else:
            log.exception("restore %s failed", restore.pk)
        reason = str(exc) or exc.__class__.__name__
        if isinstance(exc, RestoreError) and restore.repository_id and "offsite" not in reason:
            reason += f" (fetched from offsite repository {restore.repository.name})"
        if isinstance(exc, OSError) and exc.errno == 28:
            reason = f"destination full (no space left on device): {reason}"
        steps = {entry.get("step") for entry in restore.journal if isinstance(entry, dict)}
        if "switched" in steps:  # past the point of no return: say what stands
            reason = f"the VM already has the restored disks (old ones kept), but: {reason}"
        elif "define" in steps and not created:
            reason = f"the new domain {restore.name} is defined, but: {reason}"
        if swaps:
            problems = in_place.undo_switch(swaps)
            reason += "; the switched disks were put back" + (
                f" except: {'; '.join(problems)}" if problems else ""
            )
            with contextlib.suppress(Exception):  # reconcile must not redo it
                progress.step("undone")
        _undo(restore, created, defined)
        if isinstance(exc, Stopped):
            _finish(restore, RunStatus.INTERRUPTED, reason)
            raise
        _finish(restore, RunStatus.FAILED, reason)
        return f"failed: {reason}"


def _undo(restore: Restore, created: list[Path], defined: list[str]) -> None:
    """Remove what this restore made: its domain (if defined), its directories."""
    if defined:
        try:
            with hypervisor.session(restore.backup.vm.host.uri) as hv:
                for dom_uuid in defined:
                    with contextlib.suppress(hypervisor.HypervisorError):
                        hv.destroy(dom_uuid)
                    hv.undefine(dom_uuid)
        except Exception:
            log.exception("restore %s: could not undefine %s", restore.pk, defined)
    for path in reversed(created):
        try:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        except FileNotFoundError:
            pass
        except OSError:
            log.exception("restore %s: could not remove %s", restore.pk, path)


def _finish(restore: Restore, status: str, error: str = "") -> None:
    """Record the outcome once: a restore reconcile already ended keeps that outcome."""
    step = "done" if status == RunStatus.SUCCEEDED else restore.step
    restore.finish(status, error, only=(RunStatus.RUNNING,), step=step)
    restore.refresh_from_db()
