"""What to back up, how, when, how long to keep it, and where to copy it offsite."""

from django.conf import settings
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models
from django.utils import timezone

from ..retention import rules as retention_rules
from ..validators import (
    validate_backup_root,
    validate_console_pattern,
    validate_cron,
    validate_drill_command,
    validate_password_file,
    validate_restic_url,
)
from .inventory import VirtualMachine


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


class OffsiteRepository(models.Model):
    """A restic repository that backups are copied to (encrypted, deduplicated).

    Only where it is and how to open it: the password stays in a file on the worker hosts
    (``password_file``), never here. Copies run on the cluster of the backup's host (where
    its files are, like its runs); this repository's own jobs — init, check — run on
    ``cluster``. ``probe_*`` is what the last init or probe found, ``check_*`` the last
    ``restic check``."""

    name = models.CharField(max_length=100, unique=True)
    url = models.CharField(
        max_length=1024,
        validators=[validate_restic_url],
        help_text="restic repository: an absolute path, or sftp:, rest:, s3:, b2:, azure:, "
        "gs:, swift: (as restic -r takes it)",
    )
    password_file = models.CharField(
        max_length=1024,
        validators=[validate_password_file],
        help_text="absolute path of the file holding the repository's password, on every "
        "worker host that copies (mode 0600); the password itself is never stored here",
    )
    enabled = models.BooleanField(default=True, help_text="disabled: no new copies are made")
    cluster = models.CharField(
        max_length=64,
        blank=True,
        help_text="django-q2 cluster that runs this repository's init and check (blank: the "
        "default one); copies run on the cluster of the backup's host",
    )
    created_at = models.DateTimeField(default=timezone.now)
    probed_at = models.DateTimeField(null=True, blank=True)
    probe_state = models.CharField(
        max_length=32, blank=True, help_text="ok, no-repository, wrong-password, unreachable…"
    )
    probe_message = models.TextField(blank=True)
    checked_at = models.DateTimeField(null=True, blank=True)
    check_ok = models.BooleanField(null=True, blank=True)
    check_subset = models.CharField(max_length=32, blank=True, help_text="data read by the check")
    check_message = models.TextField(blank=True)
    prune_queued_at = models.DateTimeField(
        null=True, blank=True, help_text="an offsite prune of it is queued since then"
    )
    prune_holder = models.CharField(
        max_length=100, blank=True, help_text="host:pid of the offsite prune running now"
    )
    prune_since = models.DateTimeField(null=True, blank=True)
    pruned_at = models.DateTimeField(null=True, blank=True)
    prune_state = models.CharField(
        max_length=32, blank=True, help_text="ok, append-only, locked, failed…"
    )
    prune_message = models.TextField(blank=True)

    class Meta:
        ordering = ["name"]
        verbose_name_plural = "offsite repositories"
        permissions = [("init_repository", "Can initialize offsite repositories")]

    def __str__(self):
        return self.name

    def record_probe(self, state: str, message: str) -> None:
        self.probed_at, self.probe_state, self.probe_message = timezone.now(), state, message
        self.save(update_fields=["probed_at", "probe_state", "probe_message"])

    def record_check(self, ok: bool, subset: str, message: str) -> None:
        self.checked_at, self.check_ok = timezone.now(), ok
        self.check_subset, self.check_message = subset, message
        self.save(update_fields=["checked_at", "check_ok", "check_subset", "check_message"])

    def claim_prune(self, holder: str, stale_before) -> bool:
        """One offsite prune per repository at a time: taken when nobody holds it, or when
        its holder started before ``stale_before`` (a prune that died holding it)."""
        free = models.Q(prune_holder="") | models.Q(prune_since__lt=stale_before)
        now = timezone.now()
        taken = (
            type(self)
            .objects.filter(free, pk=self.pk)
            .update(prune_holder=holder, prune_since=now, prune_queued_at=None)
        )
        if taken:
            self.prune_holder, self.prune_since, self.prune_queued_at = holder, now, None
        return bool(taken)

    def release_prune(self, holder: str, state: str, message: str) -> None:
        """The prune's outcome, recorded by its holder only."""
        now = timezone.now()
        type(self).objects.filter(pk=self.pk, prune_holder=holder).update(
            prune_holder="", pruned_at=now, prune_state=state, prune_message=message
        )
        self.prune_holder, self.pruned_at = "", now
        self.prune_state, self.prune_message = state, message


