"""Repair what a dead worker left behind, from its journal and from what is on the host.

Runs at worker start, periodically and as ``vmbackup_reconcile``. It only ever touches what
this installation made (``site``): overlays named ``.vmbackup-<site>-<run>-<target>…``,
backup jobs whose target lies in one of our staging directories, ``.<stamp>-<run>.<site>
.partial`` directories under a backup root, fold journals with our site, and guests a
journal says we froze. Names from versions before the site id count as ours only when our
own database recorded them (the run's journal, its staging path). Anything else that looks
like vmbackup's — another installation on the same libvirt host, say — is reported on the
host (``Host.foreign_artifacts``) and never touched.

Here: the order of the repairs and the hosts' overlays; one module per job kind beside it
(runs, restores, copies, drills), on_disk.py for the roots, report.py for the Report.
"""

from __future__ import annotations

import logging
import os
import socket
from datetime import timedelta

from django.conf import settings
from django.utils import timezone

from .. import adopt, hypervisor, site, worker
from ..backup import methods
from ..models import BackupRun, Host, PruneLock, RunStatus
from ..restore import drill as drill_engine
from .copies import repair_copies
from .drills import repair_drills
from .on_disk import local_roots, remove_orphan_partials, repair_folds
from .report import Report as Report
from .restores import repair_restores
from .runs import active_run_ids, repair_finished, repair_run, still_active

log = logging.getLogger(__name__)


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
            repair_run(run, report)
    _release_dead_prune_locks(report)
    repair_finished(report, stale_after, mine)
    repair_restores(report, stale_after, mine)
    repair_copies(report, stale_after, mine)
    repair_drills(report, stale_after, mine)
    hosts = Host.objects.all() if cluster is None else Host.objects.filter(cluster=cluster)
    me = site.site_id()
    found = {host.pk: _repair_host(host, me, report) for host in hosts}
    local = remove_orphan_partials(me, report) + repair_folds(me, report)
    for host in hosts:  # the roots are on the machine that serves these hosts
        _record_foreign(host, found[host.pk] + local)
    adopted = adopt.adopt(local_roots())
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


def _repair_host(host: Host, me: str, report: Report) -> list[str]:
    """Overlays of ours that a domain still runs on, with no live run behind them; returns
    the overlays of another installation found there (left alone)."""
    foreign: list[str] = []
    active = active_run_ids()
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
        if name.run_id in active or still_active(name.run_id):
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
