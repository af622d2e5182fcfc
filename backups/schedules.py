"""Policies become django-q2 schedules; housekeeping jobs get schedules of their own.

One ``Schedule`` per policy, named ``policy-<id>`` (and ``policy-<id>-drill`` for its restore
drills), and kept with ``update_or_create`` so
saving a policy twice never duplicates it. ``next_run`` is set whenever the cron changes, by
django-q2's own ``calculate_next_run`` (croniter, django-q2's time zone): an updated row keeps
its old ``next_run`` otherwise, and the policy page previews with the same engine (``cron``).

Scale-out: reconcile and the verify pass touch a host's disks and backup roots, so each
django-q2 cluster named on a Host gets its own copy (``vmbackup-reconcile@<cluster>``,
routed to that cluster, limited to its hosts); the plain ones serve hosts without one.

Offsite: ``vmbackup-offsite-check`` (``VMBACKUP_OFFSITE_CHECK_CRON``; blank: none) requests
a ``restic check`` of every enabled repository on its own cluster. A repository job that
found the repository locked is tried again once, later (``retry_later``: one pending
``ONCE`` schedule per job and repository, not a storm).
"""

from datetime import timedelta

from django.conf import settings
from django.utils import timezone
from django_q.models import Schedule

from .models import BackupPolicy, Host

HOUSEKEEPING = {
    # name: (function, cron, args)
    "vmbackup-reconcile": ("backups.jobs.reconcile", "*/10 * * * *", ""),
    "vmbackup-sync": ("backups.jobs.sync_inventory", "*/15 * * * *", ""),
    "vmbackup-verify": ("backups.jobs.verify_pass", "30 4 * * *", "3600"),
    "vmbackup-alerts": ("backups.jobs.check_alerts", "*/5 * * * *", ""),
    # the dashboard's own database into the backup root, after the night's runs
    "vmbackup-dump": ("backups.jobs.dump_database", "15 6 * * *", ""),
}
OFFSITE_CHECK = "vmbackup-offsite-check"
PER_CLUSTER = (
    "vmbackup-reconcile",
    "vmbackup-verify",
    "vmbackup-alerts",
)  # the jobs that act on one host


def name_for(policy: BackupPolicy) -> str:
    return BackupPolicy.schedule_name_of(policy.pk)


def _next(expr: str):
    return Schedule(schedule_type=Schedule.CRON, cron=expr).calculate_next_run()


def drill_name_for(policy: BackupPolicy) -> str:
    return BackupPolicy.drill_schedule_name_of(policy.pk)


def sync_policy(policy: BackupPolicy) -> Schedule | None:
    """Create, update or remove the schedules of one policy (its backups', returned, and
    its restore drills')."""
    _sync(drill_name_for(policy), "backups.jobs.run_policy_drills", policy, policy.drill_schedule)
    return _sync(name_for(policy), "backups.jobs.run_policy", policy, policy.schedule)


def _sync(name: str, func: str, policy: BackupPolicy, expr: str) -> Schedule | None:
    if not (policy.enabled and expr.strip()):
        Schedule.objects.filter(name=name).delete()
        return None
    existing = Schedule.objects.filter(name=name).first()
    changed = existing is None or existing.cron != expr
    defaults = {
        "func": func,
        "args": str(policy.pk),
        "schedule_type": Schedule.CRON,
        "cron": expr,
        "repeats": -1,
    }
    if changed:
        defaults["next_run"] = _next(expr)
    schedule, _ = Schedule.objects.update_or_create(name=name, defaults=defaults)
    return schedule


def remove_policy(policy: BackupPolicy) -> None:
    Schedule.objects.filter(name__in=[name_for(policy), drill_name_for(policy)]).delete()


def housekeeping() -> dict[str, tuple[str, str, str]]:
    """``HOUSEKEEPING`` and the offsite check, whose cron is a setting (blank: none)."""
    jobs = dict(HOUSEKEEPING)
    if settings.VMBACKUP_OFFSITE_CHECK_CRON.strip():
        cron = settings.VMBACKUP_OFFSITE_CHECK_CRON.strip()
        jobs[OFFSITE_CHECK] = ("backups.jobs.check_offsite_all", cron, "")
    return jobs


def install_housekeeping() -> list[str]:
    """The housekeeping schedules: the plain ones (hosts without a cluster) and one copy of
    each per-host job for every cluster a Host names; copies for clusters no Host names any
    more are removed. Idempotent."""
    clusters = sorted(set(Host.objects.exclude(cluster="").values_list("cluster", flat=True)))
    names = []
    Schedule.objects.filter(name=OFFSITE_CHECK).exclude(name__in=housekeeping()).delete()
    for name, (func, expr, args) in housekeeping().items():
        per_cluster = name in PER_CLUSTER
        for cluster in [None, *clusters] if per_cluster else [None]:
            label = f"{name}@{cluster}" if cluster else name
            kwargs = {"cluster": cluster or ""} if per_cluster else None
            defaults = {
                "func": func,
                "args": args or None,
                "kwargs": repr(kwargs) if kwargs else None,
                "cluster": cluster,
                "schedule_type": Schedule.CRON,
                "cron": expr,
                "repeats": -1,
            }
            existing = Schedule.objects.filter(name=label).first()
            if existing is None or existing.cron != expr:  # else its next run stands
                defaults["next_run"] = _next(expr)
            Schedule.objects.update_or_create(name=label, defaults=defaults)
            names.append(label)
    stale = Schedule.objects.filter(name__contains="@", name__startswith="vmbackup-")
    stale.exclude(name__in=names).delete()
    return names


def install_all() -> list[str]:
    """Housekeeping schedules plus one per policy; idempotent."""
    names = install_housekeeping()
    for policy in BackupPolicy.objects.all():
        if sync_policy(policy):
            names.append(name_for(policy))
        if policy.enabled and policy.drill_schedule.strip():
            names.append(drill_name_for(policy))
    return names


def retry_later(func: str, args: tuple, cluster: str, minutes: int | None = None) -> str:
    """Run ``func(*args)`` once, ``minutes`` from now (default
    ``VMBACKUP_OFFSITE_RETRY_MINUTES``), on ``cluster``: a repository restic found locked
    (a copy or a check holds it) is tried again then. ``args[0]`` names the repository:
    requested again meanwhile, its one pending retry is moved, never doubled."""
    name = f"vmbackup-retry-{func.rsplit('.', 1)[-1]}-{args[0]}"
    when = timezone.now() + timedelta(minutes=minutes or settings.VMBACKUP_OFFSITE_RETRY_MINUTES)
    Schedule.objects.update_or_create(
        name=name,
        defaults={
            "func": func,
            "args": repr(tuple(args)),
            "schedule_type": Schedule.ONCE,
            "repeats": -1,  # django-q2 deletes it once it has run
            "next_run": when,
            "cluster": cluster or None,
        },
    )
    return name