class BackupPolicy(models.Model):
    """What to back up, when, how, and how long to keep it (here and offsite)."""

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
    offsite = models.ForeignKey(
        OffsiteRepository,
        null=True,
        blank=True,
        on_delete=models.PROTECT,
        related_name="policies",
        help_text="copy each backup there once it is published (and verified)",
    )
    offsite_keep_last = models.PositiveIntegerField(default=7)
    offsite_keep_hourly = models.PositiveIntegerField(default=0)
    offsite_keep_daily = models.PositiveIntegerField(default=7)
    offsite_keep_weekly = models.PositiveIntegerField(default=4)
    offsite_keep_monthly = models.PositiveIntegerField(default=12)
    offsite_keep_yearly = models.PositiveIntegerField(default=0)
    notify_to = models.CharField(max_length=500, blank=True, help_text="emails, comma-separated")
    stale_after_hours = models.PositiveIntegerField(
        null=True,
        blank=True,
        help_text="alert when a VM's last good backup is older (blank: VMBACKUP_STALE_HOURS)",
    )

    drill_schedule = models.CharField(
        max_length=100,
        blank=True,
        validators=[validate_cron],
        help_text="cron of restore drills: each VM's newest backup booted in a sandbox and "
        "proven alive; blank: no scheduled drills",
    )
    drill_timeout = models.PositiveIntegerField(
        default=300,
        validators=[MinValueValidator(10), MaxValueValidator(3600)],
        help_text="seconds a drill's sandbox has to show a sign of life after it starts",
    )
    drill_command = models.CharField(
        max_length=500,
        blank=True,
        validators=[validate_drill_command],
        help_text="a drill also runs this in the guest through the agent (guest-exec, no "
        "shell; absolute path first) and needs exit code 0, e.g. /usr/bin/systemctl "
        "is-active nginx",
    )
    drill_console_pattern = models.CharField(
        max_length=200,
        blank=True,
        validators=[validate_console_pattern],
        help_text="a drill also needs a serial console line matching this regular expression "
        "(alone, for guests without the agent: then no guest-ping is asked), e.g. login:",
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

    OFFSITE_KEEP_FIELDS = tuple(f"offsite_{name}" for name in KEEP_FIELDS)

    @property
    def root(self) -> str:
        return self.destination or settings.VMBACKUP_ROOT

    def offsite_retention_rules(self) -> retention_rules.Policy:
        """The offsite_keep_* counts, for the copies in ``offsite`` (its own retention:
        e.g. 12 monthly there while 7 daily are kept here)."""
        return retention_rules.Policy(
            **{name: getattr(self, f"offsite_{name}") or 0 for name in self.KEEP_FIELDS}
        )

    def retention_rules(self) -> retention_rules.Policy:
        """The keep_* counts as the retention engine takes them (prune, the preview)."""
        return retention_rules.Policy(
            **{name: getattr(self, name) or 0 for name in self.KEEP_FIELDS}
        )

    @staticmethod
    def schedule_name_of(policy_id: int) -> str:
        """The django-q2 Schedule that runs a policy is named after it."""
        return f"policy-{policy_id}"

    @staticmethod
    def drill_schedule_name_of(policy_id: int) -> str:
        """The django-q2 Schedule of a policy's restore drills."""
        return f"policy-{policy_id}-drill"

    @property
    def excluded_targets(self) -> set[str]:
        return {t.strip() for t in self.exclude_disks.split(",") if t.strip()}
