"""django-q2 entry points and the functions that enqueue them.

Jobs take primary keys, claim their row atomically (a redelivered task finds nothing to claim
and returns) and record every outcome on our own rows. Requests enqueue on commit, so a worker
never looks for a row the web request has not committed yet.
"""

import logging
from datetime import timedelta

from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import Q
from django.utils import timezone
from django_q.tasks import async_task

from .models import ACTIVE_STATUSES, Backup, BackupRun, Method, RunStatus, Trigger, VirtualMachine

log = logging.getLogger(__name__)


class RunActive(Exception):
    """The VM already has a queued or running backup."""


def _enqueue(func: str, *args, vm: VirtualMachine, name: str) -> None:
    options = {"task_name": name}
    if vm.host.cluster:
        options["cluster"] = vm.host.cluster
    transaction.on_commit(lambda: async_task(func, *args, q_options=options))


def request_backup(
    vm: VirtualMachine,
    *,
    method: str = Method.AUTO,
    trigger: str = Trigger.BUTTON,
    policy=None,
    options: dict | None = None,
    enqueue: bool = True,
) -> BackupRun:
    """Create a queued run and enqueue it; raises ``RunActive`` if the VM has one.

    The database's partial unique index decides between two simultaneous triggers.
    """
    try:
        with transaction.atomic():
            run = BackupRun.objects.create(
                vm=vm,
                policy=policy,
                method_requested=method,
                trigger=trigger,
                options=options or {},
            )
    except IntegrityError as exc:
        active = BackupRun.objects.active().filter(vm=vm).first()
        raise RunActive(
            f"{vm.name} already has an active backup" + (f" (run {active.pk})" if active else "")
        ) from exc
    if enqueue:
        _enqueue("backups.jobs.run_backup", run.pk, vm=vm, name=f"backup-{run.pk}")
    return run


def request_cancel(run: BackupRun) -> None:
    """A queued run is cancelled at once; a running one is asked to stop at its next step."""
    updated = BackupRun.objects.filter(pk=run.pk, status=RunStatus.QUEUED).update(
        status=RunStatus.CANCELLED, error="cancelled by user", finished_at=timezone.now()
    )
    if not updated:
        BackupRun.objects.filter(pk=run.pk, status=RunStatus.RUNNING).update(cancel_requested=True)


class VerifyQueued(Exception):
    """A verification of this backup is already queued or running."""


def request_verify(backup: Backup) -> None:
    """Enqueue one verification; raises ``VerifyQueued`` while one is queued or running.

    Each verification re-reads the whole backup, so repeated clicks must not pile up. The
    mark is taken atomically on the row and cleared when the job ends; a mark older than the
    longest a job may run (``Q_TIMEOUT``, after which django-q2 has ended it) is stale.
    """
    now = timezone.now()
    stale = now - timedelta(seconds=settings.Q_TIMEOUT)
    free = Q(verify_queued_at__isnull=True) | Q(verify_queued_at__lt=stale)
    if not Backup.objects.filter(free, pk=backup.pk).update(verify_queued_at=now):
        raise VerifyQueued(f"A verification of {backup} is already queued or running.")
    backup.verify_queued_at = now
    _enqueue("backups.jobs.verify_backup", backup.pk, vm=backup.vm, name=f"verify-{backup.pk}")


def claim(run_id: int, worker: str) -> BackupRun | None:
    """Move a queued run to running; None when another delivery already did."""
    now = timezone.now()
    claimed = BackupRun.objects.filter(pk=run_id, status=RunStatus.QUEUED).update(
        status=RunStatus.RUNNING, started_at=now, heartbeat_at=now, worker=worker
    )
    if not claimed:
        return None
    return BackupRun.objects.select_related("vm", "vm__host", "policy").get(pk=run_id)


def run_backup(run_id: int) -> str:
    """Worker entry point for one backup run."""
    from . import runner

    run = claim(run_id, runner.worker_id())
    if run is None:
        status = BackupRun.objects.filter(pk=run_id).values_list("status", flat=True).first()
        log.info("run %s not claimed (status %s): duplicate delivery", run_id, status)
        return f"not claimed ({status})"
    return runner.execute(run)


class RestoreRefused(Exception):
    """A restore request that cannot be taken (name in use by another restore, bad input,
    too many restores on the host)."""


