"""Restore a backup as a new domain, from the dashboard (DESIGN "Restore").

The same steps an operator follows in RESTORE.md, done so that nothing half-made is ever
visible: check the whole chain (SHA-256 + ``qemu-img check``) before writing anything,
refuse early (name taken, root not allowed, not enough space), flatten every disk into a
hidden ``<root>/.<name>.restore-<id>.partial`` directory, fsync, rename it to
``<root>/<name>``, and only then define the domain. Whatever fails, what this restore created
is removed again and the original VM is never touched.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pwd
import re
import shutil
import time
import uuid as uuidlib
from pathlib import Path

from django.conf import settings
from django.utils import timezone

from . import archive, archive_check, domain_xml, hypervisor, private, qemu_img, site
from .interrupt import Stopped
from .models import ACTIVE_STATUSES, Restore, RestoreMode, RunStatus

log = logging.getLogger(__name__)

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
NAME_HELP = "letters, digits, '.', '_' and '-', up to 64, starting with a letter or digit"


class RestoreError(Exception):
    """A restore cannot go on; the message is for the user."""


def allowed_roots() -> list[str]:
    """The configured restore roots, absolute and normalised."""
    return [os.path.abspath(root) for root in settings.VMBACKUP_RESTORE_ROOTS if root]


def check_request(name: str, root: str) -> None:
    """What the form checks, checked again where it matters: in the worker."""
    if not NAME_RE.match(name or ""):
        raise RestoreError(f"invalid domain name {name!r}: {NAME_HELP}")
    if os.path.abspath(root) not in allowed_roots():
        raise RestoreError(f"{root} is not one of the configured restore roots")


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
CANCELLABLE = frozenset({"verify", "staging", "convert", "tpm", "publish", "partial", "switch"})


class _Progress:
    def __init__(self, restore: Restore):
        self.restore = restore
        self.checked = 0.0

    def check_cancel(self, every: float = 0.0) -> None:
        """Raise RestoreCancelled when the user asked; at most one query per ``every`` s."""
        now = time.monotonic()
        if now - self.checked < every:
            return
        self.checked = now
        if Restore.objects.filter(pk=self.restore.pk, cancel_requested=True).exists():
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
        Restore.objects.filter(pk=self.restore.pk).update(**fields)
        for name, value in fields.items():  # the row in hand stays in step
            setattr(self.restore, name, value)


def execute(restore: Restore) -> str:
    """Run a claimed restore to its end; returns a one-line outcome for django-q2."""
    from .runner import Heartbeat

    every = max(1.0, min(30.0, settings.VMBACKUP_STALE_AFTER / 5))
    with Heartbeat(restore.pk, every, model=Restore):
        return _execute(restore)


def _execute(restore: Restore) -> str:
    from . import restore_in_place

    progress = _Progress(restore)
    created: list[Path] = []  # removed again unless the restore succeeds
    defined: list[str] = []  # new domains, undefined again on failure
    swaps: list[tuple[str, str]] = []  # in place: (disk path, kept original), put back
    try:
        with hypervisor.session(restore.backup.vm.host.uri) as hv:
            if restore.mode == RestoreMode.IN_PLACE:
                result = restore_in_place.restore(restore, hv, progress, created, swaps)
            else:
                result = _restore(restore, hv, progress, created, defined)
        created.clear()
        _finish(restore, RunStatus.SUCCEEDED)
        return result
    except RestoreCancelled as exc:
        _undo(restore, created, defined)
        _finish(restore, RunStatus.CANCELLED, str(exc))
        return "cancelled"
    # every failure is recorded as data on the restore; so is a stop of the command running
    # it (vmbackup_restore --wait), then raised again
    except (Exception, Stopped) as exc:
        if isinstance(exc, Stopped):
            log.warning("restore %s: %s", restore.pk, exc)
        else:
            log.exception("restore %s failed", restore.pk)
        reason = str(exc) or exc.__class__.__name__
        if isinstance(exc, OSError) and exc.errno == 28:
            reason = f"destination full (no space left on device): {reason}"
        steps = {entry.get("step") for entry in restore.journal if isinstance(entry, dict)}
        if "switched" in steps:  # past the point of no return: say what stands
            reason = f"the VM already has the restored disks (old ones kept), but: {reason}"
        elif "define" in steps and not created:
            reason = f"the new domain {restore.name} is defined, but: {reason}"
        if swaps:
            problems = restore_in_place.undo_switch(swaps)
            reason += "; the switched disks were put back" + (
                f" except: {'; '.join(problems)}" if problems else ""
            )
            with contextlib.suppress(Exception):  # reconcile must not redo it
                progress.step("undone")
        _undo(restore, created, defined)
        if isinstance(exc, Stopped):
            _finish(restore, RunStatus.INTERRUPTED, reason)
            raise
        _finish(restore, RunStatus.FAILED, reason)
        return f"failed: {reason}"


def _restore(restore, hv, progress: _Progress, created: list[Path], defined: list[str]) -> str:
    check_request(restore.name, restore.root)
    root = Path(os.path.abspath(restore.root))
    if not root.is_dir():
        raise RestoreError(f"restore root {root} does not exist")
    final = root / restore.name
    staging = staging_paths(restore)[0]
    refuse_while_backing_up(restore.backup.vm)
    if hv.uuid_by_name(restore.name):
        raise RestoreError(f"a domain named {restore.name} already exists")
    if os.path.lexists(final):
        raise RestoreError(f"{final} already exists; nothing is overwritten")
    backup_dir = Path(restore.backup.path)
    before = fingerprint(backup_dir)
    manifest = verify_chain(backup_dir, progress)
    require_space(root, needed_bytes(backup_dir, manifest.disks))

    progress.step("staging", path=str(staging))
    # 0711, not 0700: libvirt's DAC driver hands each disk file to QEMU's user when the
    # domain starts, but QEMU still has to pass through this directory to open them.
    # Search-only lists nothing; every file in it is 0600.
    private.mkdir(staging, private.TRAVERSE)
    created.append(staging)
    total = sum(d.virtual_size for d in manifest.disks)
    progress.bytes(0, total)
    done = 0
    disks: dict[str, tuple[str, str]] = {}
    for disk in manifest.disks:
        out = staging / f"{disk.target}.{disk.format}"
        private.create_file(out)  # 0600 before a byte is copied
        flatten(backup_dir, disk, out, disk.format, progress, done)
        done += disk.virtual_size
        disks[disk.target] = (str(final / out.name), disk.format)
    nvram = None
    if manifest.nvram:
        private.copy_file(backup_dir / manifest.nvram, staging / "nvram.fd")
        nvram = str(final / "nvram.fd")

    require_unchanged(backup_dir, before)
    new_uuid = str(uuidlib.uuid4())
    xml, notes = domain_xml.restored_xml(
        (backup_dir / "domain.xml").read_text(),
        name=restore.name,
        uuid=new_uuid,
        disks=disks,
        nvram=nvram,
    )
    notes = [_with_reason(note, manifest.skipped) for note in notes]
    if manifest.nvram and "<nvram" not in xml:
        notes.append("the definition has no <nvram>: the backed-up variable store is not used")
    if manifest.tpm:
        tpm = Path(settings.VMBACKUP_SWTPM_DIR) / new_uuid
        progress.step("tpm", path=str(tpm))
        created.append(tpm)
        _restore_tpm(backup_dir / manifest.tpm, tpm)
    if manifest.memory:
        notes.append("the RAM state is not resumed: the new domain boots from its disks")

    progress.step("publish", path=str(final))
    archive.make_durable(staging)
    if os.path.lexists(final):
        raise RestoreError(f"{final} appeared meanwhile; nothing is overwritten")
    os.rename(staging, final)
    created[created.index(staging)] = final
    archive.make_durable(final)

    progress.step("define", uuid=new_uuid)
    hv.define(xml)
    created.clear()  # the point of no return: the domain exists and owns these files
    record_result(restore, hv, progress, path=str(final), uuid=new_uuid, notes=notes)
    return f"restored as {restore.name} in {final}"


def record_result(restore, hv, progress: _Progress, *, path: str, uuid: str, notes: list[str]):
    """Past the point of no return: start the domain if asked (a failure is a note, never a
    rollback) and record where the result is."""
    if restore.start:
        progress.step("start")
        try:
            hv.start(uuid)
        except hypervisor.HypervisorError as exc:
            notes.append(f"the domain did not start: {exc}")
    restore.path, restore.domain_uuid, restore.notes = path, uuid, notes
    restore.save(update_fields=["path", "domain_uuid", "notes"])
    progress.bytes(restore.bytes_total)


def _with_reason(note: str, skipped: tuple[dict, ...]) -> str:
    """'disk vdc was not in the backup ...' with the reason the backup recorded, if any."""
    for skip in skipped:
        if note.startswith(f"disk {skip['target']} was not in the backup"):
            return f"disk {skip['target']} was not backed up ({skip['reason']}) and is left out"
    return note


def refuse_while_backing_up(vm) -> None:
    """A running backup's retention may be folding this very chain right now."""
    if vm.runs.filter(status__in=ACTIVE_STATUSES).exists():
        raise RestoreError(f"a backup of {vm.name} is running; restore when it has ended")


