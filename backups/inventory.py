"""Keep the inventory in step with libvirt.

Domains are followed by UUID: a rename updates the name, a vanished domain is marked gone
(its backups and runs are history we never delete silently), a domain that comes back with
the same UUID is present again. A restore drill's sandbox (``vmbackup-drill-…``) is not a
VM: it is never listed.
"""

from dataclasses import dataclass, field

from django.conf import settings
from django.db import IntegrityError, transaction
from django.utils import timezone

from . import hypervisor, site
from .models import Disk, Host, VirtualMachine


@dataclass
class SyncResult:
    added: list[str] = field(default_factory=list)
    renamed: list[tuple[str, str]] = field(default_factory=list)
    gone: list[str] = field(default_factory=list)
    returned: list[str] = field(default_factory=list)
    seen: int = 0

    def summary(self) -> str:
        parts = [f"{self.seen} domains"]
        if self.added:
            parts.append("added: " + ", ".join(self.added))
        if self.renamed:
            parts.append("renamed: " + ", ".join(f"{a} -> {b}" for a, b in self.renamed))
        if self.gone:
            parts.append("gone: " + ", ".join(self.gone))
        if self.returned:
            parts.append("back: " + ", ".join(self.returned))
        return "; ".join(parts)


def local_host() -> Host:
    """The host of ``VMBACKUP_LIBVIRT_URI``, created on first use."""
    host, _ = Host.objects.get_or_create(
        uri=settings.VMBACKUP_LIBVIRT_URI,
        defaults={"name": "local"},
    )
    return host


def sync_host(host: Host) -> SyncResult:
    """Read every domain of ``host`` and update our rows; records the error on failure."""
    try:
        with hypervisor.session(host.uri) as hv:
            domains = hv.domains()
    except hypervisor.HypervisorError as exc:
        host.last_sync_error = str(exc)
        host.save(update_fields=["last_sync_error"])
        raise
    with transaction.atomic():
        result = _apply(host, domains)
        host.last_sync_at = timezone.now()
        host.last_sync_error = ""
        host.save(update_fields=["last_sync_at", "last_sync_error"])
    return result


def sync_domain(host: Host, uuid: str, hv: hypervisor.Session) -> str:
    """Bring one domain's row up to date (an event named it): updated, added, or marked gone.

    Returns what happened ("updated", "added", "gone", "unknown"). A full sync may create
    the same row at the same moment: the unique (host, uuid) constraint makes one of the two
    fail, and the loser reads the winner's row and updates it.
    """
    info = hv.find(uuid)
    for attempt in range(2):
        try:
            with transaction.atomic():
                return _apply_one(host, uuid, info)
        except IntegrityError:
            if attempt:
                raise
    raise AssertionError("unreachable")


def _apply_one(host: Host, uuid: str, info: hypervisor.DomainInfo | None) -> str:
    now = timezone.now()
    if info is not None and site.is_drill_name(info.name):
        return "ignored"  # a restore drill's sandbox, not a VM
    vm = VirtualMachine.objects.select_for_update().filter(host=host, uuid=uuid).first()
    if info is None:
        if vm is None or vm.gone_at is not None:
            return "unknown"
        vm.gone_at = now
        vm.save(update_fields=["gone_at"])
        return "gone"
    outcome = "updated"
    if vm is None:
        vm, outcome = VirtualMachine(host=host, uuid=uuid, first_seen_at=now), "added"
    update_vm(vm, info, now)
    return outcome


def _apply(host: Host, domains: list[hypervisor.DomainInfo]) -> SyncResult:
    domains = [d for d in domains if not site.is_drill_name(d.name)]  # drills' sandboxes
    result = SyncResult(seen=len(domains))
    now = timezone.now()
    known = {str(vm.uuid): vm for vm in host.vms.all()}
    for info in domains:
        vm = known.pop(info.uuid, None)
        if vm is None:
            vm = VirtualMachine(host=host, uuid=info.uuid, first_seen_at=now)
            result.added.append(info.name)
        else:
            if vm.name != info.name:
                result.renamed.append((vm.name, info.name))
            if vm.gone_at is not None:
                result.returned.append(info.name)
        update_vm(vm, info, now)
    for vm in known.values():
        if vm.gone_at is None:
            vm.gone_at = now
            vm.save(update_fields=["gone_at"])
            result.gone.append(vm.name)
    return result


def update_vm(vm: VirtualMachine, info: hypervisor.DomainInfo, now=None) -> VirtualMachine:
    """Copy one domain's facts onto its row and replace its disks."""
    now = now or timezone.now()
    vm.name = info.name
    vm.state = info.state
    vm.persistent = info.persistent
    vm.loader = info.loader
    vm.nvram = info.nvram
    vm.has_tpm = info.tpm is not None
    vm.has_agent_channel = info.has_agent_channel
    vm.domain_xml = info.xml
    vm.last_seen_at = now
    vm.gone_at = None
    vm.offsite_only = False  # a domain of this UUID is on the host again
    vm.save()
    vm.disks.all().delete()
    Disk.objects.bulk_create(
        Disk(
            vm=vm,
            target=d.target,
            device=d.device,
            source_type=d.source_type,
            source=d.source,
            format=d.format,
            bus=d.bus,
            readonly=d.readonly,
            shareable=d.shareable,
            virtual_size=d.capacity,
        )
        for d in info.disks
    )
    return vm
