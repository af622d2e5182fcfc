"""External snapshots and block jobs: commit back, copy with a mirror, pivot."""

from __future__ import annotations

import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass

import libvirt

from .. import domain_xml
from .connection import HypervisorError


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


def _not_ready(exc: HypervisorError) -> bool:
    """libvirt refused a pivot because the block job is not ready yet (worth a retry)."""
    cause = exc.__cause__
    return (
        isinstance(cause, libvirt.libvirtError)
        and cause.get_error_code() == libvirt.VIR_ERR_BLOCK_COPY_ACTIVE
    )


class BlockJobs:
    """Snapshots and block jobs of a ``Session`` (mixed into it)."""

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
