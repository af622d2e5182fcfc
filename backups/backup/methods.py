"""How disk images are produced: offline, snapshot and memory here, push in ``push``.

Each method writes one qcow2 image per selected disk into the staging directory and returns
what it did as data. Whatever it changes on the VM (a snapshot overlay, a block job, a frozen
guest, a running backup job) is journaled before the change and undone in ``finally``;
reconcile repeats the undo when a worker died in between.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .. import hypervisor, private, qemu_img, site
from ..models import Consistency, Method

BACKUP_FORMATS = {"qcow2", "raw"}


class MethodError(Exception):
    """The method cannot run or failed; the message is shown to the user as is."""


class Cancelled(Exception):
    """The user asked the run to stop."""


@dataclass(frozen=True)
class Image:
    target: str
    source: str
    source_format: str
    file: str  # name inside the staging dir
    virtual_size: int
    backing: str | None = None  # "../<parent backup>/<file>" for an incremental image


@dataclass
class Result:
    consistency: str
    images: list[Image]
    memory: str | None = None
    notes: list[str] = field(default_factory=list)


@dataclass
class Context:
    """What a method needs; callbacks keep methods free of Django and of the run row."""

    hv: hypervisor.Session
    domain: hypervisor.DomainInfo
    disks: list[hypervisor.DiskInfo]
    staging: Path
    run_id: int
    compression: str = "none"
    overlay_dir: str | None = None
    journal: Callable[..., None] = lambda step, **data: None
    progress: Callable[[int, int], None] = lambda done, total: None
    image_done: Callable[[Path], None] = lambda path: None
    should_stop: Callable[[], bool] = lambda: False
    # push only: the checkpoint this backup creates, the one it is incremental to, and the
    # parent image (relative path) each incremental disk backs onto
    exclusive: bool = False  # read the sources with the image lock (offline)
    pull_dir: str | None = None  # full push backups: pull over NBD, socket directory here
    site: str = ""  # this installation's id: in every name a job leaves on the host
    qemu_user: str = "libvirt-qemu"
    timeout: float = 24 * 3600  # one disk copy; the job's own timeout bounds the run
    checkpoint: str | None = None
    incremental: str | None = None
    backing: dict[str, str] = field(default_factory=dict)

    @property
    def uuid(self) -> str:
        return self.domain.uuid

    @property
    def total(self) -> int:
        return sum(d.capacity or 0 for d in self.disks)


def select_disks(
    domain: hypervisor.DomainInfo, excluded: set[str] = frozenset()
) -> tuple[list[hypervisor.DiskInfo], list[dict]]:
    """The disks a backup copies, and every other one with the reason it is skipped."""
    chosen, skipped = [], []
    for disk in domain.disks:
        reason = None
        if disk.target in excluded:
            reason = "excluded by policy"
        elif disk.device != "disk":
            reason = f"{disk.device} device"
        elif disk.readonly:
            reason = "read-only disk"
        elif disk.shareable:
            reason = "shareable disk (another VM may write it)"
        elif disk.source_type not in {"file", "block"}:
            reason = f"{disk.source_type or 'unknown'} disk (not a local file or device)"
        elif not disk.source:
            reason = "no source"
        elif disk.format not in BACKUP_FORMATS:
            reason = f"unsupported format {disk.format!r}"
        if reason:
            skipped.append({"target": disk.target, "reason": reason})
        else:
            chosen.append(disk)
    return chosen, skipped


def choose(requested: str, domain: hypervisor.DomainInfo) -> tuple[str, str]:
    """The method to use and why; ``auto`` picks per VM state."""
    running = domain.state in {"running", "paused"}
    if requested != Method.AUTO:
        if requested == Method.OFFLINE:
            return requested, "requested" + ("" if not running else " (domain is running)")
        if not running:
            raise MethodError(f"method {requested} needs a running domain; it is {domain.state}")
        return requested, "requested"
    if not running:
        return Method.OFFLINE, f"domain is {domain.state}"
    return Method.PUSH, "domain is running: libvirt backup API (push mode)"


class _Progress:
    """Turns per-disk progress into one bytes-done figure for the whole run."""

    def __init__(self, ctx: Context):
        self.ctx = ctx
        self.base = 0

    def disk(self, size: int) -> Callable[[float], None]:
        def report(fraction: float) -> None:
            if self.ctx.should_stop():
                raise Cancelled("cancelled by user")
            self.ctx.progress(self.base + int(size * fraction), self.ctx.total)

        return report

    def finished(self, size: int) -> None:
        self.base += size
        self.ctx.progress(self.base, self.ctx.total)


def copy_disks(ctx: Context, copy: Callable[[hypervisor.DiskInfo, Path, Callable], None]):
    """Copy each disk into ``<target>.qcow2`` in staging with ``copy(disk, out, progress)``;
    each finished image is handed to the hasher while the next one is copied."""
    images, progress = [], _Progress(ctx)
    for disk in ctx.disks:
        out = ctx.staging / f"{disk.target}.qcow2"
        size = disk.capacity or 0
        ctx.journal("copy", target=disk.target, file=out.name)
        private.create_file(out)  # 0600 from the start: qemu-img writes into it, keeps it
        copy(disk, out, progress.disk(size))
        progress.finished(size)
        ctx.image_done(out)
        images.append(Image(disk.target, disk.source, disk.format, out.name, size))
    return images


def _convert_all(ctx: Context, sources: dict[str, str]) -> list[Image]:
    """Copy each disk from ``sources`` (target -> readable image) with qemu-img."""

    def copy(disk, out: Path, report) -> None:
        qemu_img.convert(
            sources[disk.target],
            disk.format,
            str(out),
            "qcow2",
            compression=ctx.compression,
            progress=report,
            # offline: take the image lock, so the VM cannot start (and write) mid-copy;
            # snapshot: the base is read while QEMU holds it, which is why it is frozen
            force_share=not ctx.exclusive,
            timeout=ctx.timeout,
        )

    return copy_disks(ctx, copy)


def offline(ctx: Context) -> Result:
    """The domain is shut off: its disks are quiet, a plain convert is consistent."""
    if ctx.hv.domain(ctx.uuid).state != "shutoff":
        raise MethodError("offline backup needs the domain shut off")
    ctx.exclusive = True
    images = _convert_all(ctx, {d.target: d.source for d in ctx.disks})
    if ctx.hv.domain(ctx.uuid).state != "shutoff":
        raise MethodError("the domain was started during the offline backup; copy discarded")
    return Result(Consistency.OFFLINE, images)


@contextlib.contextmanager
def frozen(ctx: Context):
    """Freeze guest filesystems when the agent answers; always thaw. Yields the label.

    A freeze that times out may still have frozen the guest, so a failed freeze is followed
    by a thaw too; a thaw is retried before giving up (reconcile retries it later).
    """
    if not (ctx.domain.has_agent_channel and ctx.hv.agent_responds(ctx.uuid)):
        yield Consistency.CRASH
        return
    ctx.journal("freeze")
    try:
        ctx.hv.freeze(ctx.uuid)
    except hypervisor.HypervisorError:
        _thaw(ctx)
        raise
    try:
        yield Consistency.FROZEN
    finally:
        _thaw(ctx)


def _thaw(ctx: Context, attempts: int = 3) -> None:
    for attempt in range(attempts):
        try:
            ctx.hv.thaw(ctx.uuid)
            ctx.journal("thaw")
            return
        except hypervisor.HypervisorError as exc:
            if attempt == attempts - 1:
                ctx.journal("thaw-failed", error=str(exc))
                raise
            time.sleep(1)


def overlay_path(ctx: Context, disk: hypervisor.DiskInfo) -> str:
    """Overlays carry the installation and the run in a dot-name so reconcile can tell
    its own from another installation's (which it never touches)."""
    directory = ctx.overlay_dir or os.path.dirname(disk.source)
    if disk.source_type == "block" and not ctx.overlay_dir:
        raise MethodError(f"{disk.target} is a block device: set VMBACKUP_OVERLAY_DIR")
    return os.path.join(directory, overlay_name(ctx.site, ctx.run_id, disk.target))