def fingerprint(backup_dir: Path) -> dict[str, tuple[int, int, int]]:
    """(inode, size, mtime) of every file in the chain: pruning folds an image in place
    (``qemu-img rebase``) or deletes a directory, and either shows up here."""
    marks = {}
    for directory in chain_dirs(backup_dir):
        for path in sorted(directory.rglob("*")):
            st = path.lstat()
            marks[str(path)] = (st.st_ino, st.st_size, st.st_mtime_ns)
    return marks


def require_unchanged(backup_dir: Path, before: dict[str, tuple[int, int, int]]) -> None:
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


def verify_chain(backup_dir: Path, progress: _Progress) -> archive.Manifest:
    """Check the backup and every backup it builds on before anything is written: every
    file hashed, every image header as its manifest says (an image reads only its parent,
    ``archive`` refuses any other backing), before qemu-img opens a chain."""
    dirs = chain_dirs(backup_dir)
    progress.step("verify", backups=[d.name for d in dirs])
    for directory in reversed(dirs):  # the full first: a broken link reports its own fault
        result = archive_check.verify(directory)
        if not result.ok:
            raise RestoreError(
                f"backup {directory.name} failed its check, not restoring: "
                + "; ".join(result.errors[:5])
            )
    return archive.read_manifest(backup_dir)


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


