"""Restore a backup over its own VM's disks (DESIGN "Restore": in place, domain shut off).

The VM must be shut off and stay so. Every disk is first flattened into a hidden file beside
the disk it replaces (same file system, so the switch is a rename); only when all of them
are written and flushed, and every file of the chain hashed beside the copy has matched its
checksum, are the disks switched, one rename pair each, and the replaced
files are kept as ``<disk>.before-restore-<id>`` — nothing the user had is deleted. A
failure before the switch removes the hidden files; a failure during it renames every
disk already switched back. The domain definition is kept as it is (the backup's
``domain.xml`` stays in the backup for whoever wants the old one).
"""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

from django.conf import settings

from .. import archive, domain_xml, hypervisor, private
from ..backup import methods
from .common import (
    RestoreError,
    fingerprint,
    flatten,
    needed_bytes,
    record_result,
    refuse_while_backing_up,
    require_space,
    require_unchanged,
    verify_chain,
)

KEPT = "{path}.before-restore-{id}"


def kept_name(path: str, restore_id: int) -> str:
    return KEPT.format(path=path, id=restore_id)


def partial_name(path: str, restore_id: int) -> str:
    p = Path(path)
    return str(p.with_name(f".{p.name}.restore-{restore_id}.partial"))


def refusals(restore, hv):
    """What is refused before anything is read or fetched; returns the shut-off domain."""
    vm = restore.backup.vm
    refuse_while_backing_up(vm)
    return _shut_off_domain(hv, str(vm.uuid), vm.name)


def restore(
    restore,
    hv,
    progress,
    created: list[Path],
    swaps: list[tuple[str, str]],
    backup_dir: Path | None = None,
) -> str:
    """Check, write every replacement beside its original, switch them all, then record.
    ``created`` (hidden files) and ``swaps`` (switched paths) tell the caller what to undo
    when this raises before the point of no return. ``backup_dir``: where the backup is
    read when not in its own directory (fetched from offsite)."""
    vm = restore.backup.vm
    uuid = str(vm.uuid)
    domain = refusals(restore, hv)
    backup_dir = backup_dir or Path(restore.backup.path)
    before = fingerprint(backup_dir)
    manifest, check = verify_chain(backup_dir, progress)
    current = {d.target: d for d in domain.disks if d.device == "disk"}
    plan, notes = _plan(manifest, current)
    with check:  # the data hashed beside the copy; the block ends when both have succeeded
        by_dir: dict[Path, list] = {}
        for disk, path, _fmt in plan:
            by_dir.setdefault(Path(path).parent, []).append(disk)
        for directory, disks in by_dir.items():
            require_space(directory, needed_bytes(backup_dir, disks))
        files = _write_replacements(
            restore, backup_dir, domain, manifest, plan, notes, progress, created
        )
    require_unchanged(backup_dir, before)
    progress.step("switch", files=[path for _partial, path in files])
    _shut_off_domain(hv, uuid, vm.name)  # still: a guest started meanwhile would keep old files
    _switch(files, restore.pk, progress, created, swaps)
    progress.step("switched", kept=[kept for _path, kept in swaps if kept])
    swaps.clear()  # the point of no return: nothing after this puts the old disks back

    if manifest.memory:
        notes.append("the RAM state is not resumed: the VM boots from its restored disks")
    notes.append(
        "the replaced files are kept as <file>.before-restore-"
        f"{restore.pk}; delete them when the restored VM is good"
    )
    renew_generation_id(hv, uuid, notes)
    progress.step("genid")
    record_result(restore, hv, progress, path=str(Path(plan[0][1]).parent), uuid=uuid, notes=notes)
    return f"restored {vm.name} in place ({len(plan)} disks)"


