"""The connection every part of a ``Session`` goes through: open, reconnect after a libvirtd
restart, the job-completed events, and the one exception every libvirt error becomes."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from typing import Self

import libvirt

from .. import uris


class HypervisorError(Exception):
    """A libvirt call failed; the message is libvirt's, prefixed with what we were doing."""


# libvirt logs every error to stderr by default; we report them ourselves.
libvirt.registerErrorHandler(lambda _ctx, _err: None, None)


_event_loop_lock = threading.Lock()
_event_loop_started = False


def ensure_event_loop() -> None:
    """Run libvirt's default event loop in a daemon thread (needed for job events).

    Must run before the connection whose events we want is opened.
    """
    global _event_loop_started
    with _event_loop_lock:
        if _event_loop_started:
            return
        libvirt.virEventRegisterDefaultImpl()

        def loop():
            while True:
                libvirt.virEventRunDefaultImpl()

        threading.Thread(target=loop, name="libvirt-events", daemon=True).start()
        _event_loop_started = True


class Connection:
    """The connection under a ``Session``: opened on enter, reopened after a libvirtd restart;
    ``_dom`` and ``_call`` are what the other parts of the session reach libvirt through."""

    def __init__(self, uri: str):
        self.uri = uri
        self._conn = None

    def __enter__(self) -> Self:
        ensure_event_loop()
        self._completed: dict[str, dict] = {}
        self._job_ended = threading.Condition()  # wakes wait_backup the moment a job ends
        self._restarted = False
        refused = uris.refusal(self.uri)  # asked again here: the row may have been edited
        if refused:
            raise HypervisorError(f"refusing to connect: {refused}")
        try:
            self._conn = libvirt.open(self.uri)
            self._callback = self._conn.domainEventRegisterAny(
                None, libvirt.VIR_DOMAIN_EVENT_ID_JOB_COMPLETED, self._on_job_completed, None
            )
        except libvirt.libvirtError as exc:
            raise HypervisorError(f"cannot connect to {self.uri}: {exc}") from exc
        return self

    def _alive(self) -> bool:
        try:
            return bool(self._conn.isAlive())
        except libvirt.libvirtError:
            return False

    def reconnect(self, timeout: float = 60) -> None:
        """Open the connection again after libvirtd went away (bounded wait)."""
        deadline = time.monotonic() + timeout
        with contextlib.suppress(libvirt.libvirtError):
            self._conn.close()
        while True:
            try:
                self._restarted = True
                self._conn = libvirt.open(self.uri)
                self._callback = self._conn.domainEventRegisterAny(
                    None, libvirt.VIR_DOMAIN_EVENT_ID_JOB_COMPLETED, self._on_job_completed, None
                )
                return
            except libvirt.libvirtError as exc:
                if time.monotonic() > deadline:
                    raise HypervisorError(f"libvirtd did not come back: {exc}") from exc
                time.sleep(0.5)

    def _on_job_completed(self, _conn, dom, params, _opaque) -> None:
        """Keep the completed job's stats: only they carry the failure reason (errmsg)."""
        with self._job_ended:
            self._completed[dom.UUIDString()] = dict(params)
            self._job_ended.notify_all()

    def _wait_completed(self, uuid: str, seconds: float) -> bool:
        """Sleep up to ``seconds``, less if the job-completed event for ``uuid`` arrives."""
        with self._job_ended:
            return self._job_ended.wait_for(lambda: uuid in self._completed, seconds)

    def __exit__(self, *exc_info) -> None:
        if self._conn is not None:
            with contextlib.suppress(libvirt.libvirtError):
                self._conn.domainEventDeregisterAny(self._callback)
            with contextlib.suppress(libvirt.libvirtError):
                self._conn.close()
            self._conn = None

    # -- lookups -------------------------------------------------------------------------
    def _dom(self, uuid: str):
        for attempt in range(2):
            try:
                return self._conn.lookupByUUIDString(uuid)
            except libvirt.libvirtError as exc:
                if attempt == 0 and not self._alive():
                    self.reconnect()  # libvirtd restarted under us: go on with a new one
                    continue
                raise HypervisorError(f"domain {uuid} not found: {exc}") from exc

    def _call(self, fn: Callable, *args, doing: str):
        try:
            return fn(*args)
        except libvirt.libvirtError as exc:
            if not self._alive():
                with contextlib.suppress(HypervisorError):
                    self.reconnect()  # so that the caller's cleanup still reaches libvirtd
            raise HypervisorError(f"{doing}: {exc}") from exc
