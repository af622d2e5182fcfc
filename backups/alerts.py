"""Alerts: tell someone before they need a restore, once per event.

Nobody reads dashboards at 02:00. A failed run (any trigger), a VM whose last good backup is
older than its window, a backup that verification found corrupt or missing, and a worker
cluster not heard from for ``VMBACKUP_WORKER_DOWN_MINUTES`` each become an ``Alert`` row.
One open alert per key (the database decides), so a second reconcile, verify or check pass
stays quiet; mail goes after the transaction commits, claimed once, and a failure to send is
recorded on the alert, never raised. Conditions that end resolve their alert; every alert is
also on ``/metrics``.

Recipients: the policy's ``notify_to``, else the site's ``VMBACKUP_NOTIFY_TO``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from datetime import datetime, timedelta

from django.conf import settings
from django.core.mail import send_mail
from django.db import IntegrityError, transaction
from django.db.models import Max, OuterRef, Subquery
from django.urls import reverse
from django.utils import timezone
from django_q.models import Task

from .models import (
    Alert,
    AlertKind,
    Backup,
    BackupPolicy,
    BackupRun,
    Host,
    OffsiteRepository,
    RunStatus,
    VerifyStatus,
    VirtualMachine,
)

log = logging.getLogger(__name__)


# --- recipients and links -----------------------------------------------------------------------


def addresses(value: str) -> list[str]:
    return [e.strip() for e in value.split(",") if e.strip()]


def recipients(policies: Iterable[BackupPolicy | None] = ()) -> list[str]:
    """The policies' ``notify_to`` (together), else the site-wide ``VMBACKUP_NOTIFY_TO``."""
    found = [e for p in policies if p is not None for e in addresses(p.notify_to)]
    return list(dict.fromkeys(found)) or list(settings.VMBACKUP_NOTIFY_TO)


def link(path: str) -> str:
    """``VMBACKUP_URL`` + path, or "" when the dashboard's address is not configured."""
    base = settings.VMBACKUP_URL.rstrip("/")
    return f"{base}{path}" if base else ""


# --- raising, mailing, resolving ----------------------------------------------------------------


def raise_alert(
    kind: str,
    key: str,
    *,
    subject: str,
    lines: Iterable[str],
    to: list[str],
    vm: VirtualMachine | None = None,
    about: str = "",
    fire: bool = True,
    then: Callable[[Alert], None] | None = None,
) -> Alert | None:
    """Record an alert unless one is open under ``key``; with ``fire`` it counts at once and
    is mailed after commit (``then`` runs after that attempt). None: already open."""
    if Alert.objects.open().filter(key=key).exists():
        return None
    now = timezone.now()
    try:
        with transaction.atomic():
            alert = Alert.objects.create(
                kind=kind,
                key=key,
                vm=vm,
                about=about or (vm.name if vm else ""),
                subject=subject,
                body="\n".join(line for line in lines if line) + "\n",
                fired_at=now if fire else None,
                recipients=", ".join(to),
            )
    except IntegrityError:  # another pass raised it meanwhile
        return None
    log.warning("alert: %s", subject)
    if fire:
        _mail_on_commit(alert, then)
    return alert


def _mail_on_commit(alert: Alert, then=None) -> None:
    def send():
        deliver(alert.pk)
        if then is not None:
            alert.refresh_from_db()
            then(alert)

    transaction.on_commit(send)


def deliver(alert_id: int) -> bool:
    """Mail one fired alert, once (claimed by setting ``mailed_at``); True when it was sent."""
    now = timezone.now()
    claimed = Alert.objects.filter(pk=alert_id, mailed_at=None, fired_at__isnull=False).update(
        mailed_at=now
    )
    if not claimed:
        return False
    alert = Alert.objects.get(pk=alert_id)
    to = addresses(alert.recipients)
    if not to:
        Alert.objects.filter(pk=alert_id).update(mail_error="no recipients configured")
        return False
    try:
        send_mail(alert.subject, alert.body, settings.DEFAULT_FROM_EMAIL, to, fail_silently=False)
    except Exception as exc:  # mail trouble is recorded, never raised into a job
        log.warning("could not mail %s about %s: %s", to, alert.subject, exc)
        Alert.objects.filter(pk=alert_id).update(mail_error=str(exc) or type(exc).__name__)
        return False
    return True


def resolve(queryset) -> int:
    return queryset.open().update(resolved_at=timezone.now())


# --- events ---------------------------------------------------------------------------------