def _write_replacements(
    restore, backup_dir: Path, domain, manifest, plan, notes, progress, created
) -> list:
    """Every replacement written, flushed, beside what it replaces: [(hidden file, path)]."""
    total = sum(disk.virtual_size for disk, _path, _fmt in plan)
    progress.bytes(0, total)
    done = 0
    files: list[tuple[str, str]] = []
    for disk, path, fmt in plan:
        partial = _new_partial(path, restore.pk, progress, created)
        flatten(backup_dir, disk, Path(partial), fmt, progress, done)
        _same_owner_and_mode(path, partial)
        done += disk.virtual_size
        files.append((partial, path))
    if manifest.nvram and domain.nvram:
        nvram = os.path.realpath(domain.nvram)
        partial = _new_partial(nvram, restore.pk, progress, created)
        with open(backup_dir / manifest.nvram, "rb") as src, open(partial, "r+b") as dst:
            shutil.copyfileobj(src, dst)  # into the 0600 file _new_partial made
        _same_owner_and_mode(nvram, partial)
        files.append((partial, nvram))
    elif domain.nvram:
        notes.append("the backup has no UEFI variable store: the VM keeps its current one")
    elif manifest.nvram:
        notes.append("the VM has no <nvram> any more: the backed-up variable store is not used")
    for partial, _path in files:
        _flush(Path(partial))
    if manifest.tpm:
        tpm = str(Path(settings.VMBACKUP_SWTPM_DIR) / str(restore.backup.vm.uuid))
        partial = partial_name(tpm, restore.pk)
        if os.path.lexists(partial):
            raise RestoreError(f"{partial} already exists; remove it and try again")
        progress.step("partial", path=partial)
        created.append(Path(partial))
        private.copy_tree(backup_dir / manifest.tpm, partial)
        if os.path.isdir(tpm):
            _same_owner_tree(Path(tpm), Path(partial))
        archive.make_durable(Path(partial))
        files.append((partial, tpm))
    return files


def _switch(files, restore_id: int, progress, created: list[Path], swaps: list) -> None:
    """One rename pair per file, each journaled before it happens (reconcile replays it)."""
    for partial, path in files:
        kept = kept_name(path, restore_id) if os.path.lexists(path) else ""
        progress.step("swap", path=path, kept=kept)
        if kept:
            os.rename(path, kept)
        swaps.append((path, kept))
        os.rename(partial, path)
        created.remove(Path(partial))
        archive.fsync_dir(Path(path).parent)


def renew_generation_id(hv, uuid: str, notes: list[str]) -> None:
    """A VM rolled back to an earlier state gets a new VM generation ID when it has one,
    which is how a guest (an Active Directory controller, say) learns it went back in time."""
    try:
        xml = hv.inactive_xml(uuid)
        fresh = domain_xml.without_genid(xml)
        if fresh != xml:
            hv.define(fresh)
            notes.append("the VM generation ID (genid) was renewed: the guest sees the rollback")
    except Exception as exc:  # past the point of no return: a note, never a rollback
        notes.append(f"the VM generation ID could not be renewed: {exc}")


def _new_partial(path: str, restore_id: int, progress, created: list[Path]) -> str:
    """The hidden file beside ``path``, journaled first and created exclusively (0600, no
    symlink followed), so nothing planted there can redirect what we write."""
    partial = partial_name(path, restore_id)
    progress.step("partial", path=partial)
    try:
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        raise RestoreError(f"{partial} already exists; remove it and try again") from None
    os.close(fd)
    created.append(Path(partial))
    return partial


def undo_switch(swaps: list[tuple[str, str]]) -> list[str]:
    """Put every switched file back (restored copy removed, kept file renamed back);
    returns what could not be undone, for the error message."""
    problems = []
    for path, kept in reversed(swaps):
        try:
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            elif os.path.lexists(path):
                os.unlink(path)
            if kept:
                os.rename(kept, path)
        except OSError as exc:
            problems.append(f"{path}: {exc}")
    swaps.clear()
    return problems


def _shut_off_domain(hv, uuid: str, name: str):
    try:
        domain = hv.domain(uuid)
    except hypervisor.HypervisorError as exc:
        raise RestoreError(f"{name} is not defined on its host any more: {exc}") from exc
    if domain.state != "shutoff":
        raise RestoreError(f"{name} is {domain.state}: shut it down before restoring in place")
    if hv.has_managed_save(uuid):
        # starting it would resume the saved RAM on top of the restored disks
        raise RestoreError(
            f"{name} has a saved state (virsh managedsave): remove it "
            "(virsh managedsave-remove) before restoring in place"
        )
    return domain


