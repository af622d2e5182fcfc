"""Push backups through libvirt's backup API: fulls pulled over NBD, incrementals pushed.

Everything the job changes on the VM (a running backup job, a checkpoint, a frozen guest)
is journaled before the change and undone when the backup will not be published;
reconcile repeats the undo when a worker died in between.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

from .. import hypervisor, private, qemu_img
from .methods import Cancelled, Context, Image, MethodError, Result, copy_disks, frozen


def push(ctx: Context) -> Result:
    """libvirt backup API. A full backup is pulled when there is a socket directory
    (``pull_directory``): QEMU exports a point-in-time view over NBD and qemu-img copies
    it, compressed if the policy says so, each disk hashed while the next is copied —
    less wall time than QEMU's own push job when a core is free, and the copy leaves the
    process that runs the guest (bench/README.md, "push or pull").
    Incrementals are pushed: QEMU writes only what its bitmap marks, and the image is
    then re-written compressed when the policy asks (as are fulls pushed for want of a
    socket directory, or whose pull job QEMU refused to start)."""
    if ctx.pull_dir and not ctx.incremental:
        try:
            return _pull(ctx)
        except PullRefused as exc:
            ctx.journal("pull-refused", error=str(exc))
    return _push(ctx)


class PullRefused(Exception):
    """The pull job did not start (e.g. AppArmor or SELinux keeps QEMU from binding the NBD
    socket): nothing was copied, nothing is left, so the full is pushed instead."""


DEFAULT_PULL_DIR = "/run/vmbackup"


def pull_directory(configured: str | None) -> str | None:
    """Where pull backups put their NBD sockets: ``VMBACKUP_NBD_DIR`` when set, else
    ``/run/vmbackup`` when ``/run`` is ours to write (root's tmpfs: short paths, as unix
    sockets need, and nobody else can plant anything there), else none: fulls are then
    pushed like incrementals."""
    if configured:
        return configured
    parent = os.path.dirname(DEFAULT_PULL_DIR)
    if os.path.isdir(parent) and os.access(parent, os.W_OK | os.X_OK):
        return DEFAULT_PULL_DIR
    return None


def _pull(ctx: Context) -> Result:
    scratch = {d.target: str(ctx.staging / f".{d.target}.scratch.qcow2") for d in ctx.disks}
    sock_dir = _socket_dir(ctx)
    socket = str(sock_dir / "nbd.sock")
    ctx.journal("backup-begin", mode="pull", socket=socket, checkpoint=ctx.checkpoint)
    finished = False
    try:
        # QEMU opens the scratch files libvirt creates in staging: lent for the job only
        with private.lent_to(ctx.staging, ctx.qemu_user):
            try:
                try:
                    consistency = _begin_job(ctx, scratch, pull_socket=socket)
                except hypervisor.HypervisorError as exc:
                    raise PullRefused(str(exc)) from exc

                def copy(disk, out: Path, report) -> None:
                    qemu_img.convert_from_nbd(
                        socket,
                        disk.target,
                        str(out),
                        compression=ctx.compression,
                        progress=report,
                        timeout=ctx.timeout,
                    )

                try:
                    images = copy_disks(ctx, copy)
                except qemu_img.QemuImgError as exc:
                    stopped = _stopped_meanwhile(ctx)
                    if stopped is None:
                        raise
                    raise MethodError(f"{stopped}: {exc}") from exc
                finished = True
            finally:
                ctx.hv.end_backup_job(ctx.uuid)  # how a pull backup ends, done or not
    finally:
        if not finished:
            drop_checkpoint(ctx)
        for path in scratch.values():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        shutil.rmtree(sock_dir, ignore_errors=True)
    return Result(consistency, images)


def _stopped_meanwhile(ctx: Context) -> str | None:
    """qemu-img only sees its NBD source fail ("Input/output error"): why, when the guest
    shut down or was destroyed during the copy."""
    try:
        running = ctx.hv.domain(ctx.uuid).state == "running"
    except hypervisor.HypervisorError:
        running = False
    return None if running else "the VM stopped during the backup (shut down or destroyed)"


def _begin_job(ctx: Context, files: dict[str, str], pull_socket: str | None = None) -> str:
    """Start the backup job, the guest frozen around it when the agent answers; returns
    the consistency label. qcow2 disks get a bitmap for the next incremental."""
    bitmap_disks = tuple(d.target for d in ctx.disks if d.format == "qcow2")
    with frozen(ctx) as consistency:
        ctx.hv.backup_begin(
            ctx.uuid,
            files,
            all_targets=tuple(d.target for d in ctx.domain.disks if d.device == "disk"),
            checkpoint=ctx.checkpoint,
            incremental=ctx.incremental,
            bitmap_disks=bitmap_disks if (ctx.checkpoint or ctx.incremental) else (),
            pull_socket=pull_socket,
        )
    return consistency


def _socket_dir(ctx: Context) -> Path:
    """A short private directory for the NBD socket (unix socket paths are limited to
    108 bytes, so not inside the backup root), owned by the user QEMU runs as. The pull
    directory itself is search-only (0711): QEMU passes through it, nobody lists it."""
    path = Path(ctx.pull_dir) / f"{ctx.site}-{ctx.run_id}"
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.chmod(private.DIR)
    Path(ctx.pull_dir).chmod(private.TRAVERSE)
    owner = private.owner_of(ctx.qemu_user)
    if owner is not None:  # else QEMU runs as root here
        os.chown(path, *owner)
    return path


def _push(ctx: Context) -> Result:
    """libvirt backup API, push mode: QEMU copies a point-in-time view into our files.

    With a checkpoint, qcow2 disks get a dirty bitmap so the next backup can be incremental;
    an incremental image is re-pointed (``rebase -u``) from the live disk, which libvirt
    writes as its backing file, to the parent backup's image.
    """
    compress = ctx.compression != "none"
    name = ".{}.push.qcow2" if compress else "{}.qcow2"  # compressed afterwards, see below
    targets = {d.target: str(ctx.staging / name.format(d.target)) for d in ctx.disks}
    ctx.journal(
        "backup-begin", targets=targets, checkpoint=ctx.checkpoint, incremental=ctx.incremental
    )
    # QEMU opens the targets libvirt creates in staging: lent for the job only, and taken
    # back (with each file) before anything is hashed
    with private.lent_to(ctx.staging, ctx.qemu_user):
        try:
            consistency = _begin_job(ctx, targets)
        except hypervisor.HypervisorError:
            _end_push(ctx)  # e.g. the thaw failed after the job had started
            raise
        _wait_push(ctx)
    images = []
    for disk in ctx.disks:
        out = Path(targets[disk.target])
        private.take_back(out)
        backing = ctx.backing.get(disk.target) if ctx.incremental else None
        if backing:
            qemu_img.rebase(str(out), "qcow2", backing, "qcow2", unsafe=True)
        if compress:
            out = _compress(ctx, disk, out, backing)
        ctx.image_done(out)
        images.append(
            Image(disk.target, disk.source, disk.format, out.name, disk.capacity or 0, backing)
        )
    ctx.progress(ctx.total, ctx.total)
    return Result(consistency, images)


def _compress(ctx: Context, disk: hypervisor.DiskInfo, pushed: Path, backing: str | None):
    """QEMU's push job cannot compress, so the pushed image is re-written compressed into
    ``<target>.qcow2`` and dropped. An incremental keeps its backing file and only the
    clusters the job wrote are copied (``convert -B``: data and explicit zeros of the top
    layer), so the chain stays an ordinary qcow2 chain. That convert opens the parent's
    chain: ``chain.plan`` checked every header of it against its manifest (else this
    run would be a full)."""
    out = ctx.staging / f"{disk.target}.qcow2"
    ctx.journal("compress", target=disk.target, file=out.name, compression=ctx.compression)
    private.create_file(out)

    def cancellable(_fraction: float) -> None:
        if ctx.should_stop():
            raise Cancelled("cancelled by user")

    qemu_img.convert(
        str(pushed),
        "qcow2",
        str(out),
        "qcow2",
        compression=ctx.compression,
        backing=backing,
        backing_fmt="qcow2" if backing else None,
        progress=cancellable,
        force_share=False,
        timeout=ctx.timeout,
    )
    os.unlink(pushed)
    return out


def _wait_push(ctx: Context) -> None:
    """Wait for the job; on any failure end it and drop the checkpoint it created."""
    finished = False
    try:
        ctx.hv.wait_backup(
            ctx.uuid,
            on_progress=lambda done, total: ctx.progress(done, total or ctx.total),
            should_stop=ctx.should_stop,
        )
        finished = True
    except hypervisor.HypervisorError as exc:
        if "cancelled" in str(exc):
            raise Cancelled("cancelled by user") from exc
        raise
    finally:
        if not finished:
            _end_push(ctx)


def _end_push(ctx: Context) -> None:
    """A push that will not be published: end its job, drop the checkpoint it created."""
    with contextlib.suppress(hypervisor.HypervisorError):
        if ctx.hv.backup_job_targets(ctx.uuid):
            ctx.hv.abort_job(ctx.uuid)
    drop_checkpoint(ctx)


def drop_checkpoint(ctx: Context) -> None:
    if ctx.checkpoint:
        with contextlib.suppress(hypervisor.HypervisorError):
            if ctx.checkpoint in ctx.hv.checkpoints(ctx.uuid):
                ctx.hv.delete_checkpoint(ctx.uuid, ctx.checkpoint)
                ctx.journal("checkpoint-dropped", checkpoint=ctx.checkpoint)