def _check_restore_cap(host) -> None:
    """At most ``VMBACKUP_MAX_RESTORES_PER_HOST`` queued or running restores per host: each
    one writes whole disks, and more would only share the same disks and network.

    Called inside the transaction that creates the restore, with the host row locked
    (PostgreSQL; SQLite's writers are serialised at BEGIN), so two requests cannot both
    take the last place.
    """
    from .models import Host, Restore

    cap = settings.VMBACKUP_MAX_RESTORES_PER_HOST
    Host.objects.select_for_update().filter(pk=host.pk).first()
    active = Restore.objects.filter(vm__host=host, status__in=ACTIVE_STATUSES).count()
    if active >= cap:
        raise RestoreRefused(
            f"{host.name} already has {active} restore(s) queued or running (at most {cap}, "
            "VMBACKUP_MAX_RESTORES_PER_HOST); request this one when one has ended"
        )


def request_restore(
    backup: Backup,
    *,
    name: str = "",
    root: str = "",
    start: bool = False,
    user=None,
    in_place: bool = False,
    enqueue: bool = True,
):
    """Create a queued restore of ``backup`` and enqueue it (``enqueue=False``: the caller
    runs it itself, as ``vmbackup_restore --wait`` does). As a new domain called ``name``
    under ``root``, or ``in_place`` over the backup's own VM (name and root unused)."""
    from . import restoring
    from .models import Restore, RestoreMode

    if in_place:
        name, root = backup.vm.name, ""
    else:
        try:
            restoring.check_request(name, root)
        except restoring.RestoreError as exc:
            raise RestoreRefused(str(exc)) from exc
    mode = RestoreMode.IN_PLACE if in_place else RestoreMode.NEW
    try:
        with transaction.atomic():
            _check_restore_cap(backup.vm.host)
            restore = Restore.objects.create(
                backup=backup,
                vm=backup.vm,
                mode=mode,
                name=name,
                root=root,
                start=start,
                requested_by=user,
            )
    except IntegrityError as exc:
        what = f"of {backup.vm.name} in place" if in_place else f"as {name}"
        raise RestoreRefused(f"a restore {what} is already queued or running") from exc
    if enqueue:
        _enqueue("backups.jobs.run_restore", restore.pk, vm=backup.vm, name=f"restore-{restore.pk}")
    return restore


def request_restore_cancel(restore) -> None:
    """A queued restore ends at once; a running one stops at its next step, unless it is
    past the point of no return (the domain defined, the disks switched)."""
    from .models import Restore

    updated = Restore.objects.filter(pk=restore.pk, status=RunStatus.QUEUED).update(
        status=RunStatus.CANCELLED, error="cancelled by user", finished_at=timezone.now()
    )
    if not updated:
        Restore.objects.filter(pk=restore.pk, status=RunStatus.RUNNING).update(
            cancel_requested=True
        )


def run_restore(restore_id: int) -> str:
    """Worker entry point for one restore; a second delivery finds nothing to claim."""
    from . import restoring, runner
    from .models import Restore

    now = timezone.now()
    claimed = Restore.objects.filter(pk=restore_id, status=RunStatus.QUEUED).update(
        status=RunStatus.RUNNING, started_at=now, heartbeat_at=now, worker=runner.worker_id()
    )
    if not claimed:
        return "not claimed"
    restore = Restore.objects.select_related("backup__vm__host").get(pk=restore_id)
    return restoring.execute(restore)


def verify_backup(backup_id: int) -> str:
    from . import verify

    try:
        backup = Backup.objects.select_related("vm").get(pk=backup_id)
        return verify.verify_backup(backup)
    finally:
        Backup.objects.filter(pk=backup_id).update(verify_queued_at=None)


def sync_inventory() -> str:
    from . import inventory
    from .models import Host

    if not Host.objects.exists():
        inventory.local_host()
    return "; ".join(f"{h.name}: {inventory.sync_host(h).summary()}" for h in Host.objects.all())


def run_policy(policy_id: int) -> str:
    """A policy's schedule fired: one run per VM; a VM still busy gets a skipped run."""
    from .models import BackupPolicy

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
    import time

    from django.db.models import F

    from . import verify

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
    from . import reconcile as reconcile_mod

    return reconcile_mod.reconcile(cluster=cluster).summary()


__all__ = [
    "ACTIVE_STATUSES",
    "RunActive",
    "VerifyQueued",
    "request_backup",
    "request_cancel",
    "request_verify",
]
