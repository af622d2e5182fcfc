"""The lifecycle every long job shares (claim, journal, heartbeat, cancel, finish) and
the backup run, its first user."""

from django.conf import settings
from django.db import models
from django.db.models import Q
from django.urls import reverse
from django.utils import timezone

from .inventory import VirtualMachine
from .policy import BackupPolicy, Method


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