def flatten(backup_dir: Path, disk, out: Path, fmt: str, progress: _Progress, base: int) -> None:
    """One disk's chain into a standalone image, progress counted from ``base`` bytes."""
    progress.step("convert", disk=disk.target, image=disk.file, out=str(out))

    def report(fraction: float) -> None:
        progress.bytes(base + int(fraction * disk.virtual_size))
        progress.check_cancel(every=CANCEL_CHECK_EVERY)  # raising here kills qemu-img

    # ``out`` exists already, created 0600 by the caller: qemu-img writes into it and
    # keeps its mode, so the disk is never readable by others, not even mid-copy
    qemu_img.convert(
        str(backup_dir / disk.file),
        disk.image_format,
        str(out),
        fmt,
        progress=report,
        timeout=settings.Q_TIMEOUT,
    )


def _restore_tpm(source: Path, target: Path) -> None:
    """The TPM state goes where libvirt's swtpm looks for the new UUID, owned by the user
    swtpm runs as (``tss`` on Debian) when there is one; private (0700/0600) throughout."""
    private.copy_tree(source, target)
    with contextlib.suppress(KeyError):
        user = pwd.getpwnam("tss")
        for path in [target, *target.rglob("*")]:
            os.chown(path, user.pw_uid, user.pw_gid)


def _undo(restore: Restore, created: list[Path], defined: list[str]) -> None:
    """Remove what this restore made: its domain (if defined), its directories."""
    if defined:
        try:
            with hypervisor.session(restore.backup.vm.host.uri) as hv:
                for dom_uuid in defined:
                    with contextlib.suppress(hypervisor.HypervisorError):
                        hv.destroy(dom_uuid)
                    hv.undefine(dom_uuid)
        except Exception:
            log.exception("restore %s: could not undefine %s", restore.pk, defined)
    for path in reversed(created):
        try:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        except FileNotFoundError:
            pass
        except OSError:
            log.exception("restore %s: could not remove %s", restore.pk, path)


def _finish(restore: Restore, status: str, error: str = "") -> None:
    """Record the outcome once: a restore reconcile already ended keeps that outcome."""
    Restore.objects.filter(pk=restore.pk, status=RunStatus.RUNNING).update(
        status=status,
        error=error,
        finished_at=timezone.now(),
        step="done" if status == RunStatus.SUCCEEDED else restore.step,
    )
    restore.refresh_from_db()


def staging_paths(restore: Restore) -> list[Path]:
    """Where a dead restore may have left files (for reconcile)."""
    root = Path(os.path.abspath(restore.root))
    # named with the installation, as every directory a job leaves while it runs
    return [root / f".{restore.name}.restore-{site.site_id()}-{restore.pk}.partial"]
