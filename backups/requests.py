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

from . import site, worker
from .models import (
    ACTIVE_STATUSES,
    Backup,
    BackupRun,
    CopyTrigger,
    Drill,
    Host,
    Method,
    OffsiteCopy,
    OffsiteRepository,
    Restore,
    RestoreMode,
    RunStatus,
    Trigger,
    VirtualMachine,
)
from .restore.rules import RestoreError, check_disk_file, check_request


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


def hand_over_tidy(run: BackupRun) -> bool:
    """``vmbackup_run --wait`` ends at the record: its tidy-up (old checkpoints, retention)
    goes to the VM's cluster as a task when a worker cluster runs on this machine to take
    it (False otherwise: the command tidies itself, after its last line). A task lost
    meanwhile loses nothing: the VM's next run or prune does the same."""
    if not worker.cluster_here():
        return False
    _enqueue("backups.jobs.tidy_after_backup", run.pk, vm=run.vm, name=f"tidy-{run.pk}")
    return True


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


def restore_source(
    backup: Backup, repository: OffsiteRepository | None = None, from_offsite: bool = False
) -> OffsiteRepository | None:
    """Where a restore of ``backup`` reads it: its directory here (None) while it has one,
    else — or when asked (``from_offsite``, ``repository``) — an offsite repository holding
    a copy of it (the one named, else the first by name). Raises ``RestoreRefused``."""
    local = backup.pruned_at is None
    if local and not (from_offsite or repository):
        return None
    holding = OffsiteRepository.objects.filter(  # one filter(): conditions on one copy row
        copies__backup=backup,
        copies__status=RunStatus.SUCCEEDED,
        copies__forgotten_at__isnull=True,  # offsite retention forgot its snapshot
    ).distinct()
    if repository is not None:
        if not holding.filter(pk=repository.pk).exists():
            raise RestoreRefused(f"backup {backup.pk} has no copy in {repository.name}")
        return repository
    found = holding.order_by("name").first()
    if found is None:
        raise RestoreRefused(
            f"backup {backup.pk} has no offsite copy"
            if local
            else f"backup {backup.pk} was pruned and has no offsite copy; nothing to restore"
        )
    return found


def request_restore(
    backup: Backup,
    *,
    name: str = "",
    root: str = "",
    start: bool = False,
    user=None,
    in_place: bool = False,
    instant: bool = False,
    enqueue: bool = True,
    repository: OffsiteRepository | None = None,
    from_offsite: bool = False,
):
    """Create a queued restore of ``backup`` and enqueue it (``enqueue=False``: the caller
    runs it itself, as ``vmbackup_restore --wait`` does). As a new domain called ``name``
    under ``root`` (``instant``: started at once from the backup, its data moved in while
    it runs), or ``in_place`` over the backup's own VM (name and root unused). Read from
    its directory here, or from offsite (``restore_source``; never instantly: an instant
    restore's domain reads the backup's own files for as long as its data moves)."""
    if in_place and instant:
        raise RestoreRefused("an instant restore makes a new domain; it cannot be in place")
    source = restore_source(backup, repository, from_offsite)
    if instant and source is not None:
        raise RestoreRefused(
            f"backup {backup.pk} would be read from offsite repository {source.name}: an "
            "instant restore runs from the backup's files here; restore it as a new domain"
        )
    if in_place:
        name, root = backup.vm.name, ""
    else:
        try:
            check_request(name, root)
        except RestoreError as exc:
            raise RestoreRefused(str(exc)) from exc
    mode = RestoreMode.IN_PLACE if in_place else RestoreMode.NEW
    if instant:
        mode = RestoreMode.INSTANT
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
                repository=source,
            )
    except IntegrityError as exc:
        what = f"of {backup.vm.name} in place" if in_place else f"as {name}"
        raise RestoreRefused(f"a restore {what} is already queued or running") from exc
    if enqueue:
        enqueue_restore(restore)
    return restore


