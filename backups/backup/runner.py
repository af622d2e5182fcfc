"""One backup run, from pre-flight to the published directory.

The order is the product's promise: refuse early (domain, disks, space) before anything is
written; write only into a ``.partial`` staging directory; hash while copying; verify; publish
by rename; only then mark the run succeeded. Whatever happens, the staging directory of a
failed run is removed and the VM is left as it was found.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from pathlib import Path

from django.conf import settings
from django.utils import timezone

from .. import archive, hypervisor, notify, private, qemu_img, site, worker
from ..archive import check as archive_check
from ..interrupt import Stopped, WorkerStopped
from ..models import (
    ACTIVE_STATUSES,
    Backup,
    BackupRun,
    Kind,
    Method,
    PruneLock,
    Restore,
    RestoreMode,
)
from ..retention import prune
from ..roots import refusal as root_refusal
from . import chain, methods, push

log = logging.getLogger(__name__)
HEARTBEAT_EVERY = 2.0  # seconds between progress writes to the run row
SPACE_MARGIN = 16 * 1024 * 1024  # metadata, SHA256SUMS, filesystem slack; plus 2%


class Refused(Exception):
    """Pre-flight said no; nothing was written."""


class Hasher:
    """Hashes each finished image in a thread while the next disk is being copied."""

    def __init__(self, staging: Path):
        self.staging = staging
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hash")
        self.futures: dict[str, Future] = {}
        self.queued = 0  # bytes handed over so far
        self.hashed = 0  # bytes hashed so far (written by the hashing thread only)

    def add(self, path: Path, name: str | None = None) -> None:
        self.queued += path.stat().st_size
        future = self.pool.submit(archive.hash_file, path, flush=True, on_bytes=self._count)
        self.futures[name or path.name] = future

    def _count(self, n: int) -> None:
        self.hashed += n

    def results(self, on_progress: Callable[[int, int], None] | None = None) -> dict[str, str]:
        """The digests, once all are done; ``on_progress(hashed, queued)`` meanwhile."""
        pending = list(self.futures.values())
        while on_progress is not None and not all(f.done() for f in pending):
            on_progress(self.hashed, self.queued)
            wait(pending, timeout=HEARTBEAT_EVERY, return_when=FIRST_EXCEPTION)
        if on_progress is not None:
            on_progress(self.hashed, self.queued)
        return {name: future.result() for name, future in self.futures.items()}

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


class RunContext:
    """Progress, journal and cancellation for one run, throttled to spare the database."""

    def __init__(self, run: BackupRun):
        self.run = run
        self.last_beat = 0.0

    def journal(self, step: str, **data) -> None:
        self.run.log(step, **data)

    def progress(self, done: int, total: int) -> None:
        now = time.monotonic()
        if now - self.last_beat >= HEARTBEAT_EVERY or (total and done >= total):
            self.last_beat = now
            self.run.beat(done, total)

    def should_stop(self) -> bool:
        return BackupRun.objects.filter(pk=self.run.pk, cancel_requested=True).exists()


def run(run_id: int, *, tidy: bool = True) -> str:
    """Claim a queued run and run it to its end: the worker's task (``jobs.run_backup``) and
    ``vmbackup_run --wait``, which imports this and not ``jobs`` (what it does not run, it
    does not load). A second delivery finds nothing to claim; a worker being stopped
    leaves the run queued, and a stop interrupts the run (see ``cluster``): either way the
    worker is free to take its STOP at once. ``tidy=False`` ends the run as soon as its
    backup is recorded and leaves ``tidy`` to the caller."""
    if worker.stopping():
        return worker.STOPPING
    if not BackupRun.claim(run_id, worker.worker_id()):
        status = BackupRun.objects.filter(pk=run_id).values_list("status", flat=True).first()
        log.info("run %s not claimed (status %s): duplicate delivery", run_id, status)
        return f"not claimed ({status})"
    claimed = BackupRun.objects.select_related("vm", "vm__host", "policy").get(pk=run_id)
    try:
        return execute(claimed, tidy=tidy)
    except WorkerStopped as exc:
        return f"interrupted: {exc}"


def execute(run: BackupRun, *, tidy: bool = True) -> str:
    """Run a claimed backup to its end; returns a one-line outcome for django-q2."""
    with worker.Heartbeat(run.pk, worker.heartbeat_every(), BackupRun):
        return _execute(run, tidy)


def tidy(run: BackupRun) -> str:
    """What follows a recorded backup when its command handed it over (``vmbackup_run
    --wait`` ends at the record; a prune that folds a chain can take longer than the run):
    the VM's old checkpoints dropped and its retention applied, holding the VM the way
    ``vmbackup_prune`` does, since the run no longer holds it. Idempotent: with a backup
    or prune of the VM running meanwhile it does nothing, and that run (or the next one)
    does the same when it ends."""
    with prune.holding(run.vm, worker.worker_id()) as held:
        run.log("tidy", held=held)
        if not held:
            run.log("tidy-skipped", reason="another backup or prune of the VM is running")
            return "tidy skipped: another backup or prune of the VM is running"
        try:
            with hypervisor.session(run.vm.host.uri) as hv:
                _drop_checkpoints(run, hv, str(run.vm.uuid), site.site_id())
        except hypervisor.HypervisorError as exc:  # the next run tidies
            run.log("checkpoints-not-dropped", error=str(exc))
        _prune_after(run)
    return "tidied"


def _execute(run: BackupRun, tidy: bool) -> str:
    rc = RunContext(run)
    staging: Path | None = None
    try:
        with hypervisor.session(run.vm.host.uri) as hv:
            prepared = _preflight(run, hv)
            try:
                staging = archive.staging_dir(
                    prepared["root"],
                    run.vm.name,
                    archive.stamp(run.started_at),
                    run.pk,
                    site=prepared["site"],
                )
                run.staging_path = str(staging)
                run.save(update_fields=["staging_path"])
                rc.journal("staging", path=str(staging))
                final = _produce_and_publish(run, rc, hv, prepared, staging)
                if tidy:
                    _drop_checkpoints(run, hv, prepared["domain"].uuid, prepared["site"])
            finally:
                if prepared.get("restart"):
                    hv.start(prepared["domain"].uuid)  # if this fails, reconcile retries
                    rc.journal("restart")
        staging = None
        if tidy:
            _prune_after(run)
        run.mark_succeeded()
        return f"published {final}"
    except methods.Cancelled as exc:
        run.mark_cancelled(str(exc))
        return "cancelled"
    except Stopped as exc:  # its command was stopped (interrupt.Guard); the undo has run
        run.mark_interrupted(str(exc))
        notify.run_finished(run)
        raise
    except Refused as exc:
        run.mark_failed(f"refused: {exc}")
        notify.run_finished(run)
        return f"refused: {exc}"
    except Exception as exc:  # every failure is recorded as data on the run
        log.exception("run %s failed", run.pk)
        run.mark_failed(_reason(exc))
        notify.run_finished(run)
        return f"failed: {_reason(exc)}"
    finally:
        if staging is not None:
            _discard(run, staging)


def _prune_after(run: BackupRun) -> None:
    """Apply the policy's retention (without a policy: ``VMBACKUP_KEEP_MANUAL``) while this
    run still holds the VM's one active slot, so no other backup of the VM can read a
    chain while it is being folded."""
    try:
        report = prune.prune_vm(run.vm, run.policy)
        if report.deleted:
            run.log("pruned", backups=report.deleted, rebased=report.rebased)
        if report.skipped:
            run.log("prune-skipped", reason=report.skipped)  # the next run catches up
        if report.refused:
            run.log("prune-refused", reasons=report.refused)
    except Stopped as exc:  # the backup stands; a fold cut short is finished later
        run.log("prune-stopped", error=str(exc))
    except Exception as exc:  # the backup itself succeeded; report, do not fail it
        log.exception("pruning after run %s failed", run.pk)
        run.log("prune-failed", error=str(exc))


def _reason(exc: Exception) -> str:
    text = str(exc) or exc.__class__.__name__
    if isinstance(exc, OSError) and exc.errno == 28:
        return f"destination full (no space left on device): {text}"
    return text


def _discard(run: BackupRun, staging: Path) -> None:
    try:
        archive.discard(staging, run.root)
        run.log("discarded", path=str(staging))
    except Exception:  # reconcile removes it later; the run's own error matters more
        log.exception("could not remove %s", staging)


def _preflight(run: BackupRun, hv: hypervisor.Session) -> dict:
    """Refuse with a clear reason before anything is written."""
    root = run.root
    if root_refusal(root):  # a policy row edited in the database: write nothing there
        raise Refused(root_refusal(root))
    in_place = Restore.objects.filter(
        vm=run.vm, mode=RestoreMode.IN_PLACE, status__in=ACTIVE_STATUSES
    )
    if in_place.exists():
        raise Refused(f"{run.vm.name} is being restored in place; back it up when that has ended")
    if PruneLock.objects.filter(vm=run.vm).exists():
        raise Refused(f"{run.vm.name}'s backups are being pruned; try again")
    try:
        domain = hv.domain(str(run.vm.uuid))
    except hypervisor.HypervisorError as exc:
        raise Refused(f"domain {run.vm.name} not found on {run.vm.host.name}") from exc
    if domain.name != run.vm.name:
        run.vm.name = domain.name
        run.vm.save(update_fields=["name"])
    policy = run.policy
    try:
        method, reason = methods.choose(run.method_requested, domain)
    except methods.MethodError as exc:
        raise Refused(str(exc)) from exc
    excluded = policy.excluded_targets if policy else set()
    disks, skipped = methods.select_disks(domain, excluded)
    if not disks:
        raise Refused(
            "no disk to back up: " + "; ".join(s["target"] + ": " + s["reason"] for s in skipped)
        )
    for disk in disks:
        if not os.access(disk.source, os.R_OK):
            raise Refused(f"disk {disk.target} ({disk.source}) is not readable")
    private.make_root(root)
    if method == Method.PUSH:
        directory = archive.vm_dir(root, domain.name)
        kind_plan = chain.plan(run.vm, policy, hv, disks, directory)
    else:
        kind_plan = chain.Plan(Kind.FULL, f"{method} backups are always full")
    run.method, run.method_reason = method, reason
    run.kind, run.kind_reason = kind_plan.kind, kind_plan.reason
    run.save(update_fields=["method", "method_reason", "kind", "kind_reason"])
    run.log(
        "preflight",
        method=method,
        reason=reason,
        kind=run.kind,
        kind_reason=run.kind_reason,
        skipped=skipped,
    )
    if not run.options.get("skip_space_check"):
        _check_space(run, root, disks, method)
    restart = False
    if method == Method.OFFLINE and domain.state != "shutoff":
        _shut_down(run, hv, domain, policy)
        domain, restart = hv.domain(domain.uuid), True
    return {
        "restart": restart,
        "domain": domain,
        "disks": disks,
        "skipped": skipped,
        "method": method,
        "root": root,
        "plan": kind_plan,
        "site": site.site_id(),
    }


def _shut_down(run, hv, domain, policy) -> None:
    """Offline backup of a running VM: only with the policy's consent, only gracefully."""
    if not (policy and policy.shutdown_for_offline):
        raise Refused(
            f"{domain.name} is {domain.state}; the offline method needs it shut off "
            "(allow 'shut down for offline' in its policy, or use push or snapshot)"
        )
    timeout = settings.VMBACKUP_SHUTDOWN_TIMEOUT
    run.log("shutdown", timeout=timeout)
    hv.shutdown(domain.uuid)
    if not hv.wait_state(domain.uuid, "shutoff", timeout=timeout):
        raise Refused(f"{domain.name} did not shut down within {timeout}s; not forcing it off")


