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
    Drill,
    Host,
    OffsiteCopy,
    OffsiteRepository,
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
    DrillRefused,
    RunActive,
    enqueue_drill,
    newest_drillable,
    request_backup,
    request_copy_after_backup,
    request_drill,
    request_offsite_check,
    request_offsite_copy,
    request_offsite_prune,
    retry_offsite_copy,
)
from .restore import drill as drill_engine
from .restore import run as restore_run

log = logging.getLogger(__name__)


def run_backup(run_id: int) -> str:
    """Worker entry point for one backup run (``runner.run``: claim, run, record), then its
    offsite copy when its policy names a repository."""
    outcome = runner.run(run_id)
    request_copy_after_backup(run_id)
    return outcome


def tidy_after_backup(run_id: int) -> str:
    """Old checkpoints and retention after a run its command handed over (``runner.tidy``)."""
    run = BackupRun.objects.select_related("vm__host", "policy").get(pk=run_id)
    return runner.tidy(run)


def run_restore(restore_id: int) -> str:
    """Worker entry point for one restore (``restore.run.run``: claim, run, record)."""
    return restore_run.run(restore_id)


def run_drill(drill_id: int) -> str:
    """Worker entry point for one restore drill. Not claimed while another drill runs on
    the host: it stays queued, and the running one starts it when it ends."""
    if worker.stopping():
        return worker.STOPPING
    if not Drill.claim(drill_id, worker.worker_id()):
        status = Drill.objects.filter(pk=drill_id).values_list("status", flat=True).first()
        return "waiting for the host's running drill" if status == "queued" else "not claimed"
    drill = Drill.objects.select_related("backup__vm__host", "vm__host", "host", "policy").get(
        pk=drill_id
    )
    try:
        return drill_engine.execute(drill)
    except interrupt.WorkerStopped as exc:
        return f"interrupted: {exc}"
    finally:
        drill_next(drill.host_id)


def drill_next(host_id: int) -> None:
    """The oldest drill queued on the host, enqueued (one sandbox per host at a time)."""
    queued = Drill.objects.filter(host_id=host_id, status=RunStatus.QUEUED)
    following = queued.select_related("vm__host").order_by("created_at", "id").first()
    if following is not None:
        enqueue_drill(following)


def run_policy_drills(policy_id: int) -> str:
    """A policy's drill schedule fired: one drill per VM of its newest usable backup; a VM
    with a drill active, or no backup, is skipped. The drills of one host run in turn."""
    policy = BackupPolicy.objects.get(pk=policy_id)
    if not policy.enabled:
        return "policy disabled"
    requested, skipped = 0, []
    for vm in policy.vms.present().select_related("host"):
        backup = newest_drillable(vm)
        if backup is None:
            skipped.append(f"{vm.name}: no backup")
            continue
        try:
            request_drill(backup, trigger=Trigger.SCHEDULE, policy=policy)
            requested += 1
        except DrillRefused as exc:
            skipped.append(str(exc))
    return f"{requested} drills requested" + (f"; skipped: {'; '.join(skipped)}" if skipped else "")


def copy_offsite(copy_id: int) -> str:
    """Worker entry point for one offsite copy; a second delivery finds nothing to claim.
    A copy stopped with its worker is requested again (it resumes nothing: restic wrote no
    snapshot, and deduplication makes sending again cheap)."""
    if worker.stopping():
        return worker.STOPPING
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