def request_disk_restore(backup: Backup, *, disk: str, to: str, user=None, enqueue: bool = True):
    """Create a queued restore of one disk of ``backup`` (its chain flattened) into the new
    file ``to``, in a restore root; the worker checks the same again, then the chain. It
    reads the backup's files here: a backup held only offsite is restored as a new domain."""
    if backup.pruned_at is not None:
        raise RestoreRefused(
            f"backup {backup.pk} has no directory here; one disk is restored from the files "
            "here only (restore it from offsite as a new domain)"
        )
    targets = [d.get("target") for d in (backup.manifest or {}).get("disks", [])]
    if targets and disk not in targets:
        raise RestoreRefused(
            f"backup {backup.pk} has no disk {disk!r} (it has {', '.join(targets)})"
        )
    try:
        directory, name = check_disk_file(to)
    except RestoreError as exc:
        raise RestoreRefused(str(exc)) from exc
    with transaction.atomic():
        _check_restore_cap(backup.vm.host)
        restore = Restore.objects.create(
            backup=backup, vm=backup.vm, mode=RestoreMode.DISK, name=name, root=directory,
            disk=disk, requested_by=user,
        )  # fmt: skip
    if enqueue:
        enqueue_restore(restore)
    return restore


def enqueue_restore(restore) -> None:
    """Enqueue a queued restore's task (again, for reconcile handing a dead worker's
    instant restore to another: the claim makes a second delivery a no-op)."""
    _enqueue("backups.jobs.run_restore", restore.pk, vm=restore.vm, name=f"restore-{restore.pk}")


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


def request_copy_after_backup(run_id: int) -> OffsiteCopy | None:
    """A published backup of a policy that names an offsite repository is copied there
    (it was verified before it was published when the policy verifies; the copy verifies it
    again before sending). While the VM's previous copy is still running it waits: that
    copy requests the newest backup left uncopied when it ends (``jobs.copy_offsite``).
    Called by the worker after its run and by ``vmbackup_run --wait``."""
    run = BackupRun.objects.select_related("policy__offsite").get(pk=run_id)
    policy = run.policy
    if run.status != RunStatus.SUCCEEDED or policy is None or policy.offsite_id is None:
        return None
    backup = Backup.objects.filter(run=run).select_related("vm__host").first()
    if backup is None:
        return None
    try:
        copy = request_offsite_copy(backup, policy.offsite, trigger=CopyTrigger.AFTER_BACKUP)
    except (CopyActive, CopyRefused) as exc:
        run.log("offsite-deferred", reason=str(exc))
        return None
    run.log("offsite-requested", copy=copy.pk, repository=policy.offsite.name)
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


class DrillRefused(Exception):
    """A drill that cannot be taken (one of the VM is active, nothing to drill)."""


def drill_settings(backup: Backup, policy=None) -> dict:
    """What the drill asks for: the given policy's drill settings, else the backup's
    policy's, else those of the VM's first enabled policy, else the site's timeout."""
    policy = policy or backup.policy or backup.vm.policies.filter(enabled=True).first()
    if policy is None:
        return {"timeout_seconds": settings.VMBACKUP_DRILL_TIMEOUT}
    return {
        "policy": policy,
        "timeout_seconds": policy.drill_timeout,
        "command": policy.drill_command,
        "console_pattern": policy.drill_console_pattern,
    }


def newest_drillable(vm: VirtualMachine) -> Backup | None:
    """The backup a drill of ``vm`` boots: its newest published one not found corrupt."""
    usable = Backup.objects.published().filter(vm=vm).exclude(verify_status__in=UNUSABLE)
    return usable.select_related("vm__host", "policy").order_by("-created_at", "-id").first()


UNUSABLE = ("corrupt", "missing")


def request_drill(
    backup: Backup, *, trigger: str = Trigger.BUTTON, policy=None, user=None, enqueue=True
) -> Drill:
    """Create a queued drill of ``backup`` and enqueue it to its host's cluster; raises
    ``DrillRefused`` while the VM has a drill queued or running (the database decides).
    A drill waits for the one running on its host (one sandbox per host at a time)."""
    if backup.pruned_at is not None:
        raise DrillRefused(f"backup {backup.pk} was pruned; there is nothing to drill")
    try:
        with transaction.atomic():
            drill = Drill.objects.create(
                backup=backup, trigger=trigger, requested_by=user, **drill_settings(backup, policy)
            )
            drill.name = site.drill_name(drill.pk)
            drill.save(update_fields=["name"])
    except IntegrityError as exc:
        raise DrillRefused(f"a drill of {backup.vm.name} is already queued or running") from exc
    if enqueue:
        enqueue_drill(drill)
    return drill


def enqueue_drill(drill: Drill) -> None:
    """Enqueue a queued drill's task (again, when the host's running drill ends or
    reconcile finds it lost: the claim makes a second delivery a no-op)."""
    _enqueue("backups.jobs.run_drill", drill.pk, vm=drill.vm, name=f"drill-{drill.pk}")
