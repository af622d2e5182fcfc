"""django-q2's cluster, made to survive a killed worker and to stop within a bounded time.

Two faults of django-q2 1.11 (still in its master), worked around here and proposed
upstream (django-q2 issues #23 and #346; Koed00/django-q #200, #394):

1. **A killed idle worker wedges the cluster.** Idle workers wait in ``task_queue.get()``
   (``django_q/worker.py``, line 59). multiprocessing's ``Queue.get`` blocks reading the
   pipe *while holding the queue's read lock* (``multiprocessing/queues.py``, lines
   102-103), a POSIX semaphore nobody releases when its holder is killed: after a SIGKILL
   (the OOM killer, an operator) every other worker, and every worker the sentinel
   reincarnates, waits for that lock forever. The pusher fills the queue and stops; the
   tasks it took stay locked in the broker for ``retry`` seconds (about a day here).
   ``DeathSafeLock`` replaces both locks of both queues: an ``flock`` on a private open
   file description of one memfd, which the kernel releases when its holder dies.

2. **SIGTERM to the process group (systemd's stop) hangs the main process.** The sentinel
   restores SIGTERM's default action (``django_q/cluster.py``, line 176), so it dies at
   once, and so do its workers (they inherit it) with their jobs half done. The main
   process's handler calls ``stop_event.set()`` (line 115), and multiprocessing's
   ``Condition.notify_all`` waits for each sleeper to wake (``synchronize.py``, line 297,
   ``_woken_count.acquire()``): the dead sentinel was asleep in ``stop_event.wait()``
   (line 373) and never wakes. Here the sentinel, pusher and monitor ignore SIGTERM; the
   handler only records the request, and the stop runs outside signal context within a
   budget (``stop``): each busy worker's job is interrupted (it undoes what it made and
   ends ``interrupted``), the sentinel stops its processes, and whatever is still alive
   when the budget is spent is killed (reconcile repairs).

Installed by our ``qcluster`` command (``install`` then ``serve``), in that process only.
"""

from __future__ import annotations

import ctypes
import fcntl
import logging
import os
import signal
import threading
import time
import weakref
from pathlib import Path

from django_q import cluster as q_cluster
from django_q import queues as q_queues
from django_q import signals as q_signals
from django_q.conf import Conf

from . import interrupt, worker

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
try:
    _prctl = ctypes.CDLL(None, use_errno=True).prctl
except (AttributeError, OSError):
    _prctl = None
_DjangoSentinel = q_cluster.Sentinel


def die_with_parent(signum: int) -> None:
    """Ask the kernel to send ``signum`` when this process's parent dies, so nothing of a
    cluster outlives its sentinel (which would go on taking tasks nobody runs)."""
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, signum, 0, 0, 0)


