"""Copies of published backups in offsite (restic) repositories."""

from django.db import models
from django.db.models import Q
from django.urls import reverse

from .backup import Backup
from .inventory import VirtualMachine
from .job import ACTIVE_STATUSES, Job, RunStatus
from .policy import OffsiteRepository


class CopyTrigger(models.TextChoices):
    AFTER_BACKUP = "after-backup"  # its policy names the repository
    BUTTON = "button"
    ADMIN = "admin"
    COMMAND = "command"
    RETRY = "retry"  # reconcile, after the worker died mid-copy
    CHAIN = "chain"  # copied first, as the parent a requested incremental needs
    IMPORT = "import"  # found in the repository by ``vmbackup_offsite import``


class OffsiteCopyQuerySet(models.QuerySet):
    def active(self):
        return self.filter(status__in=ACTIVE_STATUSES)

    def succeeded(self):
        return self.filter(status=RunStatus.SUCCEEDED)

    def in_repository(self, repository):
        """The copies whose snapshot is in ``repository``: what a chain builds on there
        (succeeded, and not forgotten since by offsite retention or found gone)."""
        return self.succeeded().filter(repository=repository, forgotten_at__isnull=True)


class OffsiteCopy(Job):
    """Copying one backup into one offsite repository as one restic snapshot.

    Uses the run states. One copy per VM is active at a time (the database says so); the
    parents an incremental needs there first are copied by the same job, each recorded as
    a copy of its own whose ``via`` is that job's row. restic writes a snapshot last: a
    copy that dies leaves none, and reconcile marks it interrupted and requeues it."""

    backup = models.ForeignKey(Backup, on_delete=models.CASCADE, related_name="offsite_copies")
    vm = models.ForeignKey(VirtualMachine, on_delete=models.CASCADE, related_name="offsite_copies")
    repository = models.ForeignKey(
        OffsiteRepository, on_delete=models.PROTECT, related_name="copies"
    )
    trigger = models.CharField(
        max_length=16, choices=CopyTrigger.choices, default=CopyTrigger.BUTTON
    )
    via = models.ForeignKey(
        "self",
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="links",
        help_text="the copy that sent this backup first, as a parent its backup needs",
    )
    attempt = models.PositiveSmallIntegerField(default=1)
    snapshot_id = models.CharField(max_length=64, blank=True)
    bytes_added = models.BigIntegerField(
        default=0, help_text="new data the repository stored (after deduplication)"
    )
    reason = models.CharField(
        max_length=32, blank=True, help_text="why it failed: wrong-password, unreachable…"
    )
    verified_at = models.DateTimeField(
        null=True, blank=True, help_text="the snapshot's listing matched the manifest then"
    )
    forgotten_at = models.DateTimeField(
        null=True,
        blank=True,
        help_text="its snapshot was forgotten by offsite retention (or found gone) then; "
        "the journal says why",
    )

    objects = OffsiteCopyQuerySet.as_manager()

    class Meta(Job.Meta):
        ordering = ["-created_at", "-id"]
        verbose_name_plural = "offsite copies"
        permissions = [("copy_offsite", "Can copy backups offsite")]
        indexes = [models.Index(fields=["backup", "repository", "status"], name="copy_lookup")]
        constraints = [
            models.UniqueConstraint(
                fields=["vm"],
                condition=Q(status__in=["queued", "running"], via__isnull=True),
                name="one_active_copy_per_vm",
            )
        ]

    def __str__(self):
        return f"copy {self.pk} of backup {self.backup_id} to {self.repository} ({self.status})"

    def get_absolute_url(self):
        return reverse("copy_detail", args=[self.pk])

    def save(self, *args, **kwargs):
        if self.vm_id is None and self.backup_id is not None:  # always the backup's VM
            self.vm_id = Backup.objects.values_list("vm_id", flat=True).get(pk=self.backup_id)
        super().save(*args, **kwargs)
