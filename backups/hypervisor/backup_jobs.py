"""The libvirt backup API: push and pull backup jobs, their progress and end, checkpoints."""

from __future__ import annotations

import contextlib
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass

import libvirt

from .. import domain_xml
from .connection import HypervisorError


@dataclass(frozen=True)
class JobProgress:
    active: bool
    kind: str  # "backup", "none", ...
    processed: int
    total: int


class BackupJobs:
    """Backup jobs and checkpoints of a ``Session`` (mixed into it)."""

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
            except HypervisorError:  # a guest shut off or destroyed meanwhile has no job
                active = self._running(uuid)
            if not active and time.monotonic() >= deadline:
                return
            if time.monotonic() > deadline + 30:
                raise HypervisorError("the backup job could not be ended")
            time.sleep(0.5)

    def _running(self, uuid: str) -> bool:
        try:
            return bool(self._dom(uuid).isActive())
        except (HypervisorError, libvirt.libvirtError):
            return not self._alive()  # libvirtd itself is away: its job may come back

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
