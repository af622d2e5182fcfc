"""What every kind of restore shares: the chain checked (every header as its manifest says
before qemu-img opens the chain, every file hashed beside the copy, nothing published or
switched before both succeeded), the chain's fingerprint compared after the copy, space,
the refusal rules, flattening a disk, progress and cancel, and recording the result past
the point of no return."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import threading
import time
from pathlib import Path

from django.conf import settings
from django.db import DatabaseError
from django.utils import timezone

from .. import archive, hypervisor, inventory, qemu_img
from ..archive import check as archive_check
from ..models import ACTIVE_STATUSES, Restore
from .rules import RestoreError

log = logging.getLogger(__name__)


def chain_dirs(backup_dir: Path) -> list[Path]:
    """The backup and every backup it builds on, newest first (siblings by name)."""
    try:
        return archive_check.chain_dirs(backup_dir)
    except archive.ArchiveError as exc:
        raise RestoreError(f"backup chain of {backup_dir.name} is unusable: {exc}") from exc


class RestoreCancelled(Exception):
    """The user asked to stop before the point of no return."""


# Steps before which a cancel request is honoured; after "define" / "switch" the restore
# has made its change and finishes.
CANCEL_CHECK_EVERY = 2.0  # seconds between cancel checks while a disk is being copied


CANCELLABLE = frozenset(
    {"verify", "check", "staging", "convert", "tpm", "publish", "partial", "switch"}
)


class Progress:
    """Journal, progress and cancel of a restore or a drill (both have ``step``)."""

    def __init__(self, restore: Restore):
        self.restore = restore
        self.checked = 0.0
        self.beside: ChainCheck | None = None  # the chain check running beside the copy

    def check_cancel(self, every: float = 0.0) -> None:
        """Raise the failure of the check running beside the copy, or RestoreCancelled
        when the user asked; at most one query per ``every`` s."""
        if self.beside is not None:
            self.beside.raise_if_failed()
        now = time.monotonic()
        if now - self.checked < every:
            return
        self.checked = now
        if type(self.restore).objects.filter(pk=self.restore.pk, cancel_requested=True).exists():
            raise RestoreCancelled("cancelled by user")

    def step(self, step: str, **data) -> None:
        if step in CANCELLABLE:
            self.check_cancel()
        self.restore.step = step
        self.restore.journal = [
            *self.restore.journal,
            {"step": step, "at": timezone.now().isoformat(), **data},
        ]
        self.restore.save(update_fields=["step", "journal"])

    def bytes(self, done: int, total: int | None = None) -> None:
        fields = {"bytes_done": done}
        if total is not None:
            fields["bytes_total"] = total
        type(self.restore).objects.filter(pk=self.restore.pk).update(**fields)
        for name, value in fields.items():  # the row in hand stays in step
            setattr(self.restore, name, value)


def record_result(
    restore, hv, progress: Progress, *, path: str, uuid: str, notes: list[str], started=False
):
    """Past the point of no return: start the domain if asked and not ``started`` already
    (a failure is a note, never a rollback) and record where the result is."""
    if restore.start and not started:
        progress.step("start")
        try:
            hv.start(uuid)
        except hypervisor.HypervisorError as exc:
            notes.append(f"the domain did not start: {exc}")
    restore.path, restore.domain_uuid, restore.notes = path, uuid, notes
    restore.save(update_fields=["path", "domain_uuid", "notes"])
    try:  # listed at once, not at the next sync (the event follower may not run here)
        inventory.sync_domain(restore.vm.host, uuid, hv)
    except (hypervisor.HypervisorError, DatabaseError) as exc:
        log.warning("restore %s: could not list domain %s yet: %s", restore.pk, uuid, exc)
    progress.bytes(restore.bytes_total)


def refuse_while_backing_up(vm) -> None:
    """A running backup's retention may be folding this very chain right now."""
    if vm.runs.filter(status__in=ACTIVE_STATUSES).exists():
        raise RestoreError(f"a backup of {vm.name} is running; restore when it has ended")


def fingerprint(backup_dir: Path) -> dict[str, list[int]]:
    """(inode, size, mtime) of every file in the chain (``archive.fingerprint`` without
    the ctime, which lending the files to QEMU moves): pruning folds an image in place
    (``qemu-img rebase``) or deletes a directory, and either shows up here."""
    marks = {}
    for directory in chain_dirs(backup_dir):
        found = archive.fingerprint(directory).items()
        marks.update({f"{directory}/{name}": mark[:3] for name, mark in found})
    return marks


def require_unchanged(backup_dir: Path, before: dict[str, list[int]]) -> None:
    """After the copy: the chain read is the chain that was verified, or nothing is used."""
    try:
        same = fingerprint(backup_dir) == before
    except (OSError, RestoreError, archive.ArchiveError):
        same = False
    if not same:
        raise RestoreError(
            "the backup chain changed while it was being restored (pruned or rewritten "
            "meanwhile?); nothing restored, try again"
        )


def verify_chain(backup_dir: Path, progress: Progress) -> tuple[archive.Manifest, ChainCheck]:
    """The cheap half of the chain check, before qemu-img opens anything: in the backup and
    every backup it builds on, every file plain and listed, every manifest readable and
    covered, every image header as its manifest says (an image reads only its parent,
    ``archive`` refuses any other backing), and ``qemu-img check`` of each image alone.
    Returns the manifest and the expensive half (every file hashed), to run beside the
    copy: ``with check: <copy>`` ends only when both have succeeded."""
    dirs = chain_dirs(backup_dir)
    progress.step("verify", backups=[d.name for d in dirs])
    found = []
    for directory in reversed(dirs):  # the full first: a broken link reports its own fault
        structure = archive_check.structure(directory)
        errors = list(structure.errors) or archive_check.image_checks(structure)
        if errors:
            raise _failed(directory, errors)
        found.append(structure)
    return archive.read_manifest(backup_dir), ChainCheck(found, progress)