class DeathSafeLock:
    """A lock between the processes of one cluster that the kernel releases when its holder
    dies: ``flock`` on one memfd, each process through its own open file description (a
    lock belongs to a description, so forked copies of one would share it), and a thread
    lock inside each process (threads share the description)."""

    _all: weakref.WeakSet = weakref.WeakSet()

    def __init__(self):
        self._memfd = os.memfd_create("vmbackup-queue-lock")
        self._fd: int | None = None
        self._threads = threading.Lock()
        DeathSafeLock._all.add(self)

    def __getstate__(self):
        raise TypeError("a DeathSafeLock is shared by fork only")

    def _after_fork(self) -> None:
        """A child gets its own description; the parent's copy is closed (its lock, if
        held, stays the parent's)."""
        if self._fd is not None:
            os.close(self._fd)
        self._fd = None
        self._threads = threading.Lock()

    def _private(self) -> int:
        if self._fd is None:
            self._fd = os.open(f"/proc/self/fd/{self._memfd}", os.O_RDWR | os.O_CLOEXEC)
        return self._fd

    def acquire(self, block: bool = True, timeout: float | None = None) -> bool:
        wait = -1 if timeout is None or not block else max(timeout, 0.0)
        deadline = None if wait == -1 else time.monotonic() + wait
        if not self._threads.acquire(block, wait if block else -1):
            return False
        try:
            if block and deadline is None:
                fcntl.flock(self._private(), fcntl.LOCK_EX)
                return True
            while True:
                try:
                    fcntl.flock(self._private(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                    return True
                except BlockingIOError:
                    if not block or time.monotonic() >= deadline:
                        break
                    time.sleep(0.005)
        except BaseException:
            self._threads.release()
            raise
        self._threads.release()
        return False

    def release(self) -> None:
        fcntl.flock(self._private(), fcntl.LOCK_UN)
        self._threads.release()

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc_info):
        self.release()


def _reinit_locks_in_child() -> None:
    for lock in list(DeathSafeLock._all):
        lock._after_fork()


os.register_at_fork(after_in_child=_reinit_locks_in_child)


class RobustQueue(q_queues.Queue):
    """django-q2's queue with locks that a killed reader or writer does not keep."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._rlock = DeathSafeLock()
        if self._wlock is not None:
            self._wlock = DeathSafeLock()


def _pusher(*args):
    die_with_parent(signal.SIGKILL)
    return q_cluster.pusher(*args)


def _monitor(*args):
    die_with_parent(signal.SIGKILL)
    return q_cluster.monitor(*args)


class Sentinel(_DjangoSentinel):
    """The sentinel with robust queues, deaf to SIGTERM (the main process stops it), and
    dying with the main process; its pusher and monitor die with it."""

    def __init__(self, stop_event, start_event, cluster_id, broker=None, timeout=None, start=True):
        die_with_parent(signal.SIGKILL)
        super().__init__(stop_event, start_event, cluster_id, broker, timeout, start=False)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # inherited by pusher and monitor
        limit = Conf.QUEUE_LIMIT
        self.task_queue = RobustQueue(maxsize=limit) if limit else RobustQueue()
        self.result_queue = RobustQueue()
        if start:
            self.start()

    def spawn_pusher(self):
        return self.spawn_process(_pusher, self.task_queue, self.event_out, self.broker)

    def spawn_monitor(self):
        return self.spawn_process(_monitor, self.result_queue, self.broker)


# --- in each worker process -------------------------------------------------------------

_busy = False
_parent = 0


def _parent_gone() -> bool:
    return os.getppid() != _parent


def _worker_spawned(sender, proc_name, **kwargs) -> None:
    """A worker stops its job on SIGTERM, and gets one when its sentinel dies."""
    global _parent
    _parent = os.getppid()
    signal.signal(signal.SIGTERM, _worker_terminated)
    die_with_parent(signal.SIGTERM)
    if _parent_gone():  # the sentinel died before the line above took effect
        raise SystemExit(0)


def _worker_terminated(signum, frame) -> None:
    """The job running (if any) is interrupted once; an idle worker waits for the
    sentinel's STOP (it takes no new job: ``jobs`` decline while ``worker.stopping()``),
    unless its sentinel is gone."""
    first = not worker.stopping()
    worker.request_stop()
    if _busy and first:
        raise interrupt.WorkerStopped("the worker", signum)
    if not _busy and _parent_gone():
        raise SystemExit(0)


def _task_starts(sender, **kwargs) -> None:
    global _busy
    _busy = True


def _task_ended(sender, **kwargs) -> None:
    global _busy
    _busy = False
    if worker.stopping() and _parent_gone():
        raise SystemExit(0)


def install() -> None:
    """Use the robust sentinel and the worker hooks in this process and its children."""
    q_cluster.Sentinel = Sentinel
    q_signals.post_spawn.connect(_worker_spawned, dispatch_uid="vmbackup-worker-spawned")
    q_signals.pre_execute.connect(_task_starts, dispatch_uid="vmbackup-task-starts")
    q_signals.post_execute_in_worker.connect(_task_ended, dispatch_uid="vmbackup-task-ended")


# --- in the main process ----------------------------------------------------------------


def serve(budget: float, tick=None, every: float = 60) -> int:
    """Run a cluster until TERM or INT, then stop it within ``budget`` seconds; the exit
    code is 0 for a clean stop, 1 when something had to be killed or the sentinel died.
    ``tick`` is called every ``every`` seconds meanwhile, from this process: a check that
    must not depend on the workers it checks."""
    install()
    requested: list[int] = []

    def on_signal(signum, frame) -> None:  # no lock, no I/O: safe in signal context
        requested.append(signum)

    cluster = q_cluster.Cluster()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, on_signal)
    cluster.start()
    next_tick = time.monotonic() + every
    while not requested and cluster.sentinel.is_alive():
        time.sleep(0.2)
        if tick is not None and time.monotonic() >= next_tick and not requested:
            next_tick = time.monotonic() + every
            try:
                tick()
            except Exception:  # a database hiccup must not end the cluster
                log.exception("the cluster's periodic check failed")
    if not requested:
        log.error("the cluster's sentinel died (exit code %s)", cluster.sentinel.exitcode)
        kill_tree(cluster.sentinel.pid)
        return 1
    return stop(cluster, budget, signal.Signals(requested[0]).name)


def stop(cluster, budget: float, why: str) -> int:
    deadline = time.monotonic() + budget
    log.info("stopping the cluster (%s), at most %.0f s", why, budget)
    for pid in _children().get(cluster.sentinel.pid, []):  # busy workers interrupt their job
        _signal(pid, signal.SIGTERM)  # (the pusher and monitor ignore it)
    setter = threading.Thread(target=cluster.stop_event.set, daemon=True)
    setter.start()
    setter.join(5)  # never waits on a dead sentinel (it cannot wake up)
    cluster.sentinel.join(max(0.0, deadline - time.monotonic()))
    if not cluster.sentinel.is_alive():
        log.info("the cluster has stopped")
        return 0
    log.error("the cluster did not stop within %.0f s: killed (reconcile repairs)", budget)
    kill_tree(cluster.sentinel.pid)
    cluster.sentinel.join(10)
    return 1


def _children() -> dict[int, list[int]]:
    """Each process's children, from /proc (Linux only, as libvirt)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(parent, []).append(int(entry.name))
    return children


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (qemu-img, in its own session, included)."""
    children = _children()
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill_tree(pid: int) -> None:
    for child in [pid, *descendants(pid)]:
        _signal(child, signal.SIGKILL)


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass
