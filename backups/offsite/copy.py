"""Copy one published backup into an offsite restic repository, in chain order.

The order is the promise, as for a backup run: check the backup's structure here first
(every file listed in SHA256SUMS, image headers against the manifest); send exactly the
files its SHA256SUMS lists and the manifest accounts for (``offsite.files_to_send``), from
inside the VM directory (the snapshot layout in ``offsite``), while the SHA-256 pass and
``qemu-img check`` run beside the upload; then read the new snapshot's listing back and
compare names and sizes with what was sent and with the manifest. A corrupt backup never
becomes a snapshot (restic is stopped at the first error found, or the snapshot forgotten
when it was written first; data restic had uploaded is unreferenced, for the next prune)
and is marked corrupt. Only then is the copy ``succeeded``.

Chain order: an incremental is useful offsite only with its parents there, so a copy first
sends every ancestor that has no succeeded copy in that repository, oldest first, each
recorded as a copy of its own (``via`` this one), and stops at the first that fails. One
copy per VM is active at a time (its links do not count).

A cancel is honoured within a second wherever the copy is: while the backup is verified
(between two reads), while restic runs (``watch``: restic is interrupted, then its process
group killed — it writes no snapshot), and between the chain's backups; a snapshot
written just before the cancel is forgotten again (best effort, as a discarded one).

A retention fold could rewrite a backup while it is read: a running copy makes prune stand
back, and the files' (inode, size, mtime) taken before the check are compared after the
upload; a change discards (forgets) the new snapshot and fails the copy. restic writes a
snapshot last, so a copy that is stopped or dies leaves none; reconcile marks it
interrupted and requeues it (``repair_dead``).
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

from django.conf import settings
from django.utils import timezone

from .. import alerts, archive, restic, site, worker
from ..archive import check as archive_check
from ..interrupt import Stopped
from ..models import ACTIVE_STATUSES, Backup, OffsiteCopy, RunStatus
from . import OffsiteError, files_to_send, listing_problems, restic_repository, tags

log = logging.getLogger(__name__)
BEAT_EVERY = 2.0  # seconds between progress writes (and cancel checks)


class Cancelled(Exception):
    """The user asked the copy to stop."""


def execute(copy: OffsiteCopy) -> str:
    """Run a claimed copy to its end; returns a one-line outcome for django-q2."""
    with worker.Heartbeat(copy.pk, worker.heartbeat_every(), OffsiteCopy):
        return _execute(copy)


def _execute(copy: OffsiteCopy) -> str:
    links: list[OffsiteCopy] = []
    cancel = CancelWatch(copy)
    try:
        if not copy.repository.enabled:
            raise OffsiteError(f"repository {copy.repository.name} is disabled")
        repo = restic_repository(copy.repository)
        chain = pending_chain(copy.backup, copy.repository)
        copy.log("plan", backups=[b.pk for b in chain])
        for backup in chain[:-1]:
            cancel.now()
            link = _link(copy, backup)
            links.append(link)
            send(link, repo, copy, cancel)
            link.mark_succeeded()
        cancel.now()
        send(copy, repo, copy, cancel)
        copy.mark_succeeded()
        return f"copied backup {copy.backup_id} as snapshot {copy.snapshot_id[:8]}"
    except Cancelled as exc:
        _end(copy, links, RunStatus.CANCELLED, str(exc))
        _unlock(copy)  # restic killed after its grace (a loaded host) leaves its lock
        return "cancelled"
    except Stopped as exc:  # its command or worker was stopped: restic was stopped with it
        _end(copy, links, RunStatus.INTERRUPTED, str(exc))
        raise
    except (OffsiteError, restic.ResticError, archive.ArchiveError, OSError) as exc:
        reason = getattr(exc, "reason", "")
        _end(copy, links, RunStatus.FAILED, _words(copy, links, exc), str(reason))
        return f"failed: {copy.error}"
    except Exception as exc:  # every failure is recorded as data on the copy
        log.exception("offsite copy %s failed", copy.pk)
        _end(copy, links, RunStatus.FAILED, _words(copy, links, exc))
        return f"failed: {copy.error}"


def pending_chain(backup: Backup, repo_model) -> list[Backup]:
    """``backup`` and, before it, every ancestor with no succeeded copy in the repository,
    oldest first. An ancestor pruned here and never copied breaks the chain offsite."""
    chain = [backup]
    node, seen = backup.parent, {backup.pk}
    while node is not None and node.pk not in seen:
        seen.add(node.pk)
        if OffsiteCopy.objects.in_repository(repo_model).filter(backup=node).exists():
            break
        if node.pruned_at is not None:
            raise OffsiteError(
                f"backup {backup.pk} builds on backup {node.pk}, which was pruned here before "
                f"it was copied to {repo_model.name}: take a full backup and copy that"
            )
        chain.insert(0, node)
        node = node.parent
    return chain


def send(
    row: OffsiteCopy, repo: restic.Repository, main: OffsiteCopy, cancel: CancelWatch | None = None
) -> None:
    """Verify, send and check one backup; recorded on ``row`` (the copy, or one of its
    links); ``main`` is the copy whose cancel and progress count.

    The cheap half of the verification (every file listed, headers as the manifest says)
    comes first: nothing is sent before it passes. The SHA-256 pass and ``qemu-img check``
    run beside the upload (as a restore's chain check runs beside its copy): an error
    they find stops restic (no snapshot), and a snapshot written before they end counts
    only once they have passed — else it is forgotten again."""
    cancel = cancel or CancelWatch(main)
    backup = row.backup
    if backup.pruned_at is not None:
        raise OffsiteError(f"backup {backup.pk} was pruned before it could be copied")
    directory = Path(backup.path)
    before = archive.fingerprint(directory)
    manifest, names, found = _structure(row, backup, directory)
    sizes = {name: before[name][1] for name in names}
    marks = tags(manifest, directory.name, site.site_id())
    row.log("send", backup=backup.pk, files=len(names), bytes=sum(sizes.values()), tags=marks)
    fresh = backup.verified_unchanged(before, settings.VMBACKUP_OFFSITE_REHASH_AFTER * 60)
    if fresh:  # verified moments ago (the backup's own check), not touched since
        row.log("verified-before", at=backup.verified_at.isoformat())
    with _Verified() if fresh else _Beside(found) as hashing:
        result = _upload(row, repo, main, backup, directory, names, marks, cancel, hashing)
        verdict = hashing.wait(cancel, on_cancel=lambda: result and _discard(row, repo, result))
    if not verdict.ok:
        _record(backup, found, verdict)
        if result:
            _discard(row, repo, result)
        else:  # restic was stopped, maybe just after it wrote the snapshot
            _discard_strays(row, repo, backup, marks)
        raise OffsiteError(
            f"backup {backup.pk} failed verification, not sent: "
            + "; ".join([*found.errors, *verdict.errors][:5])
        )
    try:
        problems = _changed(directory, before, names)
        if not fresh:
            _record(backup, found, verdict, files=None if problems else before)
        if not problems:
            full, nodes = restic.listing(repo, result, timeout=settings.Q_TIMEOUT, watch=cancel)
            problems = listing_problems(nodes, directory.name, sizes, manifest)
            problems += [] if full.startswith(result) else [f"no snapshot {result} listed"]
    except Cancelled:
        _discard(row, repo, result)
        raise
    if problems:
        _discard(row, repo, result)
        raise OffsiteError(f"snapshot {result[:8]} discarded: " + "; ".join(problems))
    row.snapshot_id, row.verified_at = full, timezone.now()
    row.save(update_fields=["snapshot_id", "verified_at"])
    row.log("listed", files=len(names), snapshot=full)


def _upload(row, repo, main, backup, directory, names, marks, cancel, hashing) -> str:
    """``restic backup`` of the files; returns the snapshot's (short) id, or "" when the
    verification beside it failed first (restic stopped: no snapshot)."""

    def watch() -> None:
        cancel()
        if hashing.failed():
            raise _Corrupt

    try:
        result = restic.backup(
            repo,
            str(directory.parent),
            [f"{directory.name}/{name}" for name in names],
            marks,
            _Progress(row, main),
            host=backup.vm.host.name,
            when=backup.created_at,
            timeout=settings.Q_TIMEOUT,
            watch=watch,
            resolve=False,  # the listing names the full id
        )
    except _Corrupt:
        return ""
    row.snapshot_id, row.bytes_added = result.snapshot_id, result.bytes_added
    row.save(update_fields=["snapshot_id", "bytes_added"])
    row.log("sent", snapshot=result.snapshot_id, added=result.bytes_added)
    return result.snapshot_id


class _Corrupt(Exception):
    """The verification beside the upload found an error: restic is stopped."""


class _Beside:
    """The expensive half of the verification in a thread of its own while restic reads the
    same files (each read once from the disk: the pages are kept for the other). Stopped
    with the block; no database here."""

    def __init__(self, found: archive_check.Structure):
        self.found, self.stop, self.verdict = found, threading.Event(), None
        self.thread = threading.Thread(target=self._run, name="offsite-verify", daemon=True)

    def _run(self) -> None:
        try:
            self.verdict = archive_check.data(
                self.found, stop=self.stop, keep_cache=True, first_error=True
            )
        except archive_check.Stop:
            self.verdict = None
        except Exception as exc:  # a failed verification, recorded as such
            self.verdict = archive_check.VerifyResult(False, (f"verification: {exc}",), 0, 0)

    def __enter__(self) -> _Beside:
        self.thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop.set()
        self.thread.join()

    def failed(self) -> bool:
        return not self.thread.is_alive() and self.verdict is not None and not self.verdict.ok

    def wait(self, cancel: CancelWatch, on_cancel) -> archive_check.VerifyResult:
        """The verdict, once the pass has ended; a cancel meanwhile is honoured."""
        while self.thread.is_alive():
            self.thread.join(0.5)
            try:
                cancel()
            except Cancelled:
                on_cancel()
                raise
        return self.verdict


class _Verified:
    """In place of ``_Beside`` for a backup verified moments ago whose files have not
    changed since (``Backup.verified_unchanged``): nothing is read twice."""

    def __enter__(self) -> _Verified:
        return self

    def __exit__(self, *exc_info) -> None:
        pass

    def failed(self) -> bool:
        return False

    def wait(self, cancel, on_cancel) -> archive_check.VerifyResult:
        return archive_check.VerifyResult(True, (), 0, 0)


def _structure(row: OffsiteCopy, backup: Backup, directory: Path):
    """The cheap half, before anything is sent: a backup it finds broken is marked corrupt
    (alerted) and not sent. Returns the manifest, the files to send and what it found."""
    row.log("verify", path=str(directory))
    found = archive_check.structure(directory)
    if found.sums is None or found.errors:
        _record(backup, found, archive_check.VerifyResult(True, (), 0, 0))
        raise OffsiteError(
            f"backup {backup.pk} failed verification, not sent: " + "; ".join(found.errors[:5])
        )
    manifest = archive.read_manifest(directory)
    return manifest, files_to_send(manifest, found.sums), found


def _record(backup: Backup, found, verdict, files: dict | None = None) -> None:
    """Both halves' outcome on the backup's row, as a verification records it (``files``:
    the fingerprint of what was read, unchanged to its end)."""
    errors = [*found.errors, *verdict.errors]
    backup.mark_verified(not errors, "; ".join(errors), files=files)
    alerts.backup_checked(backup)


def _changed(directory: Path, before: dict, names: list[str]) -> list[str]:
    """A fold switches an image by rename and rewrites the manifest: either shows in the
    fingerprint (``archive.fingerprint``) taken before the check."""
    try:
        after = archive.fingerprint(directory)
    except OSError as exc:
        return [f"{directory.name} changed during the copy: {exc}"]
    # the ctime aside: an instant restore lending the files to QEMU meanwhile moves it
    changed = [name for name in names if after.get(name, [])[:3] != before.get(name, [])[:3]]
    return [f"{name} changed during the copy (pruned or folded meanwhile)" for name in changed]


def _discard(row: OffsiteCopy, repo: restic.Repository, snapshot_id: str) -> None:
    """A snapshot that is not what was meant to be sent is forgotten (best effort: an
    append-only repository refuses; the copy's error names it either way)."""
    try:
        restic.forget(repo, [snapshot_id])
        row.log("forgotten", snapshot=snapshot_id)
    except restic.ResticError as exc:
        row.log("not-forgotten", snapshot=snapshot_id, error=str(exc))


def _discard_strays(row: OffsiteCopy, repo: restic.Repository, backup: Backup, marks) -> None:
    """restic writes its snapshot last, and a stop can come just after it did (a small
    backup uploads in less time than its hash takes): every snapshot carrying this
    backup's tags that no copy recorded as kept there is forgotten."""
    kept = OffsiteCopy.objects.in_repository(row.repository).filter(backup=backup)
    known = set(kept.values_list("snapshot_id", flat=True))
    try:
        found = restic.snapshots(repo, marks, timeout=settings.Q_TIMEOUT)
    except restic.ResticError as exc:
        row.log("not-forgotten", error=str(exc))
        return
    for snap in found:
        if snap.id not in known:
            _discard(row, repo, snap.id)


class CancelWatch:
    """Has the user asked ``copy`` to stop? Asked of the database at most once a second.
    Called (restic's ``watch``), it raises ``Cancelled``, which stops restic before it
    writes a snapshot; ``is_set()`` is what the verification's ``stop`` asks between
    reads. ``now()`` asks at once, between two steps."""

    EVERY = 1.0

    def __init__(self, copy: OffsiteCopy):
        self.copy_id, self.next, self.asked = copy.pk, 0.0, False

    def is_set(self) -> bool:
        if time.monotonic() >= self.next:
            self.next = time.monotonic() + self.EVERY
            filtered = OffsiteCopy.objects.filter(pk=self.copy_id, cancel_requested=True)
            self.asked = self.asked or filtered.exists()
        return self.asked

    def __call__(self) -> None:
        if self.is_set():
            raise Cancelled("cancelled by user")

    def now(self) -> None:
        self.next = 0.0
        self()


class _Progress:
    """restic's status lines as the rows' bytes, throttled."""

    def __init__(self, row: OffsiteCopy, main: OffsiteCopy):
        self.row, self.main, self.last = row, main, 0.0

    def __call__(self, status: restic.Progress) -> None:
        now = time.monotonic()
        if now - self.last < BEAT_EVERY:
            return
        self.last = now
        for row in {self.row.pk: self.row, self.main.pk: self.main}.values():
            row.beat(status.bytes_done, status.total_bytes)


def _link(copy: OffsiteCopy, backup: Backup) -> OffsiteCopy:
    """A parent sent first, as part of ``copy``: running at once, under the same worker."""
    now = timezone.now()
    link = OffsiteCopy.objects.create(
        backup=backup,
        repository=copy.repository,
        trigger="chain",
        via=copy,
        status=RunStatus.RUNNING,
        started_at=now,
        heartbeat_at=now,
        worker=copy.worker,
    )
    copy.log("link", copy=link.pk, backup=backup.pk)
    return link


def _words(copy: OffsiteCopy, links: list[OffsiteCopy], exc: BaseException) -> str:
    text = str(exc) or exc.__class__.__name__
    failed = [link for link in links if link.status in ACTIVE_STATUSES]
    if failed:
        return f"parent backup {failed[-1].backup_id} could not be copied first: {text}"
    return text


def _end(copy, links, status: str, error: str, reason: str = "") -> None:
    """Record the outcome once, on the copy and on any link still running."""
    for link in links:
        link.finish(status, error, only=(RunStatus.RUNNING,), reason=reason)
    copy.finish(status, error, only=(RunStatus.RUNNING,), reason=reason)


def repair_dead(copy: OffsiteCopy, error: str) -> bool:
    """A copy whose worker died: interrupted, with any link it was sending, and the stale
    lock restic left removed (it would block ``check``). restic wrote no snapshot for what
    it was sending. Returns whether this call ended it."""
    for link in copy.links.filter(status=RunStatus.RUNNING):
        link.mark_interrupted(error, only=(RunStatus.RUNNING,))
    ended = copy.mark_interrupted(error, only=(RunStatus.RUNNING,))
    _unlock(copy)
    return ended


def _unlock(copy: OffsiteCopy) -> None:
    """Stale locks removed (``restic unlock`` leaves a live process's alone): a restic that
    died or was killed leaves its lock, which would block ``check`` and offsite prune."""
    try:
        restic.unlock(restic_repository(copy.repository))
    except restic.ResticError as exc:
        copy.log("unlock-failed", error=str(exc))