def _failed(directory: Path, errors) -> RestoreError:
    return RestoreError(
        f"backup {directory.name} failed its check, not restoring: " + "; ".join(errors[:5])
    )


class ChainCheck:
    """Every file of the chain hashed against its SHA256SUMS in a thread, while the main
    thread flattens: the two use both cores, and the page cache serves whichever reads a
    range second (the hash keeps its pages, see ``archive.hash_fd``), so the chain is read
    from disk once.  Nothing here touches the database or runs qemu-img (that stays in the
    job's thread): a failure is kept for the main thread, which raises it at its next
    progress report (killing qemu-img), at its next step, or when it waits at the end.

    ``with check:`` starts it (journal ``check``); leaving the block normally waits for it
    (journal ``checked``) and raises if it failed; leaving on an exception stops it within
    one read.  The fingerprint taken before (``fingerprint``/``require_unchanged``) still
    proves that the bytes hashed are the bytes copied."""

    def __init__(self, found: list, progress: Progress):
        self.found, self.progress = found, progress
        self.stop = threading.Event()
        self.failure: RestoreError | None = None
        self.ended: str | None = None
        self.journaled = False
        self.thread = threading.Thread(target=self._run, name="restore-check", daemon=True)

    def _run(self) -> None:
        failure = None
        try:
            for structure in self.found:
                result = archive_check.data(
                    structure, check_images=False, stop=self.stop, keep_cache=True, first_error=True
                )
                if not result.ok:
                    failure = _failed(structure.directory, result.errors)
                    break
        except archive_check.Stop:
            pass
        except Exception as exc:  # a bug must fail the restore, not pass the check
            failure = RestoreError(f"the chain check failed: {exc!r}")
        self.ended = timezone.now().isoformat()
        self.failure = failure  # last: the main thread reads ``ended`` once it sees this

    def __enter__(self) -> ChainCheck:
        dirs = [s.directory.name for s in reversed(self.found)]
        self.progress.step("check", backups=dirs, beside="convert")
        self.thread.start()
        self.progress.beside = self
        return self

    def __exit__(self, kind, exc, tb) -> None:
        try:
            if kind is None:
                self.wait()
        finally:
            self.progress.beside = None
            self.stop.set()
            self.thread.join(timeout=60)  # stops within one 8 MiB read

    def raise_if_failed(self) -> None:
        """Called from the main thread (``Progress.check_cancel``): the first time it sees
        the failure, the journal records when the check ended."""
        if self.failure is None:
            return
        if not self.journaled:
            self.journaled = True
            self.progress.step("checked", ok=False, ended=self.ended)
        raise self.failure

    def wait(self) -> None:
        """After the copy: wait for the check, honouring cancel meanwhile."""
        if self.thread.is_alive():
            self.progress.step("check", waiting=True)
        while self.thread.is_alive():
            self.thread.join(timeout=max(CANCEL_CHECK_EVERY, 0.1))
            self.progress.check_cancel(every=CANCEL_CHECK_EVERY)
        self.raise_if_failed()
        self.journaled = True
        self.progress.step("checked", ok=True, ended=self.ended)


def needed_bytes(backup_dir: Path, disks) -> int:
    """What the flattened disks will take (qemu-img measure of each chain's top image)."""
    return sum(
        qemu_img.measure(str(backup_dir / d.file), d.image_format, "qcow2").required for d in disks
    )


def require_space(where: Path, needed: int) -> None:
    free = shutil.disk_usage(where).free
    if needed > free:
        raise RestoreError(
            f"not enough space at {where}: need about {needed >> 20} MiB, {free >> 20} MiB free"
        )


def flatten(backup_dir: Path, disk, out: Path, fmt: str, progress: Progress, base: int) -> None:
    """One disk's chain into a standalone image, progress counted from ``base`` bytes."""

    def report(fraction: float) -> None:
        progress.bytes(base + int(fraction * disk.virtual_size))
        progress.check_cancel(every=CANCEL_CHECK_EVERY)  # raising here kills qemu-img

    # ``out`` exists already, created 0600 by the caller: qemu-img writes into it and
    # keeps its mode, so the disk is never readable by others, not even mid-copy. Written
    # around the page cache where the filesystem allows (nothing reads it back soon), else
    # written back while it is copied.
    direct = qemu_img.direct_io(str(out))
    progress.step("convert", disk=disk.target, image=disk.file, out=str(out), direct=direct)
    with contextlib.nullcontext() if direct else WrittenBack(out):
        qemu_img.convert(
            str(backup_dir / disk.file),
            disk.image_format,
            str(out),
            fmt,
            progress=report,
            timeout=settings.Q_TIMEOUT,
            direct=direct,
        )


class WrittenBack:
    """A disk being written is written back to storage meanwhile (``fdatasync`` in a loop
    in a thread), so the fsync before the publish or switch finds little left to do:
    without it the whole disk went to storage after the copy, one after the other (qemu-img
    writes through the page cache and never flushes). Durability still comes from that
    fsync; this only moves the work earlier."""

    EVERY = 0.25  # seconds between two write-backs

    def __init__(self, path: Path):
        self.path = path
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="restore-writeback", daemon=True)
        self.fd: int | None = None

    def _run(self) -> None:
        while not self.stop.wait(self.EVERY):
            try:
                os.fdatasync(self.fd)
            except OSError:  # the publish's fsync reports it
                return

    def __enter__(self) -> WrittenBack:
        self.fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        self.thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop.set()
        self.thread.join()  # at most the write-back in flight
        os.close(self.fd)
