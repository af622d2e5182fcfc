"""State of the inventory, the policies and every backup run.

Models hold state only: no property talks to libvirt or the disk. The inventory is refreshed
by the sync job (``backups.inventory``), runs are advanced by ``backups.jobs``.
"""

from django.conf import settings
from django.db import models
from django.db.models import Q
from django.urls import reverse
from django.utils import timezone

from . import uris
from .retention import rules as retention_rules
from .validators import validate_backup_root, validate_cron, validate_libvirt_uri


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


class Method(models.TextChoices):
    AUTO = "auto"
    OFFLINE = "offline"
    PUSH = "push"
    SNAPSHOT = "snapshot"
    MEMORY = "memory"


class Compression(models.TextChoices):
    NONE = "none"
    ZLIB = "zlib"
    ZSTD = "zstd"


class BackupPolicy(models.Model):
    """What to back up, when, how, and how long to keep it."""

    name = models.CharField(max_length=100, unique=True)
    enabled = models.BooleanField(default=True)
    vms = models.ManyToManyField(VirtualMachine, related_name="policies", blank=True)
    schedule = models.CharField(
        max_length=100,
        blank=True,
        default="0 2 * * *",
        validators=[validate_cron],
        help_text="cron; blank: manual only",
    )
    method = models.CharField(max_length=16, choices=Method.choices, default=Method.AUTO)
    compression = models.CharField(
        max_length=8,
        choices=Compression.choices,
        default=Compression.NONE,
        help_text="qcow2 compression of every image, fulls and incrementals; zstd is the fast "
        "one (zlib costs several times its CPU), both cost CPU a plain copy does not",
    )
    exclude_disks = models.CharField(
        max_length=255, blank=True, help_text="comma-separated disk targets to skip"
    )
    shutdown_for_offline = models.BooleanField(
        default=False,
        help_text="offline method: shut a running VM down gracefully, back up, start it again",
    )
    verify_after = models.BooleanField(default=True)
    destination = models.CharField(
        max_length=1024,
        blank=True,
        validators=[validate_backup_root],
        help_text="one of the backup roots (VMBACKUP_ROOTS); blank: VMBACKUP_ROOT",
    )
    full_every = models.PositiveIntegerField(
        default=7, help_text="incremental chains: a full backup after this many incrementals"
    )
    keep_last = models.PositiveIntegerField(default=7)
    keep_hourly = models.PositiveIntegerField(default=0)
    keep_daily = models.PositiveIntegerField(default=7)
    keep_weekly = models.PositiveIntegerField(default=4)
    keep_monthly = models.PositiveIntegerField(default=6)
    keep_yearly = models.PositiveIntegerField(default=0)
    notify_to = models.CharField(max_length=500, blank=True, help_text="emails, comma-separated")
    stale_after_hours = models.PositiveIntegerField(
        null=True,
        blank=True,
        help_text="alert when a VM's last good backup is older (blank: VMBACKUP_STALE_HOURS)",
    )

    class Meta:
        ordering = ["name"]
        verbose_name_plural = "backup policies"

    def __str__(self):
        return self.name

    KEEP_FIELDS = (
        "keep_last",
        "keep_hourly",
        "keep_daily",
        "keep_weekly",
        "keep_monthly",
        "keep_yearly",
    )

    @property
    def root(self) -> str:
        return self.destination or settings.VMBACKUP_ROOT

    def retention_rules(self) -> retention_rules.Policy:
        """The keep_* counts as the retention engine takes them (prune, the preview)."""
        return retention_rules.Policy(
            **{name: getattr(self, name) or 0 for name in self.KEEP_FIELDS}
        )

    @staticmethod
    def schedule_name_of(policy_id: int) -> str:
        """The django-q2 Schedule that runs a policy is named after it."""
        return f"policy-{policy_id}"

    @property
    def excluded_targets(self) -> set[str]:
        return {t.strip() for t in self.exclude_disks.split(",") if t.strip()}


