"""Restore drills: a backup booted in a throw-away sandbox until it proves it is alive."""

from django.conf import settings
from django.db import IntegrityError, models, transaction
from django.db.models import Q
from django.urls import reverse

from .backup import Backup
from .inventory import Host, VirtualMachine
from .job import ACTIVE_STATUSES, Job, Trigger
from .policy import BackupPolicy


class DrillResult(models.TextChoices):
    """The verdict on the backup; blank when the drill could not give one (refused before
    the sandbox started, cancelled, interrupted)."""

    PASSED = "passed", "alive"
    FAILED = "failed", "no sign of life"


class DrillQuerySet(models.QuerySet):
    def active(self):
        return self.filter(status__in=ACTIVE_STATUSES)

    def judged(self):
        """Drills that reached a verdict (what the VM page, the overview and /metrics show)."""
        return self.exclude(result="")


class Drill(Job):
    """One restore drill: the backup's chain under qcow2 overlays in a scratch directory, a
    sandbox domain (new name, UUID and MACs, no network, no host devices) started from
    them, a wait for proof of life (guest-ping, a guest command, a console line), the
    evidence kept, then everything removed. The backup is never written.

    One drill per VM is active at a time, and one per host runs at a time (the database
    decides; a queued drill waits for the host's running one, which starts the next)."""

    backup = models.ForeignKey(Backup, on_delete=models.CASCADE, related_name="drills")
    vm = models.ForeignKey(VirtualMachine, on_delete=models.CASCADE, related_name="drills")
    host = models.ForeignKey(Host, on_delete=models.CASCADE, related_name="+")
    policy = models.ForeignKey(
        BackupPolicy, null=True, blank=True, on_delete=models.SET_NULL, related_name="drills"
    )
    trigger = models.CharField(max_length=16, choices=Trigger.choices, default=Trigger.BUTTON)
    requested_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL
    )
    step = models.CharField(max_length=64, blank=True)
    name = models.CharField(max_length=100, blank=True, help_text="the sandbox domain's name")
    domain_uuid = models.CharField(max_length=36, blank=True)
    scratch = models.CharField(max_length=1024, blank=True, help_text="overlays, console log")
    timeout_seconds = models.PositiveIntegerField(default=300)
    command = models.CharField(max_length=500, blank=True, help_text="run through guest-exec")
    console_pattern = models.CharField(max_length=200, blank=True)
    memory_mib = models.PositiveIntegerField(default=0, help_text="the sandbox's memory")
    result = models.CharField(max_length=8, choices=DrillResult.choices, blank=True)
    alive_after_seconds = models.FloatField(
        null=True, blank=True, help_text="time to alive (RTO): from the drill's start to proof"
    )
    proof = models.CharField(max_length=500, blank=True, help_text="what proved it alive")
    evidence_path = models.CharField(max_length=1024, blank=True, help_text="root's only")
    evidence_text = models.TextField(blank=True, help_text="the serial console's last lines")
    screenshot = models.BinaryField(null=True, blank=True, help_text="PNG, where it had graphics")

    objects = DrillQuerySet.as_manager()

    class Meta(Job.Meta):
        ordering = ["-created_at", "-id"]
        constraints = [
            models.UniqueConstraint(
                fields=["vm"],
                condition=Q(status__in=["queued", "running"]),
                name="one_active_drill_per_vm",
            ),
            # one sandbox per host at a time: the memory budget is per drill
            models.UniqueConstraint(
                fields=["host"], condition=Q(status="running"), name="one_running_drill_per_host"
            ),
        ]

    def __str__(self):
        return f"drill {self.pk} of backup {self.backup_id} ({self.status})"

    def save(self, *args, **kwargs):
        if self.vm_id is None and self.backup_id is not None:  # always the backup's VM
            self.vm_id = Backup.objects.values_list("vm_id", flat=True).get(pk=self.backup_id)
        if self.host_id is None and self.vm_id is not None:
            self.host_id = VirtualMachine.objects.values_list("host_id", flat=True).get(
                pk=self.vm_id
            )
        super().save(*args, **kwargs)

    def get_absolute_url(self):
        return reverse("drill_detail", args=[self.pk])

    @classmethod
    def claim(cls, pk: int, holder: str) -> bool:
        """As ``Job.claim``, and False while another drill runs on the same host (that one
        starts the next queued drill when it ends)."""
        try:
            with transaction.atomic():
                return super().claim(pk, holder)
        except IntegrityError:
            return False

    @property
    def passed(self) -> bool:
        return self.result == DrillResult.PASSED
