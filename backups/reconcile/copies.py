"""Offsite copies: a dead one ended and requested again, a lost one dropped."""

from __future__ import annotations

from datetime import timedelta

from django.utils import timezone

from .. import requests, worker
from ..models import OffsiteCopy, RunStatus
from ..offsite import copy as offsite_copy
from .report import Report


def repair_copies(report: Report, stale_after: int, mine: dict) -> None:
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