def backup_checked(backup: Backup) -> None:
    """After a verification: a corrupt or missing backup alerts; a good one resolves."""
    key = f"backup:{backup.pk}"
    if backup.verify_status not in (VerifyStatus.CORRUPT, VerifyStatus.MISSING):
        resolve(Alert.objects.filter(key=key))
        return
    vm = backup.vm
    raise_alert(
        AlertKind.CORRUPT,
        key,
        vm=vm,
        subject=f"[vmbackup] backup of {vm.name} is {backup.verify_status}",
        lines=[
            f"Verification found backup {backup.pk} of {vm.name} {backup.verify_status}.",
            f"Taken: {backup.created_at:%Y-%m-%d %H:%M:%S %Z}",
            f"Directory: {backup.path}",
            f"Reason: {backup.verify_error}" if backup.verify_error else "",
            "Backups built on it cannot be restored either; take a new full backup.",
            f"Details: {link(backup.get_absolute_url())}" if link("/") else "",
        ],
        to=recipients([backup.policy, *vm.policies.filter(enabled=True)]),
    )


def run_waiting(run: BackupRun, host: Host, since: datetime) -> None:
    """A backup queued for minutes while a worker cluster claims to be alive: its host's
    cluster is wedged or gone (``waiting`` also requeues it)."""
    vm = run.vm
    raise_alert(
        AlertKind.RUN_WAITING,
        f"waiting:{run.pk}",
        vm=vm,
        subject=f"[vmbackup] backup of {vm.name} is waiting for a worker on {host.name}",
        lines=[
            f"Run {run.pk} of {vm.name} has been queued since {since:%Y-%m-%d %H:%M:%S %Z}, "
            f"and no worker on {host.name} took it.",
            "Check the worker unit of that host (vmbackup-worker); the run was requeued.",
            f"Details: {link(run.get_absolute_url())}" if link("/") else "",
        ],
        to=recipients([run.policy]),
    )


def offsite_checked(repository: OffsiteRepository) -> None:
    """After a ``restic check``: one that found damage, or could not run, alerts; a good
    one resolves."""
    key = f"offsite-check:{repository.pk}"
    if repository.check_ok:
        resolve(Alert.objects.filter(key=key))
        return
    read = f" (data read: {repository.check_subset})" if repository.check_subset else ""
    raise_alert(
        AlertKind.OFFSITE_CHECK,
        key,
        about=repository.name,
        subject=f"[vmbackup] offsite repository {repository.name} failed its check",
        lines=[
            f"restic check of {repository.name}{read} did not pass:",
            repository.check_message,
            "Copies there may not restore. Look at the repository (restic check, "
            "vmbackup_offsite check --read-data-subset 100%) before you rely on it.",
        ],
        to=recipients(repository.policies.filter(enabled=True)),
    )


# --- the periodic check -------------------------------------------------------------------------


def stale_window(hours: int | None) -> timedelta:
    """A policy's own window, else ``VMBACKUP_STALE_HOURS``."""
    return timedelta(hours=hours or settings.VMBACKUP_STALE_HOURS)


def stale_hours():
    """Per VM (as ``OuterRef("pk")``): the smallest window among its enabled policies that
    set one (None: the site's)."""
    return Subquery(
        BackupPolicy.objects.filter(
            enabled=True, vms=OuterRef("pk"), stale_after_hours__isnull=False
        )
        .order_by("stale_after_hours")
        .values("stale_after_hours")[:1]
    )


def check_stale(now: datetime) -> int:
    """Alert for each protected VM whose newest backup (or, never backed up, whose first
    sighting) is older than its window; resolve those fresh again."""
    newest = (
        Backup.objects.published()
        .filter(vm=OuterRef("pk"))
        .order_by("-created_at")
        .values("created_at")[:1]
    )
    vms = (
        VirtualMachine.objects.present()
        .filter(policies__enabled=True)
        .distinct()
        .annotate(last_good=Subquery(newest), window_hours=stale_hours())
    )
    stale, raised = set(), 0
    for vm in vms:
        window = stale_window(vm.window_hours)
        since = vm.last_good or vm.first_seen_at
        if now - since <= window:
            continue
        stale.add(f"stale:{vm.pk}")
        last = f"{vm.last_good:%Y-%m-%d %H:%M %Z}" if vm.last_good else "never"
        raised += bool(
            raise_alert(
                AlertKind.STALE,
                f"stale:{vm.pk}",
                vm=vm,
                subject=f"[vmbackup] {vm.name} has no backup newer than {_hours(window)}",
                lines=[
                    f"The last good backup of {vm.name} on {vm.host.name}: {last}.",
                    f"Its policies expect one at least every {_hours(window)}.",
                    f"Details: {link(vm.get_absolute_url())}" if link("/") else "",
                ],
                to=recipients(vm.policies.filter(enabled=True)),
            )
        )
    resolve(Alert.objects.filter(kind=AlertKind.STALE).exclude(key__in=stale))
    return raised


