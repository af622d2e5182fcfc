"""Backup runs that wait for a worker too long: reported, and enqueued again when the
broker no longer holds a task a worker could take for them.

A run can wait for good although its cluster is alive: its task was taken by a cluster
that was then killed or wedged (django-q2 locks a taken task in the broker for ``retry``
seconds, a day here), or lost with a worker. Run by reconcile (periodic, at worker start,
``vmbackup_reconcile``) and by the cluster's own main process (``cluster.serve``). Enqueuing
twice is safe: the run's claim lets only one delivery run it (``BackupRun.claim``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.conf import settings
from django.dispatch import Signal
from django.utils import timezone
from django_q.brokers import get_broker
from django_q.brokers.orm import ORM
from django_q.conf import Conf
from django_q.models import OrmQ
from django_q.signing import BadSignature, SignedPackage
from django_q.status import Stat

from . import requests
from .models import BackupRun, RunStatus

log = logging.getLogger(__name__)

# The alert hook: sent once per period for each run queued longer than
# VMBACKUP_QUEUED_ALERT_AFTER while a cluster reports alive (kwargs: run, host, since).
run_waiting = Signal()


@dataclass
class Waiting:
    run: BackupRun
    since: datetime  # queued, or last enqueued again
    requeued: bool = False


def clusters_alive() -> bool:
    """Whether any cluster of this site reports its stats (they expire within seconds)."""
    try:
        return bool(Stat.get_all())
    except Exception:  # a broker or cache failure: say nothing rather than a false alert
        return False


def since(run: BackupRun) -> datetime:
    """When the run was queued, or last enqueued again."""
    stamps = [
        e.get("at") for e in run.journal if isinstance(e, dict) and e.get("step") == "requeued"
    ]
    return datetime.fromisoformat(stamps[-1]) if stamps else run.created_at


def check(cluster: str | None = None, now: datetime | None = None) -> list[Waiting]:
    """Report and requeue the runs (of hosts served by ``cluster``, if given) queued
    longer than ``VMBACKUP_QUEUED_ALERT_AFTER`` seconds since they were last enqueued."""
    now = now or timezone.now()
    after = timedelta(seconds=settings.VMBACKUP_QUEUED_ALERT_AFTER)
    queued = BackupRun.objects.filter(status=RunStatus.QUEUED, created_at__lt=now - after)
    if cluster is not None:
        queued = queued.filter(vm__host__cluster=cluster)
    alive = clusters_alive()
    found = []
    for run in queued.select_related("vm__host"):
        waiting = Waiting(run, since(run))
        if waiting.since > now - after:
            continue
        host = run.vm.host
        if alive:
            log.warning("run %s waits for a worker on %s since %s", run.pk, host, waiting.since)
            run_waiting.send(sender=BackupRun, run=run, host=host, since=waiting.since)
        if not _deliverable(run):
            waiting.requeued = _requeue(run)
        found.append(waiting)
    return found


def summary(found: list[Waiting]) -> str:
    requeued = sum(1 for w in found if w.requeued)
    return f"{len(found)} runs waiting for a worker, {requeued} enqueued again"


def _task_name(run: BackupRun) -> str:
    return f"backup-{run.pk}"


def _deliverable(run: BackupRun) -> bool:
    """Whether the broker holds a task for the run that a worker may still take; a task
    taken (locked) long ago and not run is not."""
    name, broker = _task_name(run), get_broker(run.vm.host.cluster or Conf.CLUSTER_NAME)
    if isinstance(broker, ORM):
        held = OrmQ.objects.using(Conf.ORM).filter(key=broker.list_key)
        return any(_name(q.payload) == name for q in held.filter(lock__lte=timezone.now()))
    try:  # Redis: what is in the list is not taken yet
        payloads = broker.connection.lrange(broker.list_key, 0, -1)
    except Exception:
        return True  # cannot tell: do not enqueue twice blindly
    return any(_name(p) == name for p in payloads)


def _name(payload) -> str | None:
    try:
        return SignedPackage.loads(payload).get("name")
    except (BadSignature, TypeError, ValueError):
        return None


def _requeue(run: BackupRun) -> bool:
    """Enqueue the run again (the stale task left in an ORM broker is dropped)."""
    if not BackupRun.objects.filter(pk=run.pk, status=RunStatus.QUEUED).exists():
        return False
    broker = get_broker(run.vm.host.cluster or Conf.CLUSTER_NAME)
    if isinstance(broker, ORM):
        stale = OrmQ.objects.using(Conf.ORM).filter(key=broker.list_key)
        stale = [q.pk for q in stale if _name(q.payload) == _task_name(run)]
        OrmQ.objects.using(Conf.ORM).filter(pk__in=stale).delete()
    run.log("requeued", reason="no worker took it; enqueued again")
    requests.enqueue_backup(run)
    log.warning("run %s enqueued again: no worker took it", run.pk)
    return True