# ``.vmbackup-<site>-<run>-<target>.overlay.qcow2``; versions before the site id wrote
# ``.vmbackup-<run>-<target>…`` (site None: ours only if our run journaled it)
OVERLAY_RE = re.compile(rf"^\.vmbackup-(?:({site.PATTERN})-)?(\d+)-(.+)\.overlay\.qcow2$")


def overlay_name(site_id: str, run_id: int, target: str) -> str:
    return f".vmbackup-{site_id}-{run_id}-{target}.overlay.qcow2"


@dataclass(frozen=True)
class OverlayName:
    site: str | None
    run_id: int
    target: str


def parse_overlay(path: str) -> OverlayName | None:
    match = OVERLAY_RE.match(os.path.basename(path or ""))
    return match and OverlayName(match.group(1), int(match.group(2)), match.group(3))


def snapshot(ctx: Context, with_memory: bool = False) -> Result:
    """External snapshot, copy the frozen bases, then commit the overlays back — always."""
    overlays = {d.target: overlay_path(ctx, d) for d in ctx.disks}
    quiesce = not with_memory and ctx.domain.has_agent_channel and ctx.hv.agent_responds(ctx.uuid)
    memory = "memory.save" if with_memory else None
    ctx.journal("snapshot", overlays=overlays, quiesce=quiesce)
    try:
        ctx.hv.snapshot_disks(
            ctx.uuid,
            overlays,
            all_targets=tuple(d.target for d in ctx.domain.disks if d.device == "disk"),
            quiesce=quiesce,
            memory_file=str(ctx.staging / memory) if memory else None,
        )
    except hypervisor.HypervisorError:
        _remove_unused_overlays(ctx, overlays)
        raise
    try:
        images = _convert_all(ctx, {d.target: d.source for d in ctx.disks})
    finally:
        commit_overlays(ctx.hv, ctx.uuid, overlays, ctx.journal)
    if memory:
        private.take_back(ctx.staging / memory)
        ctx.image_done(ctx.staging / memory)
    if with_memory:
        consistency = Consistency.MEMORY
    else:
        consistency = Consistency.FROZEN if quiesce else Consistency.CRASH
    return Result(consistency, images, memory=memory)


