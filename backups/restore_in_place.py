"""Restore a backup over its own VM's disks (DESIGN "Restore": in place, domain shut off).

The VM must be shut off and stay so. Every disk is first flattened into a hidden file beside
the disk it replaces (same file system, so the switch is a rename); only when all of them
are written and flushed are the disks switched, one rename pair each, and the replaced
files are kept as ``<disk>.before-restore-<id>`` — nothing the user had is deleted. A
failure before the switch removes the hidden files; a failure during it renames every
disk already switched back. The domain definition is kept as it is (the backup's
``domain.xml`` stays in the backup for whoever wants the old one).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from django.conf import settings

from . import archive, hypervisor
from .restoring import (
    RestoreError,
    flatten,
    needed_bytes,
    refuse_while_backing_up,
    require_space,
    verify_chain,
)

KEPT = "{path}.before-restore-{id}"


def kept_name(path: str, restore_id: int) -> str:
    return KEPT.format(path=path, id=restore_id)


def partial_name(path: str, restore_id: int) -> str:
    p = Path(path)
    return str(p.with_name(f".{p.name}.restore-{restore_id}.partial"))


def restore(restore, hv, progress, created: list[Path], swaps: list[tuple[str, str]]) -> str:
    vm = restore.backup.vm
    uuid = str(vm.uuid)
    refuse_while_backing_up(vm)
    domain = _shut_off_domain(hv, uuid, vm.name)
    backup_dir = Path(restore.backup.path)
    manifest = verify_chain(backup_dir, progress)
    current = {d.target: d for d in domain.disks if d.device == "disk"}
    plan, notes = _plan(manifest, current)

    by_dir: dict[Path, list] = {}
    for disk, target in plan:
        by_dir.setdefault(Path(target.source).parent, []).append(disk)
    for directory, disks in by_dir.items():
        require_space(directory, needed_bytes(backup_dir, disks))

    total = sum(disk.virtual_size for disk, _target in plan)
    progress.bytes(0, total)
    done = 0
    files: list[tuple[str, str]] = []  # (partial, disk path)
    for disk, target in plan:
        partial = partial_name(target.source, restore.pk)
        created.append(Path(partial))
        flatten(backup_dir, disk, Path(partial), target.format, progress, done)
        _same_owner_and_mode(target.source, partial)
        done += disk.virtual_size
        files.append((partial, target.source))
    if manifest.nvram and domain.nvram:
        partial = partial_name(domain.nvram, restore.pk)
        created.append(Path(partial))
        shutil.copyfile(backup_dir / manifest.nvram, partial)
        _same_owner_and_mode(domain.nvram, partial)
        files.append((partial, domain.nvram))
    elif domain.nvram:
        notes.append("the backup has no UEFI variable store: the VM keeps its current one")
    for partial, _path in files:
        _flush(Path(partial))

    if manifest.tpm:
        tpm = Path(settings.VMBACKUP_SWTPM_DIR) / uuid
        partial_tpm = Path(partial_name(str(tpm), restore.pk))
        created.append(partial_tpm)
        shutil.copytree(backup_dir / manifest.tpm, partial_tpm)
        if tpm.is_dir():
            _same_owner_tree(tpm, partial_tpm)
        archive.make_durable(partial_tpm)
        files.append((str(partial_tpm), str(tpm)))

    progress.step("switch", files=[path for _partial, path in files])
    _shut_off_domain(hv, uuid, vm.name)  # still: a guest started meanwhile would keep old files
    for partial, path in files:
        kept = kept_name(path, restore.pk)
        if os.path.lexists(path):
            os.rename(path, kept)
            swaps.append((path, kept))
        else:
            swaps.append((path, ""))
        os.rename(partial, path)
        created.remove(Path(partial))
        archive.fsync_dir(Path(path).parent)
    progress.step("switched", kept=[kept for _path, kept in swaps if kept])
    if manifest.memory:
        notes.append("the RAM state is not resumed: the VM boots from its restored disks")
    notes.append(
        "the replaced files are kept as <file>.before-restore-"
        f"{restore.pk}; delete them when the restored VM is good"
    )
    restore.path = str(Path(plan[0][1].source).parent) if plan else ""
    restore.domain_uuid, restore.notes = uuid, notes
    restore.save(update_fields=["path", "domain_uuid", "notes"])
    if restore.start:
        progress.step("start")
        hv.start(uuid)
    progress.bytes(total)
    return f"restored {vm.name} in place ({len(plan)} disks)"


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
    return domain


def _plan(manifest, current: dict) -> tuple[list, list[str]]:
    """Pairs (backed-up disk, the VM's disk it replaces) and notes on the rest."""
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
        if target.backing:
            # The definition names the backing chain itself; QEMU would lay that chain under
            # our standalone image, and every range the image leaves unallocated (zeros) would
            # read the base's data instead.
            raise RestoreError(
                f"disk {disk.target}'s definition names its backing chain (<backingStore>): "
                "restore as a new domain instead"
            )
        plan.append((disk, target))
    backed_up = {disk.target for disk in manifest.disks}
    for target in current:
        if target not in backed_up:
            notes.append(f"disk {target} is not in the backup: left as it is")
    if not plan:
        raise RestoreError("no disk of the backup matches a disk of the VM: nothing to restore")
    return plan, notes


def _same_owner_and_mode(original: str, new: str) -> None:
    """The replacement gets the replaced file's owner and mode (libvirt may relabel)."""
    if os.path.exists(original):
        st = os.stat(original)
        os.chown(new, st.st_uid, st.st_gid)
        os.chmod(new, st.st_mode & 0o7777)


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
    """What reconcile does for an in-place restore whose worker died, from its journal:
    before the switch finished, every disk already switched is put back and the hidden
    files are removed; after it, the VM keeps its restored disks. Returns the error text."""
    steps = {entry.get("step"): entry for entry in restore.journal if isinstance(entry, dict)}
    outs = [
        entry["out"]
        for entry in restore.journal
        if isinstance(entry, dict) and entry.get("step") == "convert" and entry.get("out")
    ]
    if "switched" in steps:
        return (
            "interrupted after the disks were switched: the VM has the restored disks; the "
            f"replaced files are kept as <file>.before-restore-{restore.pk}"
        )
    swaps = []
    for path in steps.get("switch", {}).get("files", []):
        partial, kept = partial_name(path, restore.pk), kept_name(path, restore.pk)
        if os.path.lexists(kept):
            swaps.append((path, kept))  # switched (or half): the original comes back
        elif not os.path.lexists(partial) and os.path.lexists(path):
            swaps.append((path, ""))  # switched, nothing was there before
        outs.append(partial)
    problems = undo_switch(swaps)
    for leftover in outs:
        path = Path(leftover)
        if path.name.startswith(".") and path.name.endswith(f".restore-{restore.pk}.partial"):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            elif os.path.lexists(path):
                path.unlink()
    error = "interrupted: the worker died; the VM's disks are as they were before"
    return error + (f", except: {'; '.join(problems)}" if problems else "")
