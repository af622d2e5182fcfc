"""Repair what a dead worker left behind, from its journal and from what is on the host.

Runs at worker start, periodically and as ``vmbackup_reconcile``. It only ever touches what
this installation made (``site``): overlays named ``.vmbackup-<site>-<run>-<target>…``,
backup jobs whose target lies in one of our staging directories, ``.<stamp>-<run>.<site>
.partial`` directories under a backup root, fold journals with our site, and guests a
journal says we froze. Names from versions before the site id count as ours only when our
own database recorded them (the run's journal, its staging path). Anything else that looks
like vmbackup's — another installation on the same libvirt host, say — is reported on the
host (``Host.foreign_artifacts``) and never touched.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

from django.conf import settings
from django.utils import timezone

from . import adopt, archive, hypervisor, notify, requests, roots, site, worker
from .backup import methods
from .models import (
    BackupRun,
    Drill,
    Host,
    OffsiteCopy,
    PruneLock,
    Restore,
    RestoreMode,
    RunStatus,
)
from .offsite import copy as offsite_copy
from .restore import disk as disk_restore
from .restore import drill as drill_engine
from .restore import from_offsite, in_place, instant, new_domain, rules
from .retention import fold
from .roots import refusal as root_refusal

log = logging.getLogger(__name__)


@dataclass
class Report:
    interrupted: list[int] = field(default_factory=list)
    restores_interrupted: list[int] = field(default_factory=list)
    drills_interrupted: list[int] = field(default_factory=list)
    sandboxes: list[str] = field(default_factory=list)  # drill sandboxes left: destroyed
    copies_interrupted: list[int] = field(default_factory=list)
    copies_requeued: list[int] = field(default_factory=list)  # the new copies' ids
    locks_released: list[str] = field(default_factory=list)  # of dead vmbackup_prune runs
    overlays: list[str] = field(default_factory=list)
    jobs_aborted: list[str] = field(default_factory=list)
    thawed: list[str] = field(default_factory=list)
    restarted: list[str] = field(default_factory=list)
    restores_resumed: list[int] = field(default_factory=list)  # instant: handed to a worker
    adopted: list[str] = field(default_factory=list)
    partials: list[str] = field(default_factory=list)
    folds: list[str] = field(default_factory=list)  # folds of a killed prune, finished/undone
    foreign: list[str] = field(default_factory=list)  # another installation's: left alone
    errors: list[str] = field(default_factory=list)

    def summary(self) -> str:
        parts = [
            f"{len(self.interrupted)} runs interrupted",
            f"{len(self.restores_interrupted)} restores interrupted",
            f"{len(self.drills_interrupted)} drills interrupted",
            f"{len(self.sandboxes)} stray drill sandboxes removed",
            f"{len(self.copies_interrupted)} offsite copies interrupted "
            f"({len(self.copies_requeued)} requeued)",
            f"{len(self.restores_resumed)} instant restores handed to a worker",
            f"{len(self.locks_released)} prune locks released",
            f"{len(self.overlays)} overlays merged",
            f"{len(self.jobs_aborted)} jobs aborted",
            f"{len(self.thawed)} guests thawed",
            f"{len(self.restarted)} guests restarted",
            f"{len(self.partials)} partial dirs removed",
            f"{len(self.folds)} folds repaired",
            f"{len(self.adopted)} backups adopted from disk",
        ]
        if self.foreign:
            parts.append(f"{len(self.foreign)} foreign artifacts left alone")
        if self.errors:
            parts.append("errors: " + "; ".join(self.errors))
        return ", ".join(parts)


def reconcile(stale_after: int | None = None, cluster: str | None = None) -> Report:
    """Repair everything, or with ``cluster`` only the runs, restores and hosts served by
    that django-q2 cluster (each cluster runs its own copy: see ``schedules``)."""
    report = Report()
    stale_after = settings.VMBACKUP_STALE_AFTER if stale_after is None else stale_after
    mine = {} if cluster is None else {"vm__host__cluster": cluster}
    running = BackupRun.objects.filter(status=RunStatus.RUNNING, **mine).values_list(
        "pk", flat=True
    )
    for run_id in list(running):
        # read each run just before judging it: repairing the previous ones may take minutes
        run = BackupRun.objects.select_related("vm__host", "policy").get(pk=run_id)
        if run.status == RunStatus.RUNNING and worker.is_dead(run, stale_after):
            _repair_run(run, report)
    _release_dead_prune_locks(report)
    _repair_finished(report, stale_after, mine)
    _repair_restores(report, stale_after, mine)
    _repair_copies(report, stale_after, mine)
    _repair_drills(report, stale_after, mine)
    hosts = Host.objects.all() if cluster is None else Host.objects.filter(cluster=cluster)
    me = site.site_id()
    found = {host.pk: _repair_host(host, me, report) for host in hosts}
    local = _remove_orphan_partials(me, report) + _repair_folds(me, report)
    for host in hosts:  # the roots are on the machine that serves these hosts
        _record_foreign(host, found[host.pk] + local)
    adopted = adopt.adopt(_roots())
    report.adopted = adopted.paths
    report.errors += adopted.skipped
    return report


def _record_foreign(host: Host, foreign: list[str]) -> None:
    host.foreign_artifacts = foreign
    host.foreign_checked_at = timezone.now()
    host.save(update_fields=["foreign_artifacts", "foreign_checked_at"])


def _release_dead_prune_locks(report: Report) -> None:
    """A ``vmbackup_prune`` killed mid-way leaves its lock: released once its process is
    gone (same machine) or after a day (another machine), so backups of the VM resume."""
    for lock in PruneLock.objects.all():
        host, _, pid = lock.holder.rpartition(":")
        if host == socket.gethostname() and pid.isdigit():
            try:
                os.kill(int(pid), 0)
                continue
            except ProcessLookupError:
                pass
            except PermissionError:
                continue
        elif lock.since > timezone.now() - timedelta(days=1):
            continue
        lock.delete()
        report.locks_released.append(lock.holder)


def _repair_restores(report: Report, stale_after: int, mine: dict) -> None:
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


def _repair_drills(report: Report, stale_after: int, mine: dict) -> None:
    """A dead drill (on this machine): its sandbox destroyed, its scratch directory removed,
    the backup private again, the drill interrupted and alerted. Drills queued for longer
    than ``VMBACKUP_QUEUED_ALERT_AFTER`` on a host where none runs are enqueued again (a
    lost task); a day queued, they end."""
    for drill_id in list(
        Drill.objects.filter(status=RunStatus.RUNNING, **mine).values_list("pk", flat=True)
    ):
        drill = Drill.objects.select_related("vm__host", "host", "backup").get(pk=drill_id)
        if drill.status != RunStatus.RUNNING or not worker.is_dead(drill, stale_after):
            continue
        if drill.worker.rpartition(":")[0] != socket.gethostname():
            report.errors.append(f"drill {drill.pk}: its worker {drill.worker} stopped answering")
            continue
        try:
            with hypervisor.session(drill.host.uri) as hv:
                error = drill_engine.discard(drill, hv)
        except Exception as exc:  # one bad drill must not stop the rest of reconcile
            report.errors.append(f"drill {drill.pk}: {exc}")
            continue
        if drill.mark_interrupted(error, only=(RunStatus.RUNNING,)):
            report.drills_interrupted.append(drill.pk)
            notify.drill_finished(drill)
    now = timezone.now()
    queued = Drill.objects.filter(status=RunStatus.QUEUED, **mine)
    for drill in queued.filter(created_at__lt=now - timedelta(days=1)):
        if drill.mark_interrupted("never picked up by a worker", only=(RunStatus.QUEUED,)):
            report.drills_interrupted.append(drill.pk)
    lost = timedelta(seconds=settings.VMBACKUP_QUEUED_ALERT_AFTER)
    hosts = set(queued.filter(created_at__lt=now - lost).values_list("host_id", flat=True))
    for host_id in hosts:
        if not Drill.objects.filter(host_id=host_id, status=RunStatus.RUNNING).exists():
            first = queued.filter(host_id=host_id).select_related("vm__host")
            drill = first.order_by("created_at", "id").first()
            if drill is not None:
                requests.enqueue_drill(drill)


def _repair_copies(report: Report, stale_after: int, mine: dict) -> None:
    """A copy whose worker died left no snapshot (restic writes it last) and nothing on
    this host: any reconcile may end it, interrupted, and request it again (up to
    ``VMBACKUP_OFFSITE_ATTEMPTS``). Links are judged with the copy that runs them; a link
    left running after its copy ended is ended too. A copy queued for a day is dropped."""
    error = "interrupted: the worker died during the copy (repaired by reconcile)"
    running = OffsiteCopy.objects.filter(status=RunStatus.RUNNING, via__isnull=True, **mine)
    for copy_id in list(running.values_list("pk", flat=True)):
        copy = OffsiteCopy.objects.select_related("backup__vm__host", "repository").get(pk=copy_id)
        if copy.status != RunStatus.RUNNING or not worker.is_dead(copy, stale_after):
            continue
        try:
            ended = offsite_copy.repair_dead(copy, error)
        except Exception as exc:  # one bad copy must not stop the rest of reconcile
            report.errors.append(f"offsite copy {copy.pk}: {exc}")
            continue
        if ended:
            report.copies_interrupted.append(copy.pk)
            retry = requests.retry_offsite_copy(copy)
            report.copies_requeued += [retry.pk] if retry else []
    orphans = OffsiteCopy.objects.filter(status=RunStatus.RUNNING, via__isnull=False, **mine)
    for link in orphans.exclude(via__status=RunStatus.RUNNING):
        if link.mark_interrupted(error, only=(RunStatus.RUNNING,)):
            report.copies_interrupted.append(link.pk)
    stale = OffsiteCopy.objects.filter(
        status=RunStatus.QUEUED, created_at__lt=timezone.now() - timedelta(days=1), **mine
    )
    for copy in stale:
        if copy.mark_interrupted("never picked up by a worker", only=(RunStatus.QUEUED,)):
            report.copies_interrupted.append(copy.pk)


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


def _unmatched(steps: list[str], begin: str, end: str) -> bool:
    return steps.count(begin) > steps.count(end)


def _repair_finished(report: Report, stale_after: int, mine: dict) -> None:
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


def _repair_run(run: BackupRun, report: Report) -> None:
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


def _still_active(run_id: int) -> bool:
    """Asked again right before acting: a run may have started since the first look."""
    return BackupRun.objects.active().filter(pk=run_id).exists()


def _active_run_ids() -> set[int]:
    return set(BackupRun.objects.active().values_list("pk", flat=True))


def _repair_host(host: Host, me: str, report: Report) -> list[str]:
    """Overlays of ours that a domain still runs on, with no live run behind them; returns
    the overlays of another installation found there (left alone)."""
    foreign: list[str] = []
    active = _active_run_ids()
    try:
        with hypervisor.session(host.uri) as hv:
            report.sandboxes += drill_engine.orphans(hv, me)
            for domain in hv.domains():
                try:
                    foreign += _repair_domain(hv, domain, active, me, report)
                except (hypervisor.HypervisorError, methods.MethodError) as exc:
                    if hv.exists(domain.uuid):  # a domain undefined meanwhile needs nothing
                        report.errors.append(f"{domain.name}: {exc}")
    except hypervisor.HypervisorError as exc:
        report.errors.append(f"host {host.name}: {exc}")
    report.foreign += foreign
    return foreign


def _repair_domain(hv, domain, active: set[int], me: str, report: Report) -> list[str]:
    foreign = []
    for target, overlay in _overlays(hv, domain).items():
        name = methods.parse_overlay(overlay)
        if not _overlay_is_ours(name, overlay, me):
            foreign.append(f"{domain.name}: disk {target} runs on {overlay}, not ours")
            continue
        if name.run_id in active or _still_active(name.run_id):
            continue
        methods.commit_overlays(hv, domain.uuid, {target: overlay}, lambda *a, **k: None)
        report.overlays.append(overlay)
    return foreign


def _overlay_is_ours(name: methods.OverlayName, path: str, me: str) -> bool:
    if name.site is not None:
        return name.site == me
    run = BackupRun.objects.filter(pk=name.run_id).only("journal").first()
    journaled = run.journal if run else []
    return any(path in (step.get("overlays") or {}).values() for step in journaled)


def _overlays(hv: hypervisor.Session, domain: hypervisor.DomainInfo) -> dict[str, str]:
    """Disks (live or in the persistent definition) whose source is named like an overlay
    of vmbackup's, whoever made it."""
    found = {}
    for disk in domain.disks:
        if methods.parse_overlay(disk.source):
            found[disk.target] = disk.source
    inactive = hv.disk_source
    for disk in domain.disks:
        source = inactive(domain.uuid, disk.target, inactive=True) if domain.persistent else None
        if source and methods.parse_overlay(source):
            found.setdefault(disk.target, source)
    return found


def _roots() -> set[str]:
    """The configured roots that exist here (a root on another machine is not mounted)."""
    return {r for r in roots.configured() if os.path.isdir(r)}


def _remove_orphan_partials(me: str, report: Report) -> list[str]:
    """Our partial directories that no active run is writing; returns another
    installation's (left alone)."""
    active = _active_run_ids()
    foreign = []
    for root in _roots():
        for partial in archive.list_partials(root):
            owner = archive.partial_owner(partial)
            if owner is None:
                continue  # not named like a backup's staging directory: not ours to judge
            made_by, run_id = owner
            if made_by != me and not (made_by is None and _staged_by_us(run_id, partial)):
                foreign.append(f"{partial}: a backup in progress of another installation")
                continue
            if run_id in active or _still_active(run_id):
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


def _repair_folds(me: str, report: Report) -> list[str]:
    """Folds a killed prune left half-done: finished when their rewritten images are
    complete and recorded, undone otherwise (see ``fold``); a fold still running, or one
    of another installation, is left."""
    foreign = []
    for root in _roots():
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
