"""Tell a policy's recipients when a backup did not succeed: nobody reads dashboards at 02:00.

Mail goes through Django's email settings (``EMAIL_*`` in README's table). A failure to send
is journaled on the run and logged; it never changes the run's outcome.
"""

import logging

from django.conf import settings
from django.core.mail import send_mail

from .models import BackupRun

log = logging.getLogger(__name__)


def recipients(run: BackupRun) -> list[str]:
    if run.policy is None:
        return []
    return [e.strip() for e in run.policy.notify_to.split(",") if e.strip()]


def message(run: BackupRun) -> tuple[str, str]:
    subject = f"[vmbackup] backup of {run.vm.name} {run.status}"
    lines = [
        f"Backup run {run.pk} of {run.vm.name} on {run.vm.host.name}: {run.status}.",
        f"Policy: {run.policy}" if run.policy else "",
        f"Method: {run.method or run.method_requested}",
        f"Reason: {run.error}" if run.error else "",
        f"Started: {run.started_at:%Y-%m-%d %H:%M:%S %Z}" if run.started_at else "",
        f"Details: {settings.VMBACKUP_URL.rstrip('/')}{run.get_absolute_url()}"
        if settings.VMBACKUP_URL
        else "",
    ]
    return subject, "\n".join(line for line in lines if line) + "\n"


def run_finished(run: BackupRun) -> None:
    """Mail the policy's recipients about a run that failed or was interrupted."""
    to = recipients(run)
    if run.status not in ("failed", "interrupted") or not to:
        return
    subject, body = message(run)
    try:
        send_mail(subject, body, settings.DEFAULT_FROM_EMAIL, to, fail_silently=False)
        run.log("notified", to=to)
    except Exception as exc:  # mail trouble must not turn into a backup failure
        log.warning("could not mail %s about run %s: %s", to, run.pk, exc)
        run.log("notify-failed", error=str(exc))


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