def _plan(manifest, current: dict) -> tuple[list, list[str]]:
    """(backed-up disk, real path of the VM's disk it replaces, that disk's format) for each
    disk both have, and notes on the rest. A symlinked disk path is followed: the real file
    is replaced and the link is left as it is."""
    plan, notes = [], []
    for disk in manifest.disks:
        target = current.get(disk.target)
        if target is None:
            notes.append(f"disk {disk.target} is in the backup but not in the VM: not restored")
            continue
        if target.source_type != "file" or not target.source:
            raise RestoreError(
                f"disk {disk.target} is a {target.source_type or 'sourceless'} disk: in-place "
                "restore writes file-backed disks only; restore as a new domain instead"
            )
        if target.shareable or target.readonly:
            raise RestoreError(
                f"disk {disk.target} is now {'shareable' if target.shareable else 'read-only'}"
                ": another VM may use it; restore as a new domain instead"
            )
        real = os.path.realpath(target.source)
        if os.path.lexists(real) and not stat.S_ISREG(os.stat(real).st_mode):
            raise RestoreError(f"disk {disk.target} ({real}) is not a regular file")
        if target.backing:
            # The definition names the backing chain itself; QEMU would lay that chain under
            # our standalone image, and every range the image leaves unallocated (zeros) would
            # read the base's data instead.
            raise RestoreError(
                f"disk {disk.target}'s definition names its backing chain (<backingStore>): "
                "restore as a new domain instead"
            )
        if methods.parse_overlay(target.source):
            raise RestoreError(
                f"disk {disk.target} still runs on a backup's snapshot overlay: run "
                "vmbackup_reconcile first"
            )
        plan.append((disk, real, target.format))
    backed_up = {disk.target for disk in manifest.disks}
    for target in current:
        if target not in backed_up:
            notes.append(f"disk {target} is not in the backup: left as it is")
    if not plan:
        raise RestoreError("no disk of the backup matches a disk of the VM: nothing to restore")
    return plan, notes


def _same_owner_and_mode(original: str, new: str) -> None:
    """The replacement gets the replaced file's owner, group and mode, except that others
    may never read it: a restored disk holds the backup's secrets, QEMU gets it through its
    owner or group (libvirt's DAC driver relabels it at start), never through others."""
    if os.path.exists(original):
        st = os.stat(original)
        os.chown(new, st.st_uid, st.st_gid)
        os.chmod(new, st.st_mode & 0o770)


def _same_owner_tree(original: Path, new: Path) -> None:
    st = os.stat(original)
    for path in [new, *new.rglob("*")]:
        os.chown(path, st.st_uid, st.st_gid)


def _flush(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def repair_dead(restore) -> str:
    """What reconcile does for an in-place restore whose worker died, from its journal only:
    each ``swap`` entry is written before its two renames, so before ``switched`` every
    journaled swap is put back; hidden ``partial`` files are removed. After ``switched``
    (or once the worker itself has ``undone`` the switch) the disks are left alone.
    Returns the error text."""
    entries = [entry for entry in restore.journal if isinstance(entry, dict)]
    steps = {entry.get("step") for entry in entries}
    if "switched" in steps:
        return (
            "interrupted after the disks were switched: the VM has the restored disks; the "
            f"replaced files are kept as <file>.before-restore-{restore.pk}"
        )
    swaps = []
    if "undone" not in steps:
        for entry in (e for e in entries if e.get("step") == "swap"):
            path, kept = entry.get("path", ""), entry.get("kept", "")
            partial = partial_name(path, restore.pk)
            if kept and os.path.lexists(kept):
                swaps.append((path, kept))  # the original was moved aside: it comes back
            elif not kept and not os.path.lexists(partial) and os.path.lexists(path):
                swaps.append((path, ""))  # nothing was there before: ours goes again
    problems = undo_switch(swaps)
    for entry in (e for e in entries if e.get("step") == "partial"):
        path = Path(entry.get("path", ""))
        if path.name.startswith(".") and path.name.endswith(f".restore-{restore.pk}.partial"):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            elif os.path.lexists(path):
                path.unlink()
    error = "interrupted: the worker died; the VM's disks are as they were before"
    return error + (f", except: {'; '.join(problems)}" if problems else "")