def _check_space(run, root: str, disks, method: str) -> None:
    """Estimated output (qemu-img measure) against free space, plus overlay room."""
    needed = 0
    for disk in disks:
        try:
            needed += qemu_img.measure(disk.source, disk.format, "qcow2").required
        except qemu_img.QemuImgError as exc:
            raise Refused(f"cannot measure {disk.target}: {exc}") from exc
    needed += SPACE_MARGIN + needed // 50
    free = shutil.disk_usage(root).free
    run.log("space", needed=needed, free=free)
    if needed > free:
        raise Refused(
            f"not enough space at {root}: need about {_mib(needed)} MiB, {_mib(free)} MiB free"
        )
    if method in (Method.SNAPSHOT, Method.MEMORY):
        reserve = settings.VMBACKUP_OVERLAY_RESERVE_MIB * 1024 * 1024
        for disk in disks:
            where = settings.VMBACKUP_OVERLAY_DIR or os.path.dirname(disk.source)
            free = shutil.disk_usage(where).free
            if free < reserve:
                # a full overlay pauses the guest (QEMU's default on ENOSPC): refuse instead
                raise Refused(
                    f"not enough space for snapshot overlays at {where}: {_mib(free)} MiB free, "
                    f"VMBACKUP_OVERLAY_RESERVE_MIB={settings.VMBACKUP_OVERLAY_RESERVE_MIB}"
                )


