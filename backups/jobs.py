"""django-q2 entry points: each takes primary keys, claims its row atomically (a redelivered
task finds nothing to claim and returns) and lets an engine run it, which records every
outcome on our own rows. The dotted paths (``backups.jobs.run_backup``…) are stored in
django-q2's queue and schedules: keep them. What enqueues these is ``requests``.
"""

import time

from django.db.models import F
from django.utils import timezone

from . import alerts, dump, inventory, verify, waiting
from . import reconcile as reconcile_mod
from .backup import runner
from .models import Backup, BackupPolicy, BackupRun, Host, RunStatus, Trigger
from .requests import RunActive, request_backup
from .restore import run as restore_run


def run_backup(run_id: int) -> str:
    """Worker entry point for one backup run (``runner.run``: claim, run, record)."""
    return runner.run(run_id)


def tidy_after_backup(run_id: int) -> str:
    """Old checkpoints and retention after a run its command handed over (``runner.tidy``)."""
    run = BackupRun.objects.select_related("vm__host", "policy").get(pk=run_id)
    return runner.tidy(run)


def run_restore(restore_id: int) -> str:
    """Worker entry point for one restore (``restore.run.run``: claim, run, record)."""
    return restore_run.run(restore_id)


def verify_backup(backup_id: int) -> str:
    try:
        backup = Backup.objects.select_related("vm").get(pk=backup_id)
        return verify.verify_backup(backup)
    finally:
        Backup.objects.filter(pk=backup_id).update(verify_queued_at=None)


def sync_inventory() -> str:
    if not Host.objects.exists():
        inventory.local_host()
    return "; ".join(f"{h.name}: {inventory.sync_host(h).summary()}" for h in Host.objects.all())


def run_policy(policy_id: int) -> str:
    """A policy's schedule fired: one run per VM; a VM still busy gets a skipped run."""
    policy = BackupPolicy.objects.get(pk=policy_id)
    if not policy.enabled:
        return "policy disabled"
    started, skipped = 0, 0
    for vm in policy.vms.present().select_related("host"):
        try:
            request_backup(vm, method=policy.method, trigger=Trigger.SCHEDULE, policy=policy)
            started += 1
        except RunActive as exc:
            now = timezone.now()
            BackupRun.objects.create(
                vm=vm,
                policy=policy,
                trigger=Trigger.SCHEDULE,
                method_requested=policy.method,
                status=RunStatus.SKIPPED,
                error=str(exc),
                started_at=now,
                finished_at=now,
            )
            skipped += 1
    return f"{started} started, {skipped} skipped"


def verify_pass(
    budget_seconds: int = 3600, budget_bytes: int | None = None, cluster: str | None = None
) -> str:
    """Re-verify stored backups, least recently verified first, within a budget; with
    ``cluster``, only those of VMs on hosts served by that django-q2 cluster."""
    deadline = time.monotonic() + budget_seconds
    done, read = 0, 0
    queue = Backup.objects.published().select_related("vm")
    if cluster is not None:
        queue = queue.filter(vm__host__cluster=cluster)
    for backup in queue.order_by(F("verified_at").asc(nulls_first=True), "created_at"):
        if time.monotonic() > deadline or (budget_bytes is not None and read >= budget_bytes):
            break
        verify.verify_backup(backup)
        done += 1
        read += backup.size_bytes
    return f"verified {done} backups ({read} bytes)"


def reconcile(cluster: str | None = None) -> str:
    summary = reconcile_mod.reconcile(cluster=cluster).summary()
    return f"{summary}, {waiting.summary(waiting.check(cluster))}"


def check_alerts(cluster: str = "") -> str:
    """The alert pass: stale backups, silent worker clusters, alerts that have cleared.
    Scheduled on every cluster (``vmbackup-alerts@<cluster>``): its own run is what proves
    that cluster alive to the others."""
    return alerts.check()


def dump_database() -> str:
    """The dashboard's own database into the backup root (``dump``), once a day."""
    return dump.dump_database()
