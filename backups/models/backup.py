"""Published backups, the restores made from them and the prune lock that guards them."""

from django.conf import settings
from django.db import models
from django.db.models import Exists, OuterRef, Q
from django.urls import reverse
from django.utils import timezone

from .inventory import VirtualMachine
from .job import ACTIVE_STATUSES, BackupRun, Consistency, Job, Kind, RunStatus
from .policy import BackupPolicy, OffsiteRepository


class VerifyStatus(models.TextChoices):
    UNVERIFIED = "unverified"
    OK = "ok"
    CORRUPT = "corrupt"
    MISSING = "missing"


class BackupQuerySet(models.QuerySet):
    def published(self):
        """Backups whose directory is here (not pruned, not imported from offsite)."""
        return self.filter(pruned_at__isnull=True)

    def with_offsite(self):
        """Annotated ``offsite``: a succeeded copy in an offsite repository holds it (one
        that offsite retention forgot does not)."""
        copies = self.model.offsite_copies.rel.related_model.objects.filter(
            backup=OuterRef("pk"), status="succeeded", forgotten_at__isnull=True
        )
        return self.annotate(offsite=Exists(copies))

    def restorable(self):
        """Published here, or held offsite: what the backup lists show (with ``offsite``)."""
        return self.with_offsite().filter(Q(pruned_at__isnull=True) | Q(offsite=True))

    def retained_by(self, policy):
        """The backups whose retention ``policy`` decides; None: those without a policy
        (manual ones, and those of a deleted policy), kept by ``VMBACKUP_KEEP_MANUAL``."""
        return self.filter(policy__isnull=True) if policy is None else self.filter(policy=policy)


class Backup(models.Model):
    """A published backup directory; its ``backup.json`` is the source of truth on disk."""

    vm = models.ForeignKey(VirtualMachine, on_delete=models.CASCADE, related_name="backups")
    run = models.OneToOneField(
        BackupRun, null=True, blank=True, on_delete=models.SET_NULL, related_name="backup"
    )
    parent = models.ForeignKey(
        "self", null=True, blank=True, on_delete=models.PROTECT, related_name="children"
    )
    policy = models.ForeignKey(
        BackupPolicy,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="backups",
        help_text=(
            "the policy whose retention owns this backup "
            "(none: VMBACKUP_KEEP_MANUAL keeps the newest of each VM)"
        ),
    )
    path = models.CharField(max_length=1024, unique=True)
    created_at = models.DateTimeField(default=timezone.now, db_index=True)
    kind = models.CharField(max_length=16, choices=Kind.choices, default=Kind.FULL)
    method = models.CharField(max_length=16, blank=True)
    consistency = models.CharField(max_length=24, choices=Consistency.choices, blank=True)
    checkpoint = models.CharField(max_length=200, blank=True)
    checkpoint_xml = models.TextField(blank=True)
    size_bytes = models.BigIntegerField(default=0)
    manifest = models.JSONField(default=dict, blank=True)
    protected = models.BooleanField(default=False)
    verify_status = models.CharField(
        max_length=16, choices=VerifyStatus.choices, default=VerifyStatus.UNVERIFIED
    )
    verified_at = models.DateTimeField(null=True, blank=True)
    verify_error = models.TextField(blank=True)
    verified_files = models.JSONField(
        default=dict,
        blank=True,
        help_text="the files' fingerprints (archive.fingerprint) when it was last verified "
        "ok: unchanged since, a copy made soon after need not hash them again",
    )
    verify_queued_at = models.DateTimeField(
        null=True, blank=True, help_text="a verification is queued or running since then"
    )
    pruned_at = models.DateTimeField(
        null=True,
        blank=True,
        help_text="its directory is gone from here since (pruned, or imported)",
    )
    offsite_only = models.BooleanField(
        default=False,
        help_text="imported from an offsite repository: never had a directory here (``path`` "
        "is where it would be); restored from its offsite copy",
    )

    objects = BackupQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at", "-id"]
        permissions = [
            ("restore_backup", "Can restore backups"),
            ("restore_in_place", "Can restore backups over their VM's own disks"),
            ("verify_backup", "Can verify backups"),
        ]
        indexes = [models.Index(fields=["vm", "-created_at"], name="backup_vm_recent")]

    def __str__(self):
        return f"{self.vm} @ {self.created_at:%Y-%m-%d %H:%M}"

    def get_absolute_url(self):
        return reverse("backup_detail", args=[self.pk])

    @property
    def is_local(self) -> bool:
        """Its directory is here (the offsite side needs a query: ``with_offsite``)."""
        return self.pruned_at is None

    def mark_verified(self, ok: bool, error: str = "", files: dict | None = None) -> None:
        """``files``: the fingerprint taken before the files were read and found the same
        after (``archive.fingerprint``); none when the check read it otherwise."""
        self.verify_status = VerifyStatus.OK if ok else VerifyStatus.CORRUPT
        self.verify_error = error
        self.verified_at = timezone.now()
        self.verified_files = (files or {}) if ok else {}
        fields = ["verify_status", "verify_error", "verified_at", "verified_files"]
        self.save(update_fields=fields)

    def verified_unchanged(self, files: dict, within: float) -> bool:
        """Verified ok at most ``within`` seconds ago, and its files (``files``: a
        fingerprint taken now) are the very ones that were read then."""
        if self.verify_status != VerifyStatus.OK or self.verified_at is None or not files:
            return False
        age = (timezone.now() - self.verified_at).total_seconds()
        return 0 <= age <= within and self.verified_files == files


