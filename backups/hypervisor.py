"""The only module that imports libvirt.

Everything crosses this boundary as plain frozen dataclasses or strings: no libvirt object
leaks out, no connection is opened at import, every libvirt error becomes
``HypervisorError`` raised from its cause. Domain XML is read with ElementTree and written
with ElementTree (escaped), never by formatting strings.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import libvirt

from . import domain_xml, uris
from .domain_xml import DiskInfo as DiskInfo  # re-exported: callers see one boundary
from .domain_xml import DomainInfo as DomainInfo
from .domain_xml import TpmInfo as TpmInfo
from .domain_xml import parse_domain_xml


class HypervisorError(Exception):
    """A libvirt call failed; the message is libvirt's, prefixed with what we were doing."""


# libvirt logs every error to stderr by default; we report them ourselves.
libvirt.registerErrorHandler(lambda _ctx, _err: None, None)

_STATES = {
    libvirt.VIR_DOMAIN_RUNNING: "running",
    libvirt.VIR_DOMAIN_BLOCKED: "running",
    libvirt.VIR_DOMAIN_PAUSED: "paused",
    libvirt.VIR_DOMAIN_SHUTDOWN: "running",
    libvirt.VIR_DOMAIN_SHUTOFF: "shutoff",
    libvirt.VIR_DOMAIN_CRASHED: "crashed",
    libvirt.VIR_DOMAIN_PMSUSPENDED: "paused",
}


@dataclass(frozen=True)
class JobProgress:
    active: bool
    kind: str  # "backup", "none", ...
    processed: int
    total: int


@dataclass(frozen=True)
class BlockJob:
    target: str
    kind: str  # commit | active-commit | pull | copy | backup | unknown
    cur: int
    end: int

    @property
    def ready(self) -> bool:
        return self.end > 0 and self.cur == self.end


_BLOCK_JOB_KINDS = {
    libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_PULL: "pull",
    libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_COPY: "copy",
    libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_COMMIT: "commit",
    libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_ACTIVE_COMMIT: "active-commit",
    libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_BACKUP: "backup",
}


def _capacity(dom, target: str) -> int | None:
    """Virtual size of a disk; None when libvirt cannot tell (e.g. an unreadable source)."""
    try:
        return dom.blockInfo(target)[0]
    except libvirt.libvirtError:
        return None


