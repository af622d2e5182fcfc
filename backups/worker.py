"""Who runs a job and whether it still lives: one answer for backups, restores, prune locks
and fold journals.

A job records its worker as ``host:pid``. On the same host the process table decides (a slow
job is never declared dead while its process lives); on another host only the heartbeat can,
after ``VMBACKUP_STALE_AFTER`` seconds of silence.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from datetime import timedelta

from django.conf import settings
from django.db import connection
from django.utils import timezone
from django_q.conf import Conf
from django_q.status import Stat

log = logging.getLogger(__name__)
_stopping = [False]  # a plain flag: set from a signal handler


def request_stop() -> None:
    """This worker process is being stopped: it starts no new backup or restore."""
    _stopping[0] = True


def stopping() -> bool:
    return _stopping[0]


# what a job's entry point returns when its worker is stopping: the row stays queued
STOPPING = "not started: the worker is stopping (it stays queued; reconcile enqueues it again)"


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def process_alive(holder: str) -> bool | None:
    """True/False for a ``host:pid`` of this host; None when it names another host (or is
    not one), which only a heartbeat or an age can judge."""
    host, _, pid = (holder or "").rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return None
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def is_dead(job, stale_after: int) -> bool:
    """A running job (BackupRun or Restore) is dead when its worker process is gone (same
    host) or it stopped beating."""
    alive = process_alive(job.worker)
    if alive is not None:
        return not alive
    beat = job.heartbeat_at or job.started_at
    return beat is None or beat < timezone.now() - timedelta(seconds=stale_after)


def cluster_here() -> bool:
    """Whether a worker cluster of this site runs on this machine: its stats are fresh
    (they expire within seconds). A command hands work to it only then; any failure to
    tell says no, and the command does the work itself."""
    try:
        stats = Stat.get_all()
    except Exception:
        return False
    here = socket.gethostname()
    return any(
        getattr(s, "host", None) == here and getattr(s, "status", None) != Conf.STOPPED
        for s in stats
    )


def heartbeat_every() -> float:
    """Often enough that reconcile (``VMBACKUP_STALE_AFTER``) never mistakes a live job."""
    return max(1.0, min(30.0, settings.VMBACKUP_STALE_AFTER / 5))


class Heartbeat:
    """Beats for the whole job, whatever phase it is in (hashing, a long commit, a shutdown
    wait): reconcile must never mistake a slow job for a dead one."""

    def __init__(self, job_id: int, every: float, model):
        self.job_id, self.every, self.model = job_id, every, model
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._beat, name=f"beat-{job_id}", daemon=True)

    def _beat(self) -> None:
        try:
            while not self.stop.wait(self.every):
                try:
                    self.model.objects.filter(pk=self.job_id, status="running").update(
                        heartbeat_at=timezone.now()
                    )
                except Exception:  # a database hiccup must not silence the beat for good
                    log.warning("heartbeat of %s %s failed; retrying", self.model.__name__,
                                self.job_id, exc_info=True)  # fmt: skip
                    connection.close()
        finally:
            connection.close()

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc_info):
        self.stop.set()
        self.thread.join(timeout=30)
