"""What the web, the admin and the commands ask of the workers: create the queued row, then
enqueue the job by its dotted path (``backups.jobs.…``) on commit, so a worker never looks
for a row the request has not committed yet. Nothing here imports an engine or libvirt: the
web process only ever creates rows and enqueues.
"""

from datetime import timedelta

from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import Q
from django.utils import timezone
from django_q.tasks import async_task

from .models import (
    ACTIVE_STATUSES,
    Backup,
    BackupRun,
    CopyTrigger,
    Host,
    Method,
    OffsiteCopy,
    OffsiteRepository,
    Restore,
    RestoreMode,
    Trigger,
    VirtualMachine,
)
from .restore.rules import RestoreError, check_request


class RunActive(Exception):
    """The VM already has a queued or running backup."""


def _enqueue(func: str, *args, vm: VirtualMachine | None = None, name: str, cluster: str = ""):
    """On commit, to the cluster that serves the VM's host (or ``cluster``)."""
    options = {"task_name": name}
    cluster = vm.host.cluster if vm is not None else cluster
    if cluster:
        options["cluster"] = cluster
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
        enqueue_backup(run)
    return run


def enqueue_backup(run: BackupRun) -> None:
    """Enqueue a queued run's task (again, for ``waiting``: the claim makes a second
    delivery a no-op)."""
    _enqueue("backups.jobs.run_backup", run.pk, vm=run.vm, name=f"backup-{run.pk}")


def request_cancel(run: BackupRun) -> None:
    """A queued run is cancelled at once; a running one is asked to stop at its next step."""
    run.request_cancel()


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
    if in_place:
        name, root = backup.vm.name, ""
    else:
        try:
            check_request(name, root)
        except RestoreError as exc:
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
    restore.request_cancel()


class CopyActive(Exception):
    """The VM already has an offsite copy queued or running."""


class CopyRefused(Exception):
    """A copy that cannot be taken (backup pruned, repository disabled)."""


def request_offsite_copy(
    backup: Backup,
    repository: OffsiteRepository,
    *,
    trigger: str = CopyTrigger.BUTTON,
    attempt: int = 1,
    enqueue: bool = True,
) -> OffsiteCopy:
    """Create a queued copy of ``backup`` to ``repository`` and enqueue it on the cluster
    of the backup's host (its files are there); ``enqueue=False``: the caller runs it, as
    ``vmbackup_offsite copy --wait`` does. Raises ``CopyActive`` while the VM has a copy
    queued or running (the database decides), ``CopyRefused`` when it cannot be copied."""
    if backup.pruned_at is not None:
        raise CopyRefused(f"backup {backup.pk} was pruned; there is nothing to copy")
    if not repository.enabled:
        raise CopyRefused(f"repository {repository.name} is disabled")
    try:
        with transaction.atomic():
            copy = OffsiteCopy.objects.create(
                backup=backup, repository=repository, trigger=trigger, attempt=attempt
            )
    except IntegrityError as exc:
        active = OffsiteCopy.objects.active().filter(vm=backup.vm, via__isnull=True).first()
        raise CopyActive(
            f"{backup.vm.name} already has an offsite copy queued or running"
            + (f" (copy {active.pk})" if active else "")
        ) from exc
    if enqueue:
        _enqueue("backups.jobs.copy_offsite", copy.pk, vm=backup.vm, name=f"offsite-{copy.pk}")
    return copy


def retry_offsite_copy(copy: OffsiteCopy) -> OffsiteCopy | None:
    """Request an interrupted copy again (its worker died or was stopped), up to
    ``VMBACKUP_OFFSITE_ATTEMPTS`` attempts in all; None when it is not retried."""
    if copy.attempt >= settings.VMBACKUP_OFFSITE_ATTEMPTS:
        return None
    try:
        return request_offsite_copy(
            copy.backup, copy.repository, trigger=CopyTrigger.RETRY, attempt=copy.attempt + 1
        )
    except (CopyActive, CopyRefused):
        return None


def request_copy_cancel(copy: OffsiteCopy) -> None:
    """A queued copy ends at once; a running one stops within a second (restic interrupted,
    no snapshot written)."""
    copy.request_cancel()


def request_offsite_prune(repository: OffsiteRepository) -> bool:
    """Offsite retention of ``repository`` (forget, then prune) on its cluster, where its
    password file is. At most one is queued at a time (each copy that succeeds asks for
    one); False when one is queued already. A mark older than the longest a job may run
    (``Q_TIMEOUT``) is stale."""
    now = timezone.now()
    free = Q(prune_queued_at__isnull=True) | Q(
        prune_queued_at__lt=now - timedelta(seconds=settings.Q_TIMEOUT)
    )
    if not OffsiteRepository.objects.filter(free, pk=repository.pk).update(prune_queued_at=now):
        return False
    _enqueue(
        "backups.jobs.prune_offsite",
        repository.pk,
        cluster=repository.cluster,
        name=f"offsite-prune-{repository.pk}",
    )
    return True


def request_offsite_check(repository: OffsiteRepository, read_data_subset: str = "") -> None:
    """``restic check`` of ``repository`` on its cluster (a share of the data read too)."""
    args = (repository.pk, read_data_subset) if read_data_subset else (repository.pk,)
    _enqueue(
        "backups.jobs.check_offsite",
        *args,
        cluster=repository.cluster,
        name=f"offsite-check-{repository.pk}",
    )


def request_offsite_init(repository: OffsiteRepository) -> None:
    """``restic init`` of ``repository`` on its cluster, where its password file is."""
    _enqueue(
        "backups.jobs.init_offsite",
        repository.pk,
        cluster=repository.cluster,
        name=f"offsite-init-{repository.pk}",
    )