class RestoreMode(models.TextChoices):
    NEW = "new", "as a new domain"
    IN_PLACE = "in-place", "in place, over the VM's own disks"
    INSTANT = "instant", "instantly, as a new domain running from the backup"
    DISK = "disk", "one disk, as a file"


class RestoreQuerySet(models.QuerySet):
    def pinning(self, backup: Backup):
        """Active instant restores that read ``backup`` (their backup or one it builds on):
        while one runs, its domain reads the chain, so retention must leave it alone."""
        chain = Backup.objects.filter(vm_id=backup.vm_id, created_at__gte=backup.created_at)
        ids = {b.pk: b.parent_id for b in chain.only("pk", "parent_id")}
        readers = set()
        for start in ids:
            node = start
            while node is not None and node not in readers:
                if node == backup.pk:
                    readers.add(start)
                    break
                node = ids.get(node)
        return self.filter(
            mode=RestoreMode.INSTANT, status__in=ACTIVE_STATUSES, backup_id__in=readers
        )


class Restore(Job):
    """Restoring one backup, as a new domain, in place over its (shut off) VM's disks,
    instantly (a new domain started on overlays over the backup, its data moved in while
    it runs; active until the domain no longer reads the backup), or one disk alone as a
    file (``disk``, written to ``root``/``name``).

    Uses the run states (queued -> running -> succeeded | failed | interrupted). Nothing it
    writes is visible as restored until the last step (see ``restore``); a failure at any
    step removes what this restore created, and an in-place restore keeps the disks it
    replaced beside them (``<disk>.before-restore-<id>``).
    """

    backup = models.ForeignKey(Backup, on_delete=models.CASCADE, related_name="restores")
    vm = models.ForeignKey(
        VirtualMachine,
        on_delete=models.CASCADE,
        related_name="restores",
        help_text="the backup's VM (the one an in-place restore overwrites)",
    )
    mode = models.CharField(max_length=16, choices=RestoreMode.choices, default=RestoreMode.NEW)
    name = models.CharField(
        max_length=255, help_text="the new domain's name (in place: the VM's; disk: the file's)"
    )
    root = models.CharField(
        max_length=1024, blank=True, help_text="restore root (mode disk: the file's directory)"
    )
    disk = models.CharField(max_length=64, blank=True, help_text="the disk restored (mode disk)")
    start = models.BooleanField(default=False, help_text="start the new domain afterwards")
    requested_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL
    )
    step = models.CharField(max_length=64, blank=True)
    path = models.CharField(max_length=1024, blank=True, help_text="directory of the disks")
    domain_uuid = models.CharField(max_length=36, blank=True)
    notes = models.JSONField(default=list, blank=True, help_text="what was not restored, why")
    repository = models.ForeignKey(
        OffsiteRepository,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="restores",
        help_text="restored from its copy in this offsite repository (blank: from the "
        "backup's directory here)",
    )

    objects = RestoreQuerySet.as_manager()

    class Meta(Job.Meta):
        ordering = ["-created_at", "-id"]
        constraints = [
            # Two restores must not race for the same new name.
            models.UniqueConstraint(
                fields=["name"],
                condition=Q(status__in=["queued", "running"], mode__in=["new", "instant"]),
                name="one_active_restore_per_name",
            ),
            # ... and two in-place restores must not race over one VM, even after a rename.
            models.UniqueConstraint(
                fields=["vm"],
                condition=Q(status__in=["queued", "running"], mode="in-place"),
                name="one_active_in_place_restore_per_vm",
            ),
        ]

    def __str__(self):
        return f"restore {self.pk} of backup {self.backup_id} as {self.name} ({self.status})"

    def save(self, *args, **kwargs):
        if self.vm_id is None and self.backup_id is not None:  # always the backup's VM
            self.vm_id = Backup.objects.values_list("vm_id", flat=True).get(pk=self.backup_id)
        super().save(*args, **kwargs)

    def get_absolute_url(self):
        return reverse("restore_detail", args=[self.pk])

    def requeue(self) -> bool:
        """running -> queued, for a worker to take over a dead one's instant restore (its
        domain runs on; the journal says how far it got). False if it ended meanwhile."""
        return bool(
            type(self)
            .objects.filter(pk=self.pk, status=RunStatus.RUNNING)
            .update(status=RunStatus.QUEUED, worker="")
        )


class PruneLock(models.Model):
    """Held by ``vmbackup_prune`` while it folds and deletes one VM's backups.

    A backup run holds its VM through the one-active-run constraint; a manual prune holds it
    through this row. Each side writes its own marker first and then looks for the other's,
    so of two that start together at least one sees the other and stands back.
    """

    vm = models.OneToOneField(VirtualMachine, on_delete=models.CASCADE, related_name="+")
    holder = models.CharField(max_length=100, help_text="host:pid of the pruning process")
    since = models.DateTimeField(default=timezone.now)

    def __str__(self):
        return f"prune lock on {self.vm} by {self.holder}"
