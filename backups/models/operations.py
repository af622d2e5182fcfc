"""This installation's identity and the alerts it sends."""

from django.db import models
from django.db.models import Q
from django.utils import timezone

from .inventory import VirtualMachine


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
    DRILL_FAILED = "drill-failed", "restore drill failed"
    OFFSITE_CHECK = "offsite-check", "offsite repository check failed"


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