def commit_overlays(hv: hypervisor.Session, uuid: str, overlays: dict[str, str], journal) -> None:
    """Merge every overlay back into its base, point the domain at the base, delete it.

    Handles a domain still running (blockcommit + pivot) and one that was shut down in
    between (qemu-img commit, then the definition is pointed back at the base). Tries every
    disk even when one fails, then raises: reconcile retries what is left.
    """
    errors = []
    for target, overlay in overlays.items():
        try:
            _commit_one(hv, uuid, target, overlay, journal)
        except (hypervisor.HypervisorError, qemu_img.QemuImgError) as exc:
            errors.append(f"{target}: {exc}")
    if errors:
        raise MethodError("could not merge snapshot overlays back: " + "; ".join(errors))


def _commit_one(hv: hypervisor.Session, uuid: str, target: str, overlay: str, journal) -> None:
    if not os.path.exists(overlay):
        return
    base = qemu_img.info(overlay, "qcow2")
    domain = hv.domain(uuid)
    live = {d.target: d.source for d in domain.disks}
    if domain.state in {"running", "paused"} and live.get(target) == overlay:
        journal("commit", target=target)
        try:
            hv.commit_active(uuid, target)
        except hypervisor.HypervisorError:
            if hv.domain(uuid).state != "shutoff":
                raise
            domain = hv.domain(uuid)  # stopped mid-commit: finish offline below
    if domain.state == "shutoff" and hv.disk_source(uuid, target, inactive=True) == overlay:
        journal("commit-offline", target=target)
        qemu_img.commit(overlay, "qcow2")
    if hv.disk_source(uuid, target, inactive=True) == overlay and base.backing_filename:
        hv.set_disk_source(uuid, target, base.backing_filename, base.backing_format or "raw")
    if overlay in hv.sources_in_use(uuid):
        raise hypervisor.HypervisorError(f"still runs on {overlay}")
    os.unlink(overlay)
    journal("committed", target=target)


def _in_use(hv: hypervisor.Session, uuid: str, path: str) -> bool:
    return path in hv.sources_in_use(uuid)


def _remove_unused_overlays(ctx: Context, overlays: dict[str, str]) -> None:
    for overlay in overlays.values():
        if not _in_use(ctx.hv, ctx.uuid, overlay):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(overlay)


def produce(method: str, ctx: Context) -> Result:
    """offline, snapshot and memory; push is ``push.push`` (it builds on this module)."""
    if method == Method.OFFLINE:
        return offline(ctx)
    if method == Method.SNAPSHOT:
        return snapshot(ctx)
    if method == Method.MEMORY:
        return snapshot(ctx, with_memory=True)
    raise MethodError(f"unknown method {method!r}")