def _mib(n: int) -> int:
    return n // (1024 * 1024)


def _produce_and_publish(run, rc: RunContext, hv, prepared: dict, staging: Path) -> Path:
    ctx = _context(run, rc, hv, prepared, staging)
    try:
        manifest, extras = _produce_and_check(run, rc, ctx, prepared)
        rc.journal("publish")
        final = archive.publish(staging)
    except BaseException:
        push.drop_checkpoint(ctx)  # nothing was published: nothing may build on it
        raise
    _record(run, rc, prepared, manifest, extras, final)
    return final


def _drop_checkpoints(run: BackupRun, hv, uuid: str, site_id: str) -> None:
    """Only the newest checkpoint of each chain is kept (each bitmap costs every guest
    write). Called with the VM held (by the run, or by ``tidy``): a run in progress has a
    checkpoint no backup records yet."""
    if run.method != Method.PUSH:
        return
    try:
        keep = chain.needed_checkpoints(run.vm)
        recorded = chain.recorded_checkpoints(run.vm)
        dropped = chain.drop_old_checkpoints(hv, uuid, keep, site_id, recorded)
        if dropped:
            run.log("checkpoints-dropped", names=dropped)
    except hypervisor.HypervisorError as exc:  # the backup stands; the next run tidies
        run.log("checkpoints-not-dropped", error=str(exc))


