"""Hosts, their VMs and the VMs' disks, as the last sync saw them."""

from django.db import models
from django.urls import reverse
from django.utils import timezone

from .. import uris
from ..validators import (
    validate_libvirt_uri,
)


class Host(models.Model):
    """A libvirt connection; one django-q2 cluster per host runs its backups."""

    name = models.CharField(max_length=100, unique=True)
    uri = models.CharField(
        max_length=255,
        default="qemu:///system",
        validators=[validate_libvirt_uri],
        help_text=uris.HELP,
    )
    cluster = models.CharField(
        max_length=64, blank=True, help_text="django-q2 cluster that runs jobs for this host"
    )
    last_sync_at = models.DateTimeField(null=True, blank=True)
    last_sync_error = models.TextField(blank=True)
    # what reconcile found on this host that another installation (or an older version)
    # left: reported here, never touched
    foreign_artifacts = models.JSONField(default=list, blank=True)
    foreign_checked_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["name"]

    def __str__(self):
        return self.name

    def get_absolute_url(self):
        return reverse("host_detail", args=[self.pk])


class VmState(models.TextChoices):
    RUNNING = "running"
    PAUSED = "paused"
    SHUTOFF = "shutoff"
    CRASHED = "crashed"
    OTHER = "other"


class VirtualMachineQuerySet(models.QuerySet):
    def present(self):
        """Domains libvirt still knows; vanished ones stay for their history."""
        return self.filter(gone_at__isnull=True)


class VirtualMachine(models.Model):
    """A libvirt domain, followed by UUID so that renames keep their history."""

    host = models.ForeignKey(Host, on_delete=models.PROTECT, related_name="vms")
    uuid = models.UUIDField()
    name = models.CharField(max_length=200)
    state = models.CharField(max_length=16, choices=VmState.choices, default=VmState.OTHER)
    persistent = models.BooleanField(default=True)
    loader = models.CharField(max_length=1024, blank=True)
    nvram = models.CharField(max_length=1024, blank=True)
    has_tpm = models.BooleanField(default=False)
    has_agent_channel = models.BooleanField(default=False)
    domain_xml = models.TextField(blank=True)
    first_seen_at = models.DateTimeField(default=timezone.now)
    last_seen_at = models.DateTimeField(default=timezone.now)
    gone_at = models.DateTimeField(null=True, blank=True)
    offsite_only = models.BooleanField(
        default=False,
        help_text="known only from an offsite repository (imported after a disaster): no "
        "domain of this UUID was seen on its host since; its backups restore as new domains",
    )

    objects = VirtualMachineQuerySet.as_manager()

    class Meta:
        ordering = ["name"]
        constraints = [
            models.UniqueConstraint(fields=["host", "uuid"], name="vm_unique_uuid_per_host")
        ]

    def __str__(self):
        return self.name

    def get_absolute_url(self):
        return reverse("vm_detail", args=[self.pk])


class DiskDevice(models.TextChoices):
    DISK = "disk"
    CDROM = "cdrom"
    FLOPPY = "floppy"
    LUN = "lun"


class Disk(models.Model):
    vm = models.ForeignKey(VirtualMachine, on_delete=models.CASCADE, related_name="disks")
    target = models.CharField(max_length=32)
    device = models.CharField(max_length=16, choices=DiskDevice.choices, default=DiskDevice.DISK)
    source_type = models.CharField(max_length=16, blank=True)
    source = models.CharField(max_length=1024, blank=True)
    format = models.CharField(max_length=16, blank=True)
    bus = models.CharField(max_length=16, blank=True)
    readonly = models.BooleanField(default=False)
    shareable = models.BooleanField(default=False)
    virtual_size = models.BigIntegerField(null=True, blank=True)

    class Meta:
        ordering = ["target"]
        constraints = [
            models.UniqueConstraint(fields=["vm", "target"], name="disk_unique_target_per_vm")
        ]

    def __str__(self):
        return f"{self.target} ({self.source or '-'})"
