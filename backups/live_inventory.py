"""Keep the inventory live: libvirt's domain events update a VM's row within seconds.

A VM destroyed a minute ago must not read "running", and a restored domain should be there
at once, not at the next sync. ``vmbackup_events`` runs this beside each host's worker: one
thread per host holds an event connection (with keepalive) and a session to read domains
with. Events only say *which* domain changed; its row is read again from libvirt, so a lost
or reordered event costs nothing but a moment. Every (re)connect starts with a full sync of
the host (events sent while we were away are lost), and the periodic sync stays as the
safety net. libvirt calls stay in ``hypervisor``; rows are written by ``inventory``.
"""

from __future__ import annotations

import logging
import queue
import threading

from django.conf import settings
from django.db import DatabaseError, close_old_connections, connection

from . import hypervisor, inventory
from .models import Host

log = logging.getLogger(__name__)

RETRY_FIRST, RETRY_MAX = 0.5, 5.0  # seconds between reconnect attempts (doubling)
POLL = 0.5  # how often a quiet loop looks at its stop flag and its connection


def hosts_for(cluster: str) -> list[Host]:
    """The hosts a worker of ``cluster`` serves ("" or the site's name: hosts without one);
    the local host is created when the inventory is empty, as the sync does."""
    if cluster == settings.Q_CLUSTER["name"]:
        cluster = ""
    if not cluster and not Host.objects.exists():
        inventory.local_host()
    return list(Host.objects.filter(cluster=cluster))


class Follower:
    """Follows one host until ``stop`` is set; reconnects for as long as it takes."""

    def __init__(self, host_id: int, stop: threading.Event, *, keepalive: tuple[int, int] = (5, 3)):
        self.host_id, self.stop, self.keepalive = host_id, stop, keepalive
        self.events: queue.Queue[hypervisor.DomainEvent] = queue.Queue()
        self.connected = threading.Event()  # set while events are followed (tests wait on it)
        self.connections = 0

    def run(self) -> None:
        delay = RETRY_FIRST
        try:
            while not self.stop.is_set():
                try:
                    self._follow()
                    delay = RETRY_FIRST
                except (hypervisor.HypervisorError, DatabaseError) as exc:
                    log.warning("live inventory of host %s: %s; reconnecting", self.host_id, exc)
                    close_old_connections()
                finally:
                    self.connected.clear()
                self.stop.wait(delay)
                delay = min(delay * 2, RETRY_MAX)
        finally:
            connection.close()

    def _follow(self) -> None:
        host = Host.objects.get(pk=self.host_id)
        self.events = queue.Queue()  # what the old connection queued is covered by the sync
        with (
            hypervisor.EventWatch(host.uri, self.events.put, keepalive=self.keepalive) as watch,
            hypervisor.session(host.uri) as hv,
        ):
            # subscribed first, then read everything: nothing falls between the two
            log.info("live inventory of %s: %s", host.name, inventory.sync_host(host).summary())
            self.connections += 1
            self.connected.set()
            while not self.stop.is_set() and not watch.closed.is_set():
                self._drain(host, hv)
            if watch.closed.is_set() and not self.stop.is_set():
                log.warning("live inventory of %s: connection to libvirtd lost", host.name)

    def _drain(self, host: Host, hv: hypervisor.Session) -> None:
        """Sync each domain named by the events waiting (a burst of them: once each)."""
        try:
            first = self.events.get(timeout=POLL)
        except queue.Empty:
            return
        pending = [first]
        while True:
            try:
                pending.append(self.events.get_nowait())
            except queue.Empty:
                break
        for uuid in dict.fromkeys(event.uuid for event in pending):
            outcome = inventory.sync_domain(host, uuid, hv)
            log.info("live inventory of %s: domain %s %s", host.name, uuid, outcome)


def follow(hosts: list[Host], stop: threading.Event) -> list[threading.Thread]:
    """Start one follower thread per host; they end when ``stop`` is set."""
    threads = []
    for host in hosts:
        follower = Follower(host.pk, stop)
        thread = threading.Thread(
            target=follower.run, name=f"live-inventory-{host.name}", daemon=True
        )
        thread.start()
        threads.append(thread)
    return threads