class Session:
    """One libvirt connection, used as a context manager; hands out plain data only."""

    def __init__(self, uri: str):
        self.uri = uri
        self._conn = None

    def __enter__(self) -> Session:
        ensure_event_loop()
        self._completed: dict[str, dict] = {}
        self._job_ended = threading.Condition()  # wakes wait_backup the moment a job ends
        self._restarted = False
        refused = uris.refusal(self.uri)  # asked again here: the row may have been edited
        if refused:
            raise HypervisorError(f"refusing to connect: {refused}")
        try:
            self._conn = libvirt.open(self.uri)
            self._callback = self._conn.domainEventRegisterAny(
                None, libvirt.VIR_DOMAIN_EVENT_ID_JOB_COMPLETED, self._on_job_completed, None
            )
        except libvirt.libvirtError as exc:
            raise HypervisorError(f"cannot connect to {self.uri}: {exc}") from exc
        return self

    def _alive(self) -> bool:
        try:
            return bool(self._conn.isAlive())
        except libvirt.libvirtError:
            return False

    def reconnect(self, timeout: float = 60) -> None:
        """Open the connection again after libvirtd went away (bounded wait)."""
        deadline = time.monotonic() + timeout
        with contextlib.suppress(libvirt.libvirtError):
            self._conn.close()
        while True:
            try:
                self._restarted = True
                self._conn = libvirt.open(self.uri)
                self._callback = self._conn.domainEventRegisterAny(
                    None, libvirt.VIR_DOMAIN_EVENT_ID_JOB_COMPLETED, self._on_job_completed, None
                )
                return
            except libvirt.libvirtError as exc:
                if time.monotonic() > deadline:
                    raise HypervisorError(f"libvirtd did not come back: {exc}") from exc
                time.sleep(0.5)

    def _on_job_completed(self, _conn, dom, params, _opaque) -> None:
        """Keep the completed job's stats: only they carry the failure reason (errmsg)."""
        with self._job_ended:
            self._completed[dom.UUIDString()] = dict(params)
            self._job_ended.notify_all()

    def _wait_completed(self, uuid: str, seconds: float) -> bool:
        """Sleep up to ``seconds``, less if the job-completed event for ``uuid`` arrives."""
        with self._job_ended:
            return self._job_ended.wait_for(lambda: uuid in self._completed, seconds)

    def __exit__(self, *exc_info) -> None:
        if self._conn is not None:
            with contextlib.suppress(libvirt.libvirtError):
                self._conn.domainEventDeregisterAny(self._callback)
            with contextlib.suppress(libvirt.libvirtError):
                self._conn.close()
            self._conn = None

    # -- lookups -------------------------------------------------------------------------
    def _dom(self, uuid: str):
        for attempt in range(2):
            try:
                return self._conn.lookupByUUIDString(uuid)
            except libvirt.libvirtError as exc:
                if attempt == 0 and not self._alive():
                    self.reconnect()  # libvirtd restarted under us: go on with a new one
                    continue
                raise HypervisorError(f"domain {uuid} not found: {exc}") from exc

    def _info(self, dom, flags: int = 0) -> DomainInfo:
        state, _reason = dom.state()
        info = parse_domain_xml(
            dom.XMLDesc(flags),
            state=_STATES.get(state, "other"),
            persistent=bool(dom.isPersistent()),
        )
        disks = tuple(
            dataclasses.replace(d, capacity=_capacity(dom, d.target)) if d.source else d
            for d in info.disks
        )
        return dataclasses.replace(info, disks=disks)

    def domains(self) -> list[DomainInfo]:
        """Every domain (running and defined), with its current definition."""
        try:
            listed = self._conn.listAllDomains()
        except libvirt.libvirtError as exc:
            raise HypervisorError(f"cannot list domains on {self.uri}: {exc}") from exc
        found = []
        for dom in listed:
            try:
                found.append(self._info(dom))
            except libvirt.libvirtError as exc:
                # undefined between the listing and the read: it is simply gone
                if exc.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                    raise HypervisorError(f"cannot read domain on {self.uri}: {exc}") from exc
        return found

    def exists(self, uuid: str) -> bool:
        try:
            self._conn.lookupByUUIDString(uuid)
        except libvirt.libvirtError:
            return False
        return True

    def has_managed_save(self, uuid: str) -> bool:
        """A saved RAM state that the next start would resume (``virsh managedsave``)."""
        return bool(self._call(self._dom(uuid).hasManagedSaveImage, 0, doing="check saved state"))

    def uuid_by_name(self, name: str) -> str | None:
        """The UUID of the domain called ``name``, or None when there is none."""
        try:
            return self._conn.lookupByName(name).UUIDString()
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return None
            raise HypervisorError(f"look up domain {name}: {exc}") from exc

    def domain(self, uuid: str) -> DomainInfo:
        try:
            return self._info(self._dom(uuid))
        except libvirt.libvirtError as exc:
            raise HypervisorError(f"cannot read domain {uuid}: {exc}") from exc

    def find(self, uuid: str) -> DomainInfo | None:
        """The domain, or None when libvirt does not know it (an event's domain undefined
        meanwhile, a transient one stopped); any other failure raises."""
        try:
            return self._info(self._conn.lookupByUUIDString(uuid))
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return None
            raise HypervisorError(f"cannot read domain {uuid}: {exc}") from exc

    def inactive_xml(self, uuid: str) -> str:
        """The persistent definition (what a restore should define), secure parts included."""
        dom = self._dom(uuid)
        flags = libvirt.VIR_DOMAIN_XML_SECURE
        if dom.isPersistent():
            flags |= libvirt.VIR_DOMAIN_XML_INACTIVE
        return self._call(dom.XMLDesc, flags, doing="read definition")

    def _call(self, fn: Callable, *args, doing: str):
        try:
            return fn(*args)
        except libvirt.libvirtError as exc:
            if not self._alive():
                with contextlib.suppress(HypervisorError):
                    self.reconnect()  # so that the caller's cleanup still reaches libvirtd
            raise HypervisorError(f"{doing}: {exc}") from exc

    # -- lifecycle -------------------------------------------------------------------------
    def define(self, xml: str) -> str:
        """Define a domain; returns its UUID."""
        dom = self._call(self._conn.defineXML, xml, doing="define domain")
        return dom.UUIDString()

    def start(self, uuid: str, *, paused: bool = False) -> None:
        flags = libvirt.VIR_DOMAIN_START_PAUSED if paused else 0
        self._call(self._dom(uuid).createWithFlags, flags, doing="start domain")

    # -- saved state (memory.save): read and ABI-checked by libvirt, resumed ----------------
    def save_image_xml(self, path: str) -> str:
        """The definition a save image carries, secure parts included."""
        flags = libvirt.VIR_DOMAIN_SAVE_IMAGE_XML_SECURE
        return self._call(self._conn.saveImageGetXMLDesc, path, flags, doing="read saved state")

    def save_image_define(self, path: str, xml: str) -> None:
        """Replace a save image's definition; libvirt refuses one the saved state (its
        devices, its ABI) cannot run under — and any change of name, UUID or MAC."""
        self._call(self._conn.saveImageDefineXML, path, xml, 0, doing="check saved state")

    def restore_saved(self, path: str, *, paused: bool = False) -> None:
        """Resume a save image as the (defined) domain its definition names."""
        flags = libvirt.VIR_DOMAIN_SAVE_PAUSED if paused else libvirt.VIR_DOMAIN_SAVE_RUNNING
        self._call(self._conn.restoreFlags, path, None, flags, doing="resume saved state")

    def create_transient(self, xml: str) -> str:
        """Create and start a transient domain (gone once destroyed); returns its UUID."""
        dom = self._call(self._conn.createXML, xml, 0, doing="create domain")
        return dom.UUIDString()

    def free_memory_mib(self) -> int:
        """Memory the host could give a new domain: free plus page cache and buffers."""
        stats = self._call(
            self._conn.getMemoryStats, libvirt.VIR_NODE_MEMORY_STATS_ALL_CELLS, 0,
            doing="read the host's memory",
        )  # fmt: skip
        return sum(stats.get(key, 0) for key in ("free", "cached", "buffers")) // 1024

    def screenshot(self, uuid: str, limit: int = 64 << 20) -> tuple[str, bytes]:
        """The domain's screen (``virDomainScreenshot``): (MIME type, image bytes)."""
        stream = self._call(self._conn.newStream, 0, doing="open a stream")
        try:
            mime = self._call(self._dom(uuid).screenshot, stream, 0, doing="take a screenshot")
            data = bytearray()
            while True:
                chunk = self._call(stream.recv, 1 << 20, doing="read the screenshot")
                if not chunk or chunk == -2:
                    break
                data += chunk
                if len(data) > limit:
                    raise HypervisorError(f"screenshot larger than {limit >> 20} MiB")
            self._call(stream.finish, doing="end the screenshot")
        except BaseException:
            with contextlib.suppress(libvirt.libvirtError):
                stream.abort()
            raise
        return mime or "", bytes(data)

    def shutdown(self, uuid: str) -> None:
        """Ask the guest to shut down (guest agent, else ACPI button); returns at once."""
        flags = libvirt.VIR_DOMAIN_SHUTDOWN_GUEST_AGENT | libvirt.VIR_DOMAIN_SHUTDOWN_ACPI_POWER_BTN
        self._call(self._dom(uuid).shutdownFlags, flags, doing="shut down domain")

    def destroy(self, uuid: str) -> None:
        self._call(self._dom(uuid).destroy, doing="force off domain")

    def undefine(self, uuid: str) -> None:
        """Undefine with everything libvirt keeps beside the definition (metadata only)."""
        dom = self._dom(uuid)
        flags = (
            libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
            | libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA
            | libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
            | libvirt.VIR_DOMAIN_UNDEFINE_NVRAM
        )
        self._call(dom.undefineFlags, flags, doing="undefine domain")

    def wait_state(self, uuid: str, state: str, timeout: float, interval: float = 0.5) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.domain(uuid).state == state:
                return True
            time.sleep(interval)
        return self.domain(uuid).state == state

    # -- push backups (libvirt backup API) -----------------------------------------------------
    def backup_begin(
        self,
        uuid: str,
        targets: dict[str, str],
        *,
        all_targets: tuple[str, ...] = (),
        checkpoint: str | None = None,
        incremental: str | None = None,
        bitmap_disks: tuple[str, ...] = (),
        pull_socket: str | None = None,
    ) -> None:
        """Start a push-mode backup of ``targets`` (disk target -> qcow2 file QEMU creates).

        ``checkpoint`` creates a checkpoint with a bitmap in each of ``bitmap_disks`` (qcow2
        only: libvirt refuses bitmaps on raw). ``incremental`` copies only what changed since
        that checkpoint, on ``bitmap_disks``; the other disks are copied in full. Disks in
        ``all_targets`` but not in ``targets`` are explicitly left out.
        """
        backup = domain_xml.backup_xml(
            targets, all_targets, incremental, bitmap_disks, pull_socket=pull_socket
        )
        checkpoint_xml = None
        if checkpoint:
            checkpoint_xml = domain_xml.checkpoint_xml(
                checkpoint, [*all_targets, *targets], bitmap_disks
            )
        self._completed.pop(uuid, None)
        dom = self._dom(uuid)
        self._call(
            dom.backupBegin,
            backup,
            checkpoint_xml,
            0,
            doing="start backup job",
        )

    def job_progress(self, uuid: str) -> JobProgress:
        stats = self._call(self._dom(uuid).jobStats, 0, doing="read job progress")
        kind = stats.get("type", libvirt.VIR_DOMAIN_JOB_NONE)
        processed = stats.get("disk_processed", stats.get("data_processed", 0))
        total = stats.get("disk_total", stats.get("data_total", 0))
        return JobProgress(
            active=kind not in (libvirt.VIR_DOMAIN_JOB_NONE,),
            kind="backup"
            if stats.get("operation") == libvirt.VIR_DOMAIN_JOB_OPERATION_BACKUP
            else str(stats.get("operation", "")),
            processed=int(processed or 0),
            total=int(total or 0),
        )

    def wait_backup(
        self,
        uuid: str,
        *,
        on_progress: Callable[[int, int], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
        timeout: float = 24 * 3600,
        interval: float = 0.5,
    ) -> None:
        """Wait for the backup job; raise with QEMU's own reason when it fails.

        Job info after a failure says only "failed": the reason (e.g. "No space left on
        device") travels in the job-completed event, which the event loop stores for us.
        """
        deadline = time.monotonic() + timeout
        reconnected, pause = False, 0.02
        while True:
            try:
                progress = self.job_progress(uuid)
            except HypervisorError:
                if self._alive():
                    raise
                self.reconnect()  # libvirtd restarted: QEMU's job went on without it
                reconnected = True
                continue
            if not progress.active:
                break
            if on_progress:
                on_progress(progress.processed, progress.total)
            if should_stop and should_stop():
                self.abort_job(uuid)
                raise HypervisorError("backup job cancelled")
            if time.monotonic() > deadline:
                self.abort_job(uuid)
                raise HypervisorError(f"backup job did not finish within {timeout:.0f}s")
            # The event wakes us at the job's end; polling stays as the fallback (progress,
            # cancel, a lost event after a libvirtd restart).
            if uuid in self._completed:
                time.sleep(0.02)  # event seen, job info not cleared yet: don't spin
            else:
                self._wait_completed(uuid, pause)
            pause = min(pause * 1.5, interval)  # small incrementals end in a fraction of a second
        self._wait_completed(uuid, 2.0)  # the event may trail the job's end by a moment
        params = self._completed.pop(uuid, {})
        stats = self._call(
            self._dom(uuid).jobStats, libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED, doing="read job"
        )
        failed = stats.get("type") != libvirt.VIR_DOMAIN_JOB_COMPLETED
        errmsg = params.get("errmsg") or stats.get("errmsg")
        if failed and reconnected and not errmsg:
            raise HypervisorError(
                "libvirtd restarted during the backup job and its outcome is unknown; "
                "the copy is discarded"
            )
        if failed or errmsg:
            raise HypervisorError(f"backup job failed: {errmsg or 'no reason given by libvirt'}")

    def abort_job(self, uuid: str) -> None:
        with contextlib.suppress(libvirt.libvirtError):
            self._dom(uuid).abortJob()

    def end_backup_job(self, uuid: str, settle: float = 10) -> None:
        """Make sure no backup job of ours keeps running (a pull backup ends this way).

        Right after a libvirtd restart the job may reappear once libvirt has reconnected
        to QEMU, so the check is repeated for a few seconds.
        """
        deadline = time.monotonic() + (settle if self._restarted else 0)
        while True:
            self.abort_job(uuid)
            try:
                active = self.job_progress(uuid).active
            except HypervisorError:
                active = True
            if not active and time.monotonic() >= deadline:
                return
            if time.monotonic() > deadline + 30:
                raise HypervisorError("the backup job could not be ended")
            time.sleep(0.5)

    def backup_job_targets(self, uuid: str) -> list[str]:
        """Target files of the domain's running backup job ([] when none)."""
        try:
            xml = self._dom(uuid).backupGetXMLDesc(0)
        except libvirt.libvirtError:
            return []
        root = ET.fromstring(xml)
        files = root.findall("disks/disk/target") + root.findall("disks/disk/scratch")
        return [t.get("file", "") for t in files if t.get("file")]

    # -- checkpoints ---------------------------------------------------------------------------
    def checkpoints(self, uuid: str) -> list[str]:
        dom = self._dom(uuid)
        return [c.getName() for c in self._call(dom.listAllCheckpoints, doing="list checkpoints")]

    def checkpoint_xml(self, uuid: str, name: str) -> str:
        dom = self._dom(uuid)
        cp = self._call(dom.checkpointLookupByName, name, 0, doing="find checkpoint")
        return self._call(cp.getXMLDesc, 0, doing="read checkpoint")

    def delete_checkpoint(self, uuid: str, name: str, metadata_only: bool = False) -> None:
        dom = self._dom(uuid)
        cp = self._call(dom.checkpointLookupByName, name, 0, doing="find checkpoint")
        flags = libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY if metadata_only else 0
        self._call(cp.delete, flags, doing="delete checkpoint")

    def redefine_checkpoint(self, uuid: str, xml: str) -> None:
        """Tell libvirt about a checkpoint again; it checks that the bitmaps exist."""
        dom = self._dom(uuid)
        flags = (
            libvirt.VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE
            | libvirt.VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE_VALIDATE
        )
        self._call(dom.checkpointCreateXML, xml, flags, doing="redefine checkpoint")

    def checkpoint_changed_bytes(self, uuid: str, name: str) -> dict[str, int]:
        """Bytes dirtied since the checkpoint, per disk; fails when a bitmap is missing."""
        dom = self._dom(uuid)
        cp = self._call(dom.checkpointLookupByName, name, 0, doing="find checkpoint")
        xml = self._call(
            cp.getXMLDesc,
            libvirt.VIR_DOMAIN_CHECKPOINT_XML_SIZE | libvirt.VIR_DOMAIN_CHECKPOINT_XML_NO_DOMAIN,
            doing="measure checkpoint",
        )
        root = ET.fromstring(xml)
        return {
            d.get("name", ""): int(d.get("size", "0"))
            for d in root.findall("disks/disk")
            if d.get("checkpoint") == "bitmap"
        }

    # -- external snapshots --------------------------------------------------------------------
    def snapshot_disks(
        self,
        uuid: str,
        overlays: dict[str, str],
        *,
        all_targets: tuple[str, ...],
        quiesce: bool = False,
        memory_file: str | None = None,
    ) -> None:
        """Atomic external snapshot: every disk in ``overlays`` switches to a new overlay.

        Disks not listed are excluded; ``memory_file`` also saves the RAM state (the
        guest pauses while it is written), so the set of images restores to a running VM.
        """
        snap = domain_xml.snapshot_xml(
            f"vmbackup-{int(time.time())}", overlays, all_targets, memory_file
        )
        flags = (
            libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_ATOMIC
            | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_NO_METADATA
        )
        if not memory_file:
            flags |= libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY
        if quiesce:
            flags |= libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_QUIESCE
        dom = self._dom(uuid)
        self._call(
            dom.snapshotCreateXML,
            snap,
            flags,
            doing="create external snapshot",
        )

    def block_job(self, uuid: str, target: str) -> BlockJob | None:
        info = self._call(self._dom(uuid).blockJobInfo, target, 0, doing="read block job")
        if not info:
            return None
        return BlockJob(
            target=target,
            kind=_BLOCK_JOB_KINDS.get(info.get("type"), "unknown"),
            cur=int(info.get("cur", 0)),
            end=int(info.get("end", 0)),
        )

    def abort_block_job(self, uuid: str, target: str, *, pivot: bool = False) -> None:
        flags = libvirt.VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT if pivot else 0
        self._call(self._dom(uuid).blockJobAbort, target, flags, doing="end block job")

    def commit_active(self, uuid: str, target: str, *, timeout: float = 600) -> None:
        """Merge the active overlay of ``target`` into its backing file and pivot back.

        Waits (bounded) for the job to be ready; a job that is already running (a crashed
        run's) is resumed rather than started twice.
        """
        dom = self._dom(uuid)
        if self.block_job(uuid, target) is None:
            flags = libvirt.VIR_DOMAIN_BLOCK_COMMIT_ACTIVE | libvirt.VIR_DOMAIN_BLOCK_COMMIT_SHALLOW
            self._call(dom.blockCommit, target, None, None, 0, flags, doing="start blockcommit")
        deadline = time.monotonic() + timeout
        while True:
            job = self.block_job(uuid, target)
            if job is None:
                raise HypervisorError(f"blockcommit of {target} ended before it was ready")
            if job.ready:
                break
            if time.monotonic() > deadline:
                raise HypervisorError(f"blockcommit of {target} not ready after {timeout:.0f}s")
            time.sleep(0.2)
        self.pivot(uuid, target, deadline)

    def pivot(self, uuid: str, target: str, deadline: float) -> None:
        """Switch ``target`` to its block job's destination (commit's base, copy's mirror)
        and wait, up to ``deadline`` (monotonic), for the job to be gone."""
        while True:
            try:
                self.abort_block_job(uuid, target, pivot=True)
                break
            except HypervisorError as exc:
                # cur == end is only a hint: QEMU may still be moving the job to "ready",
                # and libvirt then refuses the pivot ("not ready for pivot yet")
                if not _not_ready(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        while self.block_job(uuid, target) is not None and time.monotonic() < deadline:
            time.sleep(0.1)

    def block_copy(
        self, uuid: str, target: str, dest: str, fmt: str, *, bandwidth: int = 0
    ) -> None:
        """Start copying ``target`` with its whole backing chain into ``dest`` (an empty
        image we created, of the disk's size), mirroring guest writes, until ``pivot``.

        A transient job (libvirt refuses others on a persistent domain); at the pivot
        libvirt still points the persistent definition at ``dest``. The job lives in QEMU:
        it outlives our process, and ``block_job`` finds it again. ``bandwidth``: bytes/s,
        0 for no limit."""
        disk = ET.Element("disk", type="file")
        ET.SubElement(disk, "driver", type=fmt)
        ET.SubElement(disk, "source", file=dest)
        flags = (
            libvirt.VIR_DOMAIN_BLOCK_COPY_REUSE_EXT | libvirt.VIR_DOMAIN_BLOCK_COPY_TRANSIENT_JOB
        )
        params = {libvirt.VIR_DOMAIN_BLOCK_COPY_BANDWIDTH: bandwidth} if bandwidth else None
        dom = self._dom(uuid)
        self._call(
            dom.blockCopy,
            target,
            ET.tostring(disk, encoding="unicode"),
            params,
            flags,
            doing=f"start block copy of {target}",
        )

    # -- disk sources ----------------------------------------------------------------------------
    def disk_source(self, uuid: str, target: str, *, inactive: bool = False) -> str | None:
        dom = self._dom(uuid)
        if inactive and not dom.isPersistent():
            return None
        flags = libvirt.VIR_DOMAIN_XML_INACTIVE if inactive else 0
        info = parse_domain_xml(self._call(dom.XMLDesc, flags, doing="read definition"))
        return next((d.source for d in info.disks if d.target == target), None)

    def sources_in_use(self, uuid: str) -> set[str]:
        """Every disk source of the live and the persistent definition."""
        dom = self._dom(uuid)
        flags = [0, libvirt.VIR_DOMAIN_XML_INACTIVE] if dom.isPersistent() else [0]
        sources = set()
        for flag in flags:
            xml = self._call(dom.XMLDesc, flag, doing="read definition")
            sources |= {d.source for d in parse_domain_xml(xml).disks if d.source}
        return sources

    def set_disk_source(self, uuid: str, target: str, path: str, fmt: str) -> None:
        """Point a disk of the persistent definition at ``path`` (after an offline commit)."""
        dom = self._dom(uuid)
        xml = self._call(
            dom.XMLDesc,
            libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE,
            doing="read definition",
        )
        new_xml = domain_xml.with_disk_source(xml, target, path, fmt)
        self._call(self._conn.defineXML, new_xml, doing="redefine domain")

    # -- guest agent -----------------------------------------------------------------------------
    def agent_responds(self, uuid: str, timeout: int = 5) -> bool:
        import libvirt_qemu

        try:
            libvirt_qemu.qemuAgentCommand(self._dom(uuid), '{"execute":"guest-ping"}', timeout, 0)
        except libvirt.libvirtError:
            return False
        return True

    def agent_command(self, uuid: str, execute: str, arguments: dict | None = None,
                      timeout: int = 5):  # fmt: skip
        """One guest agent command; its ``return`` value (JSON-decoded)."""
        import libvirt_qemu

        command: dict = {"execute": execute}
        if arguments is not None:
            command["arguments"] = arguments
        reply = self._call(
            libvirt_qemu.qemuAgentCommand, self._dom(uuid), json.dumps(command), timeout, 0,
            doing=f"guest agent {execute}",
        )  # fmt: skip
        try:
            return json.loads(reply)["return"]
        except (ValueError, KeyError, TypeError) as exc:
            raise HypervisorError(f"guest agent {execute}: unreadable reply {reply!r}") from exc

    def freeze(self, uuid: str) -> int:
        return self._call(self._dom(uuid).fsFreeze, None, 0, doing="freeze guest filesystems")

    def thaw(self, uuid: str) -> int:
        return self._call(self._dom(uuid).fsThaw, None, 0, doing="thaw guest filesystems")


@contextlib.contextmanager
def session(uri: str) -> Iterator[Session]:
    with Session(uri) as opened:
        yield opened


def _not_ready(exc: HypervisorError) -> bool:
    """libvirt refused a pivot because the block job is not ready yet (worth a retry)."""
    cause = exc.__cause__
    return (
        isinstance(cause, libvirt.libvirtError)
        and cause.get_error_code() == libvirt.VIR_ERR_BLOCK_COPY_ACTIVE
    )


_event_loop_lock = threading.Lock()
_event_loop_started = False


def ensure_event_loop() -> None:
    """Run libvirt's default event loop in a daemon thread (needed for job events).

    Must run before the connection whose events we want is opened.
    """
    global _event_loop_started
    with _event_loop_lock:
        if _event_loop_started:
            return
        libvirt.virEventRegisterDefaultImpl()

        def loop():
            while True:
                libvirt.virEventRunDefaultImpl()

        threading.Thread(target=loop, name="libvirt-events", daemon=True).start()
        _event_loop_started = True


# -- domain events (live inventory) --------------------------------------------------------------

_LIFECYCLE = {
    libvirt.VIR_DOMAIN_EVENT_DEFINED: "defined",
    libvirt.VIR_DOMAIN_EVENT_UNDEFINED: "undefined",
    libvirt.VIR_DOMAIN_EVENT_STARTED: "started",
    libvirt.VIR_DOMAIN_EVENT_SUSPENDED: "suspended",
    libvirt.VIR_DOMAIN_EVENT_RESUMED: "resumed",
    libvirt.VIR_DOMAIN_EVENT_STOPPED: "stopped",
    libvirt.VIR_DOMAIN_EVENT_SHUTDOWN: "shutdown",
    libvirt.VIR_DOMAIN_EVENT_PMSUSPENDED: "pmsuspended",
    libvirt.VIR_DOMAIN_EVENT_CRASHED: "crashed",
}


@dataclass(frozen=True)
class DomainEvent:
    """Something happened to a domain; what it is now is read again, never trusted from here."""

    uuid: str
    kind: str  # lifecycle | device-added | device-removed | disk-change
    detail: str  # lifecycle: defined, undefined, started, stopped, ...; devices: the alias


class EventWatch:
    """A connection that reports domain events to ``on_event`` (called from libvirt's event
    thread: keep it short, e.g. put the event on a queue).

    Keepalive makes a libvirtd that died or hangs close the connection within
    ``interval * (count + 1)`` seconds; ``closed`` is set then (and on our own close), so
    the caller reconnects and reads everything again — events sent meanwhile are lost.
    """

    def __init__(
        self,
        uri: str,
        on_event: Callable[[DomainEvent], None],
        *,
        keepalive: tuple[int, int] = (5, 3),
    ):
        self.uri, self.on_event, self.keepalive = uri, on_event, keepalive
        self.closed = threading.Event()
        self._conn = None
        self._callbacks: list[int] = []

    def __enter__(self) -> EventWatch:
        ensure_event_loop()
        refused = uris.refusal(self.uri)
        if refused:
            raise HypervisorError(f"refusing to connect: {refused}")
        try:
            self._conn = libvirt.open(self.uri)
            self._conn.setKeepAlive(*self.keepalive)
            self._conn.registerCloseCallback(self._on_close, None)
            events = (
                (libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._on_lifecycle),
                (libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_ADDED, self._on_device("device-added")),
                (libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_REMOVED, self._on_device("device-removed")),
                (libvirt.VIR_DOMAIN_EVENT_ID_DISK_CHANGE, self._on_disk_change),
            )
            for event_id, callback in events:
                self._callbacks.append(
                    self._conn.domainEventRegisterAny(None, event_id, callback, None)
                )
        except libvirt.libvirtError as exc:
            self.__exit__(None, None, None)
            raise HypervisorError(f"cannot watch events on {self.uri}: {exc}") from exc
        return self

    def __exit__(self, *exc_info) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            for callback in self._callbacks:
                with contextlib.suppress(libvirt.libvirtError):
                    conn.domainEventDeregisterAny(callback)
            with contextlib.suppress(libvirt.libvirtError):
                conn.unregisterCloseCallback()
            with contextlib.suppress(libvirt.libvirtError):
                conn.close()
        self._callbacks = []
        self.closed.set()

    def _on_close(self, _conn, _reason, _opaque) -> None:
        self.closed.set()

    def _on_lifecycle(self, _conn, dom, event, _detail, _opaque) -> None:
        self.on_event(DomainEvent(dom.UUIDString(), "lifecycle", _LIFECYCLE.get(event, "other")))

    def _on_device(self, kind: str):
        def callback(_conn, dom, alias, _opaque) -> None:
            self.on_event(DomainEvent(dom.UUIDString(), kind, str(alias)))

        return callback

    def _on_disk_change(self, _conn, dom, _old, _new, alias, _reason, _opaque) -> None:
        self.on_event(DomainEvent(dom.UUIDString(), "disk-change", str(alias)))