def _context(run, rc: RunContext, hv, prepared: dict, staging: Path) -> methods.Context:
    return methods.Context(
        hv=hv,
        domain=prepared["domain"],
        disks=prepared["disks"],
        staging=staging,
        run_id=run.pk,
        site=prepared["site"],
        compression=run.policy.compression if run.policy else "none",
        overlay_dir=settings.VMBACKUP_OVERLAY_DIR,
        pull_dir=push.pull_directory(settings.VMBACKUP_NBD_DIR),
        qemu_user=settings.VMBACKUP_QEMU_USER,
        timeout=settings.Q_TIMEOUT,
        journal=rc.journal,
        progress=rc.progress,
        should_stop=rc.should_stop,
        **_chain_args(run, prepared),
    )


def _produce_and_check(run, rc: RunContext, ctx: methods.Context, prepared: dict):
    """Images, extras, hashes, metadata and the post-backup check, all in staging."""
    hasher = Hasher(ctx.staging)
    ctx.image_done = hasher.add
    try:
        rc.progress(0, ctx.total)
        method = prepared["method"]
        result = push.push(ctx) if method == Method.PUSH else methods.produce(method, ctx)
        run.consistency = result.consistency
        run.save(update_fields=["consistency"])
        extras = _copy_extras(ctx.hv, ctx.domain, ctx.staging, hasher, ctx.checkpoint)
        rc.journal("hash")
        sums = hasher.results(on_progress=run.hash_progress)
    finally:
        hasher.close()
    manifest = _manifest(run, ctx.domain, prepared, result, sums, extras)
    archive.write_metadata(ctx.staging, manifest, extras["domain_xml"], sums)
    if _verifies(run):
        rc.journal("verify")
        checked = archive_check.verify(ctx.staging, hashed=sums)
        if not checked.ok:
            raise methods.MethodError("verification failed: " + "; ".join(checked.errors))
        # what was just verified, as the row records it (a rename publishes it unchanged)
        extras["verified_files"] = archive.fingerprint(ctx.staging)
    return manifest, extras


def _verifies(run) -> bool:
    return not run.policy or run.policy.verify_after