def _hours(window: timedelta) -> str:
    return f"{int(window.total_seconds() // 3600)} hours"


def clusters() -> dict[str, list[Host]]:
    """Worker cluster name -> the hosts it serves (hosts without one: the site's name)."""
    served: dict[str, list[Host]] = {}
    for host in Host.objects.order_by("name"):
        served.setdefault(host.cluster or settings.Q_CLUSTER["name"], []).append(host)
    return served


def check_workers(now: datetime) -> int:
    """A cluster is alive when it finished a task within ``VMBACKUP_WORKER_DOWN_MINUTES`` (the
    per-cluster check schedule gives each one a task every few minutes). Silence that long
    alerts; a cluster never heard from is given that long from its first check."""
    grace = timedelta(minutes=settings.VMBACKUP_WORKER_DOWN_MINUTES)
    raised = 0
    for name, hosts in clusters().items():
        key = f"no-worker:{name}"
        last = Task.objects.filter(cluster=name).aggregate(last=Max("stopped"))["last"]
        if last is not None and now - last <= grace:
            resolve(Alert.objects.filter(key=key))
            continue
        host_names = ", ".join(h.name for h in hosts)
        heard = f"{last:%Y-%m-%d %H:%M %Z}" if last else "never"
        alert = raise_alert(
            AlertKind.NO_WORKER,
            key,
            about=name,
            subject=f"[vmbackup] no live worker for {host_names}",
            lines=[
                f"No worker of cluster {name} (hosts: {host_names}) has finished a task for "
                f"{settings.VMBACKUP_WORKER_DOWN_MINUTES} minutes; last heard from: {heard}.",
                "Backups, restores and schedules of these hosts wait until one runs again "
                "(systemctl status vmbackup-worker on the host).",
                f"Overview: {link(reverse('overview'))}" if link("/") else "",
            ],
            to=recipients(BackupPolicy.objects.filter(enabled=True, vms__host__in=hosts)),
            fire=last is not None,  # heard from before: silent for the whole grace already
        )
        raised += alert is not None and alert.fired_at is not None
        pending = Alert.objects.open().filter(key=key, fired_at=None, raised_at__lte=now - grace)
        for alert in pending:
            if Alert.objects.filter(pk=alert.pk, fired_at=None).update(fired_at=now):
                _mail_on_commit(alert)
                raised += 1
    return raised


def resolve_recovered() -> None:
    """Failed-run alerts of VMs backed up since, and alerts of backups pruned meanwhile."""
    for alert in Alert.objects.open().filter(kind=AlertKind.RUN_FAILED, vm__isnull=False):
        if BackupRun.objects.filter(
            vm=alert.vm_id, status=RunStatus.SUCCEEDED, created_at__gt=alert.raised_at
        ).exists():
            resolve(Alert.objects.filter(pk=alert.pk))
    queued = BackupRun.objects.filter(status=RunStatus.QUEUED).values_list("pk", flat=True)
    waiting = Alert.objects.open().filter(kind=AlertKind.RUN_WAITING)
    resolve(waiting.exclude(key__in=[f"waiting:{pk}" for pk in queued]))
    pruned = Backup.objects.exclude(pruned_at=None).values_list("pk", flat=True)
    resolve(Alert.objects.filter(key__in=[f"backup:{pk}" for pk in pruned]))


def check(now: datetime | None = None) -> str:
    """The periodic pass (``backups.jobs.check_alerts``)."""
    now = now or timezone.now()
    stale = check_stale(now)
    workers = check_workers(now)
    resolve_recovered()
    return f"{stale} stale, {workers} worker alerts raised"


# --- test mail ----------------------------------------------------------------------------------


def send_test_mail(to: list[str], who: str = "") -> None:
    """Proves the mail path end to end; raises with the SMTP error so the admin sees it."""
    if not to:
        raise ValueError("no recipients (set the policy's notify_to or VMBACKUP_NOTIFY_TO)")
    body = [
        "This is a test message from vmbackup: failure and staleness alerts reach you.",
        f"Sent by {who}." if who else "",
        f"Dashboard: {link(reverse('overview'))}" if link("/") else "",
    ]
    send_mail(
        "[vmbackup] test mail",
        "\n".join(line for line in body if line) + "\n",
        settings.DEFAULT_FROM_EMAIL,
        to,
        fail_silently=False,
    )
