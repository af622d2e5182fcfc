"""Domain events for the live inventory, on a connection of their own with keepalive."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from dataclasses import dataclass

import libvirt

from .. import uris
from .connection import HypervisorError, ensure_event_loop

_LIFECYCLE = {
    libvirt.VIR_DOMAIN_EVENT_DEFINED: "defined",
    libvirt.VIR_DOMAIN_EVENT_UNDEFINED: "undefined",
    libvirt.VIR_DOMAIN_EVENT_STARTED: "started",
    libvirt.VIR_DOMAIN_EVENT_SUSPENDED: "suspended",
    libvirt.VIR_DOMAIN_EVENT_RESUMED: "resumed",
    libvirt.VIR_DOMAIN_EVENT_STOPPED: "stopped",
    libvirt.VIR_DOMAIN_EVENT_SHUTDOWN: "shutdown",
    libvirt.VIR_DOMAIN_EVENT_PMSUSPENDED: "pmsuspended",
    libvirt.VIR_DOMAIN_EVENT_CRASHED: "crashed",
}


@dataclass(frozen=True)
class DomainEvent:
    """Something happened to a domain; what it is now is read again, never trusted from here."""

    uuid: str
    kind: str  # lifecycle | device-added | device-removed | disk-change
    detail: str  # lifecycle: defined, undefined, started, stopped, ...; devices: the alias


class EventWatch:
    """A connection that reports domain events to ``on_event`` (called from libvirt's event
    thread: keep it short, e.g. put the event on a queue).

    Keepalive makes a libvirtd that died or hangs close the connection within
    ``interval * (count + 1)`` seconds; ``closed`` is set then (and on our own close), so
    the caller reconnects and reads everything again — events sent meanwhile are lost.
    """

    def __init__(
        self,
        uri: str,
        on_event: Callable[[DomainEvent], None],
        *,
        keepalive: tuple[int, int] = (5, 3),
    ):
        self.uri, self.on_event, self.keepalive = uri, on_event, keepalive
        self.closed = threading.Event()
        self._conn = None
        self._callbacks: list[int] = []

    def __enter__(self) -> EventWatch:
        ensure_event_loop()
        refused = uris.refusal(self.uri)
        if refused:
            raise HypervisorError(f"refusing to connect: {refused}")
        try:
            self._conn = libvirt.open(self.uri)
            self._conn.setKeepAlive(*self.keepalive)
            self._conn.registerCloseCallback(self._on_close, None)
            events = (
                (libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._on_lifecycle),
                (libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_ADDED, self._on_device("device-added")),
                (libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_REMOVED, self._on_device("device-removed")),
                (libvirt.VIR_DOMAIN_EVENT_ID_DISK_CHANGE, self._on_disk_change),
            )
            for event_id, callback in events:
                self._callbacks.append(
                    self._conn.domainEventRegisterAny(None, event_id, callback, None)
                )
        except libvirt.libvirtError as exc:
            self.__exit__(None, None, None)
            raise HypervisorError(f"cannot watch events on {self.uri}: {exc}") from exc
        return self

    def __exit__(self, *exc_info) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            for callback in self._callbacks:
                with contextlib.suppress(libvirt.libvirtError):
                    conn.domainEventDeregisterAny(callback)
            with contextlib.suppress(libvirt.libvirtError):
                conn.unregisterCloseCallback()
            with contextlib.suppress(libvirt.libvirtError):
                conn.close()
        self._callbacks = []
        self.closed.set()

    def _on_close(self, _conn, _reason, _opaque) -> None:
        self.closed.set()

    def _on_lifecycle(self, _conn, dom, event, _detail, _opaque) -> None:
        self.on_event(DomainEvent(dom.UUIDString(), "lifecycle", _LIFECYCLE.get(event, "other")))

    def _on_device(self, kind: str):
        def callback(_conn, dom, alias, _opaque) -> None:
            self.on_event(DomainEvent(dom.UUIDString(), kind, str(alias)))

        return callback

    def _on_disk_change(self, _conn, dom, _old, _new, alias, _reason, _opaque) -> None:
        self.on_event(DomainEvent(dom.UUIDString(), "disk-change", str(alias)))