def _record(run, rc: RunContext, prepared: dict, manifest, extras, final: Path) -> None:
    run.bytes_written = sum(e.bytes for e in manifest.disks)
    run.save(update_fields=["bytes_written"])
    verified = _verifies(run)
    Backup.objects.create(
        vm=run.vm,
        run=run,
        policy=run.policy,
        path=str(final),
        created_at=run.started_at,
        kind=manifest.kind,
        parent=prepared["plan"].parent if prepared["plan"].incremental else None,
        checkpoint=manifest.checkpoint or "",
        checkpoint_xml=extras["checkpoint_xml"],
        method=manifest.method,
        consistency=manifest.consistency,
        size_bytes=_dir_size(final),
        manifest=manifest.to_dict(),
        verify_status="ok" if verified else "unverified",
        verified_at=timezone.now() if verified else None,
        verified_files=extras.get("verified_files", {}),
    )
    rc.journal("published", path=str(final))


def _dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _chain_args(run, prepared: dict) -> dict:
    """Checkpoint and parent images for a push backup (nothing for other methods)."""
    if prepared["method"] != Method.PUSH:
        return {}
    kind_plan = prepared["plan"]
    args = {"checkpoint": chain.checkpoint_name(prepared["site"], run.pk)}
    if kind_plan.incremental:
        parent = kind_plan.parent
        files = {d["target"]: d["file"] for d in parent.manifest["disks"]}
        args["incremental"] = parent.checkpoint
        args["backing"] = {
            d.target: chain.relative_backing(parent, files[d.target])
            for d in prepared["disks"]
            if d.format == "qcow2"
        }
    return args


def _copy_extras(hv, domain, staging: Path, hasher: Hasher, checkpoint: str | None) -> dict:
    """domain.xml (the persistent definition), the UEFI variable store, the checkpoint."""
    extras = {
        "domain_xml": hv.inactive_xml(domain.uuid),
        "nvram": None,
        "tpm": None,
        "checkpoint_xml": "",
    }
    if checkpoint:
        extras["checkpoint_xml"] = hv.checkpoint_xml(domain.uuid, checkpoint)
        target = staging / "checkpoint.xml"
        private.write_file(target, extras["checkpoint_xml"])
        hasher.add(target)
    if domain.tpm and domain.tpm.backend == "emulator":
        extras["tpm"] = _copy_tpm(domain.uuid, staging, hasher)
    if domain.nvram and os.path.exists(domain.nvram):
        target = staging / "nvram.fd"
        private.copy_file(domain.nvram, target)
        hasher.add(target)
        extras["nvram"] = target.name
    return extras


def _copy_tpm(uuid: str, staging: Path, hasher: Hasher) -> str | None:
    """The emulated TPM's state (keys, sealed secrets): without it a restored VM that
    used the TPM (BitLocker, LUKS with TPM unlock) cannot unlock its disks."""
    source = Path(settings.VMBACKUP_SWTPM_DIR) / uuid
    if not source.is_dir():
        return None
    target = staging / "tpm"
    private.copy_tree(source, target, skip=(".lock", "*.pid", "*.sock"))
    for path in sorted(p for p in target.rglob("*") if p.is_file()):
        hasher.add(path, name=str(path.relative_to(staging)))
    return "tpm"


def _manifest(run, domain, prepared, result, sums: dict[str, str], extras) -> archive.Manifest:
    plan = prepared["plan"]
    disks = tuple(
        archive.DiskEntry(
            target=image.target,
            source=image.source,
            format=image.source_format,
            virtual_size=image.virtual_size,
            file=image.file,
            bytes=(Path(run.staging_path) / image.file).stat().st_size,
            sha256=sums[image.file],
            backing=image.backing,
            backing_format="qcow2" if image.backing else None,
        )
        for image in result.images
    )
    return archive.Manifest(
        version=archive.FORMAT_VERSION,
        vm_name=domain.name,
        vm_uuid=domain.uuid,
        host=run.vm.host.name,
        method=prepared["method"],
        kind=run.kind,
        parent=os.path.basename(plan.parent.path) if plan.incremental else None,
        checkpoint=extras["checkpoint_xml"]
        and chain.checkpoint_name(prepared["site"], run.pk)
        or None,
        consistency=result.consistency,
        started=run.started_at.isoformat(),
        finished=timezone.now().isoformat(),
        run_id=run.pk,
        disks=disks,
        skipped=tuple(prepared["skipped"]),
        nvram=extras["nvram"],
        tpm=extras["tpm"],
        memory=result.memory,
    )
