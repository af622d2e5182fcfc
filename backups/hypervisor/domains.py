"""Domains as plain data: listing, lookups, definition, start and stop, disk sources."""

from __future__ import annotations

import dataclasses
import time

import libvirt

from .. import domain_xml
from ..domain_xml import DomainInfo, parse_domain_xml
from .connection import HypervisorError

_STATES = {
    libvirt.VIR_DOMAIN_RUNNING: "running",
    libvirt.VIR_DOMAIN_BLOCKED: "running",
    libvirt.VIR_DOMAIN_PAUSED: "paused",
    libvirt.VIR_DOMAIN_SHUTDOWN: "running",
    libvirt.VIR_DOMAIN_SHUTOFF: "shutoff",
    libvirt.VIR_DOMAIN_CRASHED: "crashed",
    libvirt.VIR_DOMAIN_PMSUSPENDED: "paused",
}


def _capacity(dom, target: str) -> int | None:
    """Virtual size of a disk; None when libvirt cannot tell (e.g. an unreadable source)."""
    try:
        return dom.blockInfo(target)[0]
    except libvirt.libvirtError:
        return None


class Domains:
    """What a ``Session`` knows of domains (mixed into it: uses its ``_dom`` and ``_call``)."""

    def _info(self, dom, flags: int = 0) -> DomainInfo:
        state, _reason = dom.state()
        info = parse_domain_xml(
            dom.XMLDesc(flags),
            state=_STATES.get(state, "other"),
            persistent=bool(dom.isPersistent()),
        )
        disks = tuple(
            dataclasses.replace(d, capacity=_capacity(dom, d.target)) if d.source else d
            for d in info.disks
        )
        return dataclasses.replace(info, disks=disks)

    def domains(self) -> list[DomainInfo]:
        """Every domain (running and defined), with its current definition."""
        try:
            listed = self._conn.listAllDomains()
        except libvirt.libvirtError as exc:
            raise HypervisorError(f"cannot list domains on {self.uri}: {exc}") from exc
        found = []
        for dom in listed:
            try:
                found.append(self._info(dom))
            except libvirt.libvirtError as exc:
                # undefined between the listing and the read: it is simply gone
                if exc.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                    raise HypervisorError(f"cannot read domain on {self.uri}: {exc}") from exc
        return found

    def exists(self, uuid: str) -> bool:
        try:
            self._conn.lookupByUUIDString(uuid)
        except libvirt.libvirtError:
            return False
        return True

    def uuid_by_name(self, name: str) -> str | None:
        """The UUID of the domain called ``name``, or None when there is none."""
        try:
            return self._conn.lookupByName(name).UUIDString()
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return None
            raise HypervisorError(f"look up domain {name}: {exc}") from exc

    def domain(self, uuid: str) -> DomainInfo:
        try:
            return self._info(self._dom(uuid))
        except libvirt.libvirtError as exc:
            raise HypervisorError(f"cannot read domain {uuid}: {exc}") from exc

    def find(self, uuid: str) -> DomainInfo | None:
        """The domain, or None when libvirt does not know it (an event's domain undefined
        meanwhile, a transient one stopped); any other failure raises."""
        try:
            return self._info(self._conn.lookupByUUIDString(uuid))
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return None
            raise HypervisorError(f"cannot read domain {uuid}: {exc}") from exc

    def inactive_xml(self, uuid: str) -> str:
        """The persistent definition (what a restore should define), secure parts included."""
        dom = self._dom(uuid)
        flags = libvirt.VIR_DOMAIN_XML_SECURE
        if dom.isPersistent():
            flags |= libvirt.VIR_DOMAIN_XML_INACTIVE
        return self._call(dom.XMLDesc, flags, doing="read definition")

    # -- lifecycle -------------------------------------------------------------------------
    def define(self, xml: str) -> str:
        """Define a domain; returns its UUID."""
        dom = self._call(self._conn.defineXML, xml, doing="define domain")
        return dom.UUIDString()

    def start(self, uuid: str, *, paused: bool = False) -> None:
        flags = libvirt.VIR_DOMAIN_START_PAUSED if paused else 0
        self._call(self._dom(uuid).createWithFlags, flags, doing="start domain")

    def shutdown(self, uuid: str) -> None:
        """Ask the guest to shut down (guest agent, else ACPI button); returns at once."""
        flags = libvirt.VIR_DOMAIN_SHUTDOWN_GUEST_AGENT | libvirt.VIR_DOMAIN_SHUTDOWN_ACPI_POWER_BTN
        self._call(self._dom(uuid).shutdownFlags, flags, doing="shut down domain")

    def destroy(self, uuid: str) -> None:
        self._call(self._dom(uuid).destroy, doing="force off domain")

    def undefine(self, uuid: str) -> None:
        """Undefine with everything libvirt keeps beside the definition (metadata only)."""
        dom = self._dom(uuid)
        flags = (
            libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
            | libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA
            | libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
            | libvirt.VIR_DOMAIN_UNDEFINE_NVRAM
        )
        self._call(dom.undefineFlags, flags, doing="undefine domain")

    def wait_state(self, uuid: str, state: str, timeout: float, interval: float = 0.5) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.domain(uuid).state == state:
                return True
            time.sleep(interval)
        return self.domain(uuid).state == state

    # -- disk sources ----------------------------------------------------------------------------
    def disk_source(self, uuid: str, target: str, *, inactive: bool = False) -> str | None:
        dom = self._dom(uuid)
        if inactive and not dom.isPersistent():
            return None
        flags = libvirt.VIR_DOMAIN_XML_INACTIVE if inactive else 0
        info = parse_domain_xml(self._call(dom.XMLDesc, flags, doing="read definition"))
        return next((d.source for d in info.disks if d.target == target), None)

    def sources_in_use(self, uuid: str) -> set[str]:
        """Every disk source of the live and the persistent definition."""
        dom = self._dom(uuid)
        flags = [0, libvirt.VIR_DOMAIN_XML_INACTIVE] if dom.isPersistent() else [0]
        sources = set()
        for flag in flags:
            xml = self._call(dom.XMLDesc, flag, doing="read definition")
            sources |= {d.source for d in parse_domain_xml(xml).disks if d.source}
        return sources

    def set_disk_source(self, uuid: str, target: str, path: str, fmt: str) -> None:
        """Point a disk of the persistent definition at ``path`` (after an offline commit)."""
        dom = self._dom(uuid)
        xml = self._call(
            dom.XMLDesc,
            libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE,
            doing="read definition",
        )
        new_xml = domain_xml.with_disk_source(xml, target, path, fmt)
        self._call(self._conn.defineXML, new_xml, doing="redefine domain")
