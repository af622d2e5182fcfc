"""django-q2 entry points: each takes primary keys, claims its row atomically (a redelivered
task finds nothing to claim and returns) and lets an engine run it, which records every
outcome on our own rows. The dotted paths (``backups.jobs.run_backup``…) are stored in
django-q2's queue and schedules: keep them. What enqueues these is ``requests``.
"""

import logging
import time

from django.conf import settings
from django.db.models import F
from django.utils import timezone

from . import alerts, dump, interrupt, inventory, schedules, verify, waiting, worker
from . import reconcile as reconcile_mod
from .backup import runner
from .models import (
    Backup,
    BackupPolicy,
    BackupRun,
    CopyTrigger,
    Host,
    OffsiteCopy,
    OffsiteRepository,
    Restore,
    RunStatus,
    Trigger,
)
from .offsite import OffsiteError
from .offsite import copy as offsite_copy
from .offsite import forget as offsite_forget
from .offsite import repository as offsite_repository
from .requests import (
    CopyActive,
    CopyRefused,
    RunActive,
    request_backup,
    request_offsite_check,
    request_offsite_copy,
    request_offsite_prune,
    retry_offsite_copy,
)
from .restore import run as restore_run

log = logging.getLogger(__name__)


STOPPING = "not started: the worker is stopping (it stays queued; reconcile enqueues it again)"


def run_backup(run_id: int) -> str:
    """Worker entry point for one backup run; a second delivery finds nothing to claim.

    A worker being stopped leaves the run queued, and a stop interrupts the run (see
    ``cluster``): either way the worker is free to take its STOP at once."""
    if worker.stopping():
        return STOPPING
    if not BackupRun.claim(run_id, worker.worker_id()):
        status = BackupRun.objects.filter(pk=run_id).values_list("status", flat=True).first()
        log.info("run %s not claimed (status %s): duplicate delivery", run_id, status)
        return f"not claimed ({status})"
    run = BackupRun.objects.select_related("vm", "vm__host", "policy").get(pk=run_id)
    try:
        outcome = runner.execute(run)
    except interrupt.WorkerStopped as exc:
        return f"interrupted: {exc}"
    copy_after_backup(run)
    return outcome


def copy_after_backup(run: BackupRun) -> None:
    """A published backup of a policy that names an offsite repository is copied there
    (it was verified before it was published when the policy verifies; the copy verifies it
    again before sending). While the VM's previous copy is still running it waits: that
    copy requests the newest backup left uncopied when it ends (``copy_offsite``)."""
    run.refresh_from_db(fields=["status"])
    policy = run.policy
    if run.status != RunStatus.SUCCEEDED or policy is None or policy.offsite_id is None:
        return
    backup = Backup.objects.filter(run=run).select_related("vm__host").first()
    if backup is None:
        return
    try:
        copy = request_offsite_copy(backup, policy.offsite, trigger=CopyTrigger.AFTER_BACKUP)
        run.log("offsite-requested", copy=copy.pk, repository=policy.offsite.name)
    except (CopyActive, CopyRefused) as exc:
        run.log("offsite-deferred", reason=str(exc))


def run_restore(restore_id: int) -> str:
    """Worker entry point for one restore; a second delivery finds nothing to claim."""
    if worker.stopping():
        return STOPPING
    if not Restore.claim(restore_id, worker.worker_id()):
        return "not claimed"
    restore = Restore.objects.select_related("backup__vm__host").get(pk=restore_id)
    try:
        return restore_run.execute(restore)
    except interrupt.WorkerStopped as exc:
        return f"interrupted: {exc}"


def copy_offsite(copy_id: int) -> str:
    """Worker entry point for one offsite copy; a second delivery finds nothing to claim.
    A copy stopped with its worker is requested again (it resumes nothing: restic wrote no
    snapshot, and deduplication makes sending again cheap)."""
    if worker.stopping():
        return STOPPING
    if not OffsiteCopy.claim(copy_id, worker.worker_id()):
        return "not claimed"
    copy = OffsiteCopy.objects.select_related("backup__vm__host", "repository").get(pk=copy_id)
    try:
        outcome = offsite_copy.execute(copy)
    except interrupt.WorkerStopped as exc:
        retry_offsite_copy(copy)
        return f"interrupted: {exc}"
    if copy.status == RunStatus.SUCCEEDED:
        _copy_next(copy)
        request_offsite_prune(copy.repository)  # offsite retention follows each copy
    return outcome


def _copy_next(copy: OffsiteCopy) -> None:
    """The newest backup of this VM whose policy names this repository, published after
    this one and never copied there: one deferred while this copy ran."""
    newer = (
        Backup.objects.published()
        .filter(vm=copy.vm, policy__offsite=copy.repository, created_at__gt=copy.backup.created_at)
        .exclude(offsite_copies__repository=copy.repository)
        .select_related("vm__host")
        .order_by("-created_at")
        .first()
    )
    if newer is not None:
        try:
            request_offsite_copy(newer, copy.repository, trigger=CopyTrigger.AFTER_BACKUP)
        except (CopyActive, CopyRefused) as exc:
            log.info("backup %s not copied after copy %s: %s", newer.pk, copy.pk, exc)


def check_offsite(repository_id: int, read_data_subset: str = "") -> str:
    """``restic check`` of one repository (with that share of the data read); found locked
    (a copy or a prune holds it), tried again later."""
    model = OffsiteRepository.objects.get(pk=repository_id)
    try:
        result = offsite_repository.check(model, read_data_subset or None)
    except offsite_repository.Busy as exc:
        schedules.retry_later(
            "backups.jobs.check_offsite", (model.pk, read_data_subset), model.cluster
        )
        return f"locked, retried later: {exc}"
    except OffsiteError as exc:
        return f"failed: {exc}"
    return "ok" if result.ok else "errors: " + "; ".join(result.errors)


def check_offsite_all() -> str:
    """The scheduled check (``vmbackup-offsite-check``): every enabled repository, each on
    its own cluster, reading ``VMBACKUP_OFFSITE_CHECK_SUBSET`` of its data."""
    chosen = list(OffsiteRepository.objects.filter(enabled=True))
    for model in chosen:
        request_offsite_check(model, settings.VMBACKUP_OFFSITE_CHECK_SUBSET)
    return f"{len(chosen)} check(s) requested"


RETRIED = ("locked", "prune-failed")


def prune_offsite(repository_id: int) -> str:
    """Offsite retention of one repository (``offsite.forget``), requested after each copy
    that succeeds; found locked, tried again later (one pending retry)."""
    model = OffsiteRepository.objects.get(pk=repository_id)
    _plan, outcome = offsite_forget.run(model, worker.worker_id())
    if outcome.state in RETRIED:
        schedules.retry_later("backups.jobs.prune_offsite", (model.pk,), model.cluster)
    return f"{outcome.state}: {outcome.message}"


def init_offsite(repository_id: int) -> str:
    """``restic init`` of one repository, refused where there is one already."""
    model = OffsiteRepository.objects.get(pk=repository_id)
    try:
        return offsite_repository.initialize(model)
    except OffsiteError as exc:
        return f"refused: {exc}"


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
