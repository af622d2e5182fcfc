"""Restore drills: a dead one's sandbox removed, a lost one enqueued again or ended."""

from __future__ import annotations

import socket
from datetime import timedelta

from django.conf import settings
from django.utils import timezone

from .. import hypervisor, notify, requests, worker
from ..models import Drill, RunStatus
from ..restore import drill as drill_engine
from .report import Report


def repair_drills(report: Report, stale_after: int, mine: dict) -> None:
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
