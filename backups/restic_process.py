"""A running restic, as a process: both pipes drained within a deadline (stdout split into
lines, stderr kept bounded), the caller's hooks called as it runs, SIGINT on its parent's
death, and the stop — SIGINT (restic removes its lock), then SIGKILL to its whole group.
``restic`` starts the process (the only place that does) and hands it here.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import selectors
import signal
import subprocess
import time
from collections.abc import Callable

STOP_GRACE = 10.0  # seconds restic gets after SIGINT to remove its lock
MAX_STDERR = 64 * 1024
_PR_SET_PDEATHSIG = 1
try:  # resolved once: the child between fork and exec should do as little as possible
    _prctl = ctypes.CDLL(None, use_errno=True).prctl
except (AttributeError, OSError):
    _prctl = None


def die_with_parent(parent: int) -> Callable[[], None]:
    """restic runs in its own session (a Ctrl-C at the command must not reach it before we
    decide), so the kernel interrupts it when its parent dies: SIGINT, on which restic
    removes its lock and exits without writing a snapshot. Run only from the job's thread
    (the kernel's "parent" is the thread that forked)."""

    def child() -> None:
        if _prctl is not None:
            _prctl(_PR_SET_PDEATHSIG, signal.SIGINT, 0, 0, 0)
        if os.getppid() != parent:
            os._exit(1)

    return child


class Hooks:
    """What ``collect`` calls as restic runs: each stdout line, each stderr line, and the
    caller's ``watch`` (at most once a second, whether restic prints or not)."""

    def __init__(self, on_line, watch, on_error):
        self.on_line, self.watch, self.on_error = on_line, watch, on_error
        self.next_watch = 0.0
        self.err_partial = b""

    def tick(self) -> None:
        if self.watch is not None and time.monotonic() >= self.next_watch:
            self.next_watch = time.monotonic() + 1.0
            self.watch()

    def stderr(self, data: bytes) -> None:
        if self.on_error is not None:
            *lines, self.err_partial = (self.err_partial + data).split(b"\n")
            for line in lines:
                self.on_error(line.decode(errors="replace"))


def collect(proc, deadline: float, hooks: Hooks) -> tuple[bytes, bytes]:
    """Both pipes drained together within the deadline; stdout split into lines for
    ``on_line`` (a long backup prints a status line twice a second: consumed, not kept)."""
    on_line = hooks.on_line
    kept: list[bytes] = []
    err = bytearray()
    partial = b""
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        sel.register(proc.stderr, selectors.EVENT_READ)
        while sel.get_map():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise subprocess.TimeoutExpired(proc.args, 0)
            hooks.tick()
            for key, _ in sel.select(min(remaining, 1.0)):
                data = os.read(key.fd, 65536)
                if not data:
                    sel.unregister(key.fileobj)
                elif key.fileobj is proc.stderr:
                    err += data
                    del err[: max(0, len(err) - MAX_STDERR)]
                    hooks.stderr(data)
                elif on_line is None:
                    kept.append(data)
                else:
                    *lines, partial = (partial + data).split(b"\n")
                    kept += [ln + b"\n" for ln in lines if not on_line(ln.decode(errors="replace"))]
    if partial and (on_line is None or not on_line(partial.decode(errors="replace"))):
        kept.append(partial)
    proc.wait(max(deadline - time.monotonic(), 0.001))
    return b"".join(kept), bytes(err)


def stop(proc: subprocess.Popen) -> None:
    """SIGINT first (restic removes its lock), then SIGKILL to its whole group (ssh too)."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGINT)
        try:
            proc.wait(STOP_GRACE)
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    for pipe in (proc.stdout, proc.stderr):
        with contextlib.suppress(OSError):
            pipe.close()