class RunStatus(models.TextChoices):
    """The run state machine.

    queued -> running -> succeeded | failed | interrupted | cancelled
    queued -> skipped (another run for the VM was active) | cancelled
    ``interrupted`` is set by reconcile when a worker died (stale heartbeat).
    """

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    INTERRUPTED = "interrupted"
    CANCELLED = "cancelled"
    SKIPPED = "skipped"


ACTIVE_STATUSES = (RunStatus.QUEUED, RunStatus.RUNNING)


class Trigger(models.TextChoices):
    SCHEDULE = "schedule"
    BUTTON = "button"
    ADMIN = "admin"
    COMMAND = "command"


class Consistency(models.TextChoices):
    OFFLINE = "offline"
    CRASH = "crash-consistent"
    FROZEN = "filesystem-frozen"
    MEMORY = "with-ram"


class Kind(models.TextChoices):
    FULL = "full"
    INCREMENTAL = "incremental"


class BackupRunQuerySet(models.QuerySet):
    def active(self):
        return self.filter(status__in=ACTIVE_STATUSES)


class Job(models.Model):
    """The lifecycle a backup run and a restore share, and the only place their status
    changes: claimed once (queued -> running; a second delivery of the task finds nothing),
    journaled before each side effect, beating while it works, cancelled by request, and
    finished once — the first outcome recorded stands (a run reconcile already ended keeps
    that outcome)."""

    status = models.CharField(max_length=16, choices=RunStatus.choices, default=RunStatus.QUEUED)
    created_at = models.DateTimeField(default=timezone.now, db_index=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    heartbeat_at = models.DateTimeField(null=True, blank=True)
    worker = models.CharField(max_length=100, blank=True, help_text="host:pid of the worker")
    bytes_done = models.BigIntegerField(default=0)
    bytes_total = models.BigIntegerField(default=0)
    journal = models.JSONField(default=list, blank=True)
    error = models.TextField(blank=True)
    cancel_requested = models.BooleanField(default=False)

    class Meta:
        abstract = True

    @property
    def is_finished(self) -> bool:
        return self.status not in ACTIVE_STATUSES

    @property
    def duration(self):
        if self.started_at and self.finished_at:
            return self.finished_at - self.started_at
        return None

    @classmethod
    def claim(cls, pk: int, holder: str) -> bool:
        """queued -> running for ``holder`` (``host:pid``); False when another delivery (or a
        cancel) got there first."""
        now = timezone.now()
        return bool(
            cls.objects.filter(pk=pk, status=RunStatus.QUEUED).update(
                status=RunStatus.RUNNING, started_at=now, heartbeat_at=now, worker=holder
            )
        )

    def log(self, step: str, **data) -> None:
        """Append a journal entry and save it *before* the side effect it announces."""
        entry = {"at": timezone.now().isoformat(), "step": step}
        entry.update(data)
        self.journal = [*self.journal, entry]
        self.heartbeat_at = timezone.now()
        self.save(update_fields=["journal", "heartbeat_at"])

    def beat(self, done: int | None = None, total: int | None = None) -> None:
        fields = ["heartbeat_at"]
        self.heartbeat_at = timezone.now()
        if done is not None:
            self.bytes_done = done
            fields.append("bytes_done")
        if total is not None:
            self.bytes_total = total
            fields.append("bytes_total")
        type(self).objects.filter(pk=self.pk).update(**{f: getattr(self, f) for f in fields})

    def request_cancel(self) -> None:
        """A queued job is cancelled at once; a running one is asked to stop at its next
        step (a restore past its point of no return finishes anyway)."""
        if not self.finish(RunStatus.CANCELLED, "cancelled by user", only=(RunStatus.QUEUED,)):
            type(self).objects.filter(pk=self.pk, status=RunStatus.RUNNING).update(
                cancel_requested=True
            )

    def finish(self, status: str, error: str = "", *, only=ACTIVE_STATUSES, **fields) -> bool:
        """End the job unless something else ended it first: the first outcome recorded
        stands. Returns whether this call recorded it."""
        now = timezone.now()
        done = (
            type(self)
            .objects.filter(pk=self.pk, status__in=only)
            .update(status=status, error=error, finished_at=now, **fields)
        )
        if done:
            self.status, self.error, self.finished_at = status, error, now
            for name, value in fields.items():
                setattr(self, name, value)
        else:
            self.refresh_from_db(fields=["status", "error", "finished_at", *fields])
        return bool(done)

    def mark_succeeded(self, **fields) -> bool:
        return self.finish(RunStatus.SUCCEEDED, **fields)

    def mark_failed(self, reason: str, **fields) -> bool:
        return self.finish(RunStatus.FAILED, reason, **fields)

    def mark_cancelled(self, reason: str = "cancelled by user", **fields) -> bool:
        return self.finish(RunStatus.CANCELLED, reason, **fields)

    def mark_interrupted(self, reason: str, *, only=ACTIVE_STATUSES, **fields) -> bool:
        return self.finish(RunStatus.INTERRUPTED, reason, only=only, **fields)


class BackupRun(Job):
    """One attempt to back up one VM; every outcome is recorded here as data."""

    vm = models.ForeignKey(VirtualMachine, on_delete=models.CASCADE, related_name="runs")
    policy = models.ForeignKey(
        BackupPolicy, null=True, blank=True, on_delete=models.SET_NULL, related_name="runs"
    )
    trigger = models.CharField(max_length=16, choices=Trigger.choices, default=Trigger.BUTTON)
    method_requested = models.CharField(max_length=16, choices=Method.choices, default=Method.AUTO)
    method = models.CharField(max_length=16, blank=True)
    method_reason = models.CharField(max_length=255, blank=True)
    kind = models.CharField(max_length=16, choices=Kind.choices, default=Kind.FULL)
    kind_reason = models.CharField(max_length=255, blank=True)
    consistency = models.CharField(max_length=24, choices=Consistency.choices, blank=True)
    bytes_written = models.BigIntegerField(default=0)
    # the SHA-256 pass over what was written: on big disks it outlasts the copy's end
    bytes_hashed = models.BigIntegerField(default=0)
    bytes_to_hash = models.BigIntegerField(default=0)
    staging_path = models.CharField(max_length=1024, blank=True)
    options = models.JSONField(
        default=dict, blank=True, help_text="per-run overrides, e.g. skip_space_check"
    )

    objects = BackupRunQuerySet.as_manager()

    class Meta(Job.Meta):
        ordering = ["-created_at", "-id"]
        permissions = [("run_backup", "Can start and cancel backups")]
        indexes = [models.Index(fields=["vm", "-created_at"], name="run_vm_recent")]
        constraints = [
            # One active run per VM, enforced where it cannot race: in the database.
            models.UniqueConstraint(
                fields=["vm"],
                condition=Q(status__in=["queued", "running"]),
                name="one_active_run_per_vm",
            )
        ]

    def __str__(self):
        return f"run {self.pk} of {self.vm} ({self.status})"

    def get_absolute_url(self):
        return reverse("run_detail", args=[self.pk])

    @property
    def root(self) -> str:
        """The backup root this run writes under: its policy's, else VMBACKUP_ROOT."""
        return self.policy.root if self.policy else settings.VMBACKUP_ROOT

    def hash_progress(self, hashed: int, to_hash: int) -> None:
        self.bytes_hashed, self.bytes_to_hash = hashed, to_hash
        self.heartbeat_at = timezone.now()
        self.save(update_fields=["bytes_hashed", "bytes_to_hash", "heartbeat_at"])


class VerifyStatus(models.TextChoices):
    UNVERIFIED = "unverified"
    OK = "ok"
    CORRUPT = "corrupt"
    MISSING = "missing"


class BackupQuerySet(models.QuerySet):
    def published(self):
        return self.filter(pruned_at__isnull=True)

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
    verify_queued_at = models.DateTimeField(
        null=True, blank=True, help_text="a verification is queued or running since then"
    )
    pruned_at = models.DateTimeField(null=True, blank=True)

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

    def mark_verified(self, ok: bool, error: str = "") -> None:
        self.verify_status = VerifyStatus.OK if ok else VerifyStatus.CORRUPT
        self.verify_error = error
        self.verified_at = timezone.now()
        self.save(update_fields=["verify_status", "verify_error", "verified_at"])


class RestoreMode(models.TextChoices):
    NEW = "new", "as a new domain"
    IN_PLACE = "in-place", "in place, over the VM's own disks"


class Restore(Job):
    """Restoring one backup, as a new domain or in place over its (shut off) VM's disks.

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
    name = models.CharField(max_length=255, help_text="the new domain's name (in place: the VM's)")
    root = models.CharField(max_length=1024, blank=True, help_text="restore root (mode new)")
    start = models.BooleanField(default=False, help_text="start the new domain afterwards")
    requested_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL
    )
    step = models.CharField(max_length=64, blank=True)
    path = models.CharField(max_length=1024, blank=True, help_text="directory of the disks")
    domain_uuid = models.CharField(max_length=36, blank=True)
    notes = models.JSONField(default=list, blank=True, help_text="what was not restored, why")

    class Meta(Job.Meta):
        ordering = ["-created_at", "-id"]
        constraints = [
            # Two restores must not race for the same new name.
            models.UniqueConstraint(
                fields=["name"],
                condition=Q(status__in=["queued", "running"], mode="new"),
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


class Installation(models.Model):
    """This installation's identity, generated once: every artifact a job leaves on a host
    while it runs (overlays, staging directories, checkpoints, sockets, fold journals) carries
    it, and reconcile acts only on artifacts bearing it. Another installation on the same
    libvirt host (a staging install, a test suite) has its own and is left alone."""

    site_id = models.CharField(max_length=16, unique=True)
    created_at = models.DateTimeField(default=timezone.now)

    def __str__(self):
        return self.site_id


class AlertKind(models.TextChoices):
    RUN_FAILED = "run-failed", "backup run failed"
    STALE = "stale", "last good backup too old"
    CORRUPT = "corrupt", "backup failed verification"
    NO_WORKER = "no-worker", "no live worker"
    RUN_WAITING = "run-waiting", "backup run waiting for a worker"


class AlertQuerySet(models.QuerySet):
    def open(self):
        return self.filter(resolved_at__isnull=True)

    def fired(self):
        """Alerts that count (and were mailed): a pending one waits out its grace period."""
        return self.filter(fired_at__isnull=False)


class Alert(models.Model):
    """Something someone should know, mailed once: one open alert per ``key`` (the database
    decides between two checks), so a second reconcile, verify or check pass finds it open
    and stays quiet. A condition that ends (a fresh backup, a worker back) resolves it; a
    later one is a new alert."""

    kind = models.CharField(max_length=16, choices=AlertKind.choices)
    key = models.CharField(max_length=200, help_text="what it is about, e.g. run:42, stale:7")
    vm = models.ForeignKey(
        VirtualMachine, null=True, blank=True, on_delete=models.SET_NULL, related_name="alerts"
    )
    about = models.CharField(max_length=200, help_text="the VM's name, or the cluster's")
    subject = models.CharField(max_length=255)
    body = models.TextField(blank=True)
    raised_at = models.DateTimeField(default=timezone.now)
    fired_at = models.DateTimeField(null=True, blank=True, help_text="counted and mailed since")
    resolved_at = models.DateTimeField(null=True, blank=True)
    recipients = models.CharField(max_length=1000, blank=True)
    mailed_at = models.DateTimeField(null=True, blank=True)
    mail_error = models.TextField(blank=True)

    objects = AlertQuerySet.as_manager()

    class Meta:
        ordering = ["-raised_at", "-id"]
        constraints = [
            models.UniqueConstraint(
                fields=["key"], condition=Q(resolved_at__isnull=True), name="one_open_alert_per_key"
            )
        ]

    def __str__(self):
        return self.subject
