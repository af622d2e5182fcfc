"""A command that runs a job in its own process, stopped by TERM, INT or HUP, ends it the way
a failure would: what the job made is undone, its row reads "interrupted" at once (not
"running" until the next reconcile), and the qemu-img it started is killed with it.

Without this, TERM and HUP ended the process on the spot (the row left "running", a prune
lock left held) and Ctrl-C raised ``KeyboardInterrupt``, which no job handles. SIGKILL cannot
be caught: there qemu-img dies by ``PR_SET_PDEATHSIG`` (see ``qemu_img``) and reconcile finds
the row's worker (``host:pid``) gone and repairs it.
"""

from __future__ import annotations

import signal
import sys
import threading

from .models import RunStatus

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class Stopped(BaseException):
    """Raised in the main thread by a catchable signal.

    A BaseException, like ``KeyboardInterrupt``: every ``except Exception`` that records a
    failure as data (a backup marked corrupt by a check cut short, a fold undone as if it
    had failed) lets it through. A job's top level catches it, undoes what it made, marks
    its row interrupted with this message and raises it again."""

    def __init__(self, command: str, signum: int):
        self.signum = signum
        super().__init__(f"{command} was stopped by {signal.Signals(signum).name}")


class Guard:
    """``with Guard("vmbackup_restore") as guard:`` around what a command does.

    The first signal raises ``Stopped``; the ones after it are ignored, so the clean-up
    the first one started runs to its end (SIGKILL still ends it; reconcile then repairs).
    On the way out the process exits with 128 + the signal's number, the message on stderr.
    """

    def __init__(self, command: str):
        self.command = command
        self.stopped: Stopped | None = None
        self.rows: list = []
        self.previous: dict = {}

    def queued(self, row) -> None:
        """A row this command created and will run itself: stopped before the job claimed
        it, nobody else ever will, so it is ended too."""
        self.rows.append(row)

    def _handle(self, signum, frame) -> None:
        if self.stopped is not None:
            return
        self.stopped = Stopped(self.command, signum)
        raise self.stopped

    def __enter__(self) -> Guard:
        if threading.current_thread() is threading.main_thread():  # signals reach no other
            self.previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        try:
            if self.stopped is not None:
                self._end_queued()
        finally:
            for signum, handler in self.previous.items():
                signal.signal(signum, handler)
        if self.stopped is None:
            return False
        sys.stderr.write(f"{self.stopped}\n")
        sys.stderr.flush()
        raise SystemExit(128 + self.stopped.signum)

    def _end_queued(self) -> None:
        for row in self.rows:
            row.mark_interrupted(str(self.stopped), only=(RunStatus.QUEUED,))


class WorkerStopped(Stopped):
    """Raised in a django-q2 worker's job when its cluster is stopped (see ``cluster``).

    The job ends as for a stopped command (undone, ``interrupted``); the entry point in
    ``jobs`` then returns instead of raising, so the worker takes its STOP and exits."""
