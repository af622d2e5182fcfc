"""Tell someone when a backup did not succeed: nobody reads dashboards at 02:00.

A failed or interrupted run of any trigger is an alert (``alerts``): mailed once, after the
transaction that ended the run commits, to the policy's ``notify_to`` — a run without a
policy (or a policy without recipients) to ``VMBACKUP_NOTIFY_TO``. Mail goes through
Django's email settings (``EMAIL_*`` in README's table). A failure to send is journaled on
the run and logged; it never changes the run's outcome.
"""

import logging

from django.conf import settings
from django.core.mail import send_mail

from . import alerts
from .models import Alert, AlertKind, BackupRun

log = logging.getLogger(__name__)


def recipients(run: BackupRun) -> list[str]:
    return alerts.recipients([run.policy])


def message(run: BackupRun) -> tuple[str, list[str]]:
    subject = f"[vmbackup] backup of {run.vm.name} {run.status}"
    lines = [
        f"Backup run {run.pk} of {run.vm.name} on {run.vm.host.name}: {run.status}.",
        f"Policy: {run.policy}" if run.policy else f"Trigger: {run.trigger} (no policy)",
        f"Method: {run.method or run.method_requested}",
        f"Reason: {run.error}" if run.error else "",
        f"Started: {run.started_at:%Y-%m-%d %H:%M:%S %Z}" if run.started_at else "",
        f"Details: {alerts.link(run.get_absolute_url())}" if settings.VMBACKUP_URL else "",
    ]
    return subject, lines


def run_finished(run: BackupRun) -> None:
    """A run that failed or was interrupted raises its alert (once, whoever calls)."""
    if run.status not in ("failed", "interrupted"):
        return
    subject, lines = message(run)
    alerts.raise_alert(
        AlertKind.RUN_FAILED,
        f"run:{run.pk}",
        vm=run.vm,
        subject=subject,
        lines=lines,
        to=recipients(run),
        then=lambda alert: _journal(run, alert),
    )


def _journal(run: BackupRun, alert) -> None:
    if alert.mail_error:
        run.log("notify-failed", error=alert.mail_error)
    elif alert.mailed_at:
        run.log("notified", to=alerts.addresses(alert.recipients))


def prune_refused(vm, policy, reason: str) -> None:
    """Retention refused to fold into a backup whose chain failed verification: the chain
    stays as it is, and someone should look (restore another point, re-run a full)."""
    to = [e.strip() for e in (policy.notify_to if policy else "").split(",") if e.strip()]
    if not to:
        return
    subject = f"[vmbackup] retention of {vm.name} stopped: a backup failed verification"
    try:
        send_mail(subject, reason + "\n", settings.DEFAULT_FROM_EMAIL, to, fail_silently=False)
    except Exception as exc:  # mail trouble must not hide the refusal, which is logged
        log.warning("could not mail %s about %s: %s", to, vm.name, exc)


def drill_finished(drill) -> None:
    """A failed or interrupted drill alerts (once per VM while it stays open: a backup
    that does not boot is one condition however often it is drilled); a passing drill of
    the VM resolves it."""
    key = f"drill:{drill.vm_id}"
    if drill.status == "succeeded":
        alerts.resolve(Alert.objects.filter(key=key))
        return
    if drill.status not in ("failed", "interrupted"):
        return
    vm = drill.vm
    alerts.raise_alert(
        AlertKind.DRILL_FAILED,
        key,
        vm=vm,
        subject=f"[vmbackup] restore drill of {vm.name} {drill.status}",
        lines=[
            f"Restore drill {drill.pk} of {vm.name} (backup {drill.backup_id}, "
            f"{drill.backup.created_at:%Y-%m-%d %H:%M %Z}) on {vm.host.name}: {drill.status}.",
            f"Reason: {drill.error}" if drill.error else "",
            "The backup did not prove it boots: restore another point, or look at the "
            "evidence (console lines below, the drill page).",
            f"Details: {alerts.link(drill.get_absolute_url())}" if settings.VMBACKUP_URL else "",
            "",
            drill.evidence_text[-2000:],
        ],
        to=alerts.recipients([drill.policy, *vm.policies.filter(enabled=True)]),
    )
