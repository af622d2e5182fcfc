"""Instant recovery (DESIGN "Restore": instantly): a new domain that runs from the backup
within seconds, its data moved in while it runs, until it no longer reads the backup.

1. The chain's structure is checked (every header against its manifest, ``qemu-img check``)
   before qemu-img opens it: stored backups are untrusted input.
2. ``<root>/<name>/`` gets one qcow2 overlay per disk whose backing file is the backup's
   image; the definition spells the backing chain out, every link ``relabel='no'`` (see
   ``domain_xml.with_backing_chain``), and QEMU's user is lent read access to the chain's
   images (and search on their directories) by a POSIX ACL — owner and mode bits are never
   changed. The domain is defined and started (paused unless asked to start).
3. One block copy per disk (``virDomainBlockCopy``) writes overlay and chain into
   ``<root>/<name>/<target>.qcow2`` while guest writes are mirrored into it; beside it every
   file of the chain is hashed against SHA256SUMS. Only when every copy is ready *and* the
   check has passed is each disk pivoted to its copy: the domain no longer reads the backup.
   A failed check (or a cancel, or any failure) before that point destroys and undefines
   the domain and removes ``<root>/<name>/``: writes the guest made so far are lost, as in
   Proxmox's live-restore; it never runs on data that failed its check past the move.
4. The overlays are removed and the ACLs taken back (unless another instant restore of the
   same chain still needs them): the backup is exactly as private as before.

While this runs (the restore is queued or running) retention leaves the VM's chains alone
(``retention.prune``), and the backup page names the domain. The block copies live in
QEMU: a worker that dies leaves them running, and reconcile hands the restore to another
worker, which finds them again (``take_over``).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import time
import uuid as uuidlib
from pathlib import Path

from django.conf import settings
from django.utils import timezone

from .. import archive, domain_xml, hypervisor, inventory, private, qemu_img
from ..interrupt import Stopped
from ..models import ACTIVE_STATUSES, Drill, Restore, RestoreMode
from .common import (
    CANCEL_CHECK_EVERY,
    fingerprint,
    needed_bytes,
    refuse_while_backing_up,
    require_space,
    require_unchanged,
    verify_chain,
)
from .new_domain import _restore_tpm, _with_reason
from .rules import RestoreError, check_request

log = logging.getLogger(__name__)
OVERLAY = "{target}.overlay.qcow2"
MOVED = "{target}.qcow2"
PIVOT_TIMEOUT = 300.0


def restore(restore, hv, progress, created: list[Path], defined: list[str]) -> str:
    """Define, start, move, pivot; ``created``/``defined`` tell the caller what to remove
    when this raises before the pivot. A stop of the worker (``Stopped``) after the start
    leaves the domain and its copies running for the next worker (see ``left_running``)."""
    try:
        if _steps(restore).get("define"):
            return take_over(restore, hv, progress, created, defined)
        return _restore(restore, hv, progress, created, defined)
    except Stopped:
        if left_running(restore):
            progress.step("left", reason="the worker stopped; the next one takes the move over")
            created.clear()
            defined.clear()
            raise
        give_back(restore)
        raise
    except BaseException:
        give_back(restore)
        raise


def left_running(restore) -> bool:
    """Started and not yet independent: the domain runs on, the restore stays running."""
    steps = _steps(restore)
    return "start" in steps and "independent" not in steps


def _restore(restore, hv, progress, created: list[Path], defined: list[str]) -> str:
    check_request(restore.name, restore.root)
    root = Path(os.path.abspath(restore.root))
    if not root.is_dir():
        raise RestoreError(f"restore root {root} does not exist")
    final = root / restore.name
    refuse_while_backing_up(restore.backup.vm)
    if hv.uuid_by_name(restore.name):
        raise RestoreError(f"a domain named {restore.name} already exists")
    if os.path.lexists(final):
        raise RestoreError(f"{final} already exists; nothing is overwritten")
    backup_dir = Path(restore.backup.path)
    before = fingerprint(backup_dir)
    manifest, check = verify_chain(backup_dir, progress)  # headers first: untrusted input
    require_space(root, needed_bytes(backup_dir, manifest.disks))
    chains = {disk.target: image_chain(backup_dir, disk) for disk in manifest.disks}

    progress.step("staging", path=str(final))
    private.mkdir(final, private.TRAVERSE)  # QEMU passes through; lists nothing
    created.append(final)
    disks, nvram = overlays(manifest, chains, backup_dir, final, OVERLAY)
    new_uuid = str(uuidlib.uuid4())
    xml, notes = domain_xml.restored_xml(
        (backup_dir / "domain.xml").read_text(), name=restore.name, uuid=new_uuid,
        disks=disks, nvram=nvram,
    )  # fmt: skip
    for target, chain in chains.items():
        xml = domain_xml.with_backing_chain(xml, target, chain)
    notes = [_with_reason(note, manifest.skipped) for note in notes]
    notes.append("every disk is restored as qcow2 (<root>/<name>/<target>.qcow2)")
    if manifest.memory:
        notes.append("the RAM state is not resumed: the new domain boots from its disks")
    if manifest.tpm:
        tpm = Path(settings.VMBACKUP_SWTPM_DIR) / new_uuid
        progress.step("tpm", path=str(tpm))
        created.append(tpm)
        _restore_tpm(backup_dir / manifest.tpm, tpm)
    lend(restore, progress, chains)

    progress.step("define", uuid=new_uuid, path=str(final))
    hv.define(xml)
    defined.append(new_uuid)
    restore.path, restore.domain_uuid, restore.notes = str(final), new_uuid, notes
    restore.save(update_fields=["path", "domain_uuid", "notes"])
    _start(restore, hv, progress, new_uuid)
    return _move(restore, hv, progress, (manifest, check, before), created, defined)


def _start(restore, hv, progress, uuid: str) -> None:
    progress.step("start", paused=not restore.start)
    hv.start(uuid, paused=not restore.start)
    progress.step("running", seconds=round(_since_claim(restore), 2))
    with contextlib.suppress(Exception):  # listed at once; the sync would find it later
        inventory.sync_domain(restore.vm.host, uuid, hv)


def _since_claim(restore) -> float:
    started = restore.started_at
    return (timezone.now() - started).total_seconds() if started else 0.0


def take_over(restore, hv, progress, created: list[Path], defined: list[str]) -> str:
    """A worker died after defining the domain (reconcile queued the restore again): carry
    on from what the domain and its block jobs say. The chain is checked again (headers,
    then every file hashed beside the copies); copies QEMU kept running are waited for, a
    lost one is started again; a domain that stopped meanwhile is started again."""
    uuid = restore.domain_uuid or _steps(restore)["define"].get("uuid", "")
    final = Path(restore.path or _steps(restore)["define"].get("path", ""))
    progress.step("resume", uuid=uuid)
    if not uuid or not hv.exists(uuid):
        if _ours(restore, final):
            created.append(final)
        raise RestoreError(f"the domain {restore.name} is gone; its files are removed")
    created.append(final)
    defined.append(uuid)
    backup_dir = Path(restore.backup.path)
    if "pivot" in _steps(restore):
        created.clear()  # past the point of no return: the domain is kept whatever happens
        defined.clear()
        return _finish_move(restore, hv, progress, uuid, final)
    before = fingerprint(backup_dir)
    manifest, check = verify_chain(backup_dir, progress)
    if hv.domain(uuid).state == "shutoff":
        lend(restore, progress, {d.target: image_chain(backup_dir, d) for d in manifest.disks})
        _start(restore, hv, progress, uuid)
    return _move(restore, hv, progress, (manifest, check, before), created, defined)


def _move(restore, hv, progress, checked, created: list, defined: list) -> str:
    """Every disk copied while the chain is hashed beside; pivot only when both are done."""
    manifest, check, before = checked
    uuid, final = restore.domain_uuid, Path(restore.path)
    sizes = {disk.target: disk.virtual_size for disk in manifest.disks}
    progress.bytes(0, sum(sizes.values()))
    with check:
        for target, size in sizes.items():
            job = hv.block_job(uuid, target)
            if job is None or job.kind != "copy":
                _start_copy(hv, progress, uuid, target, size, final)
        _wait_ready(hv, progress, uuid, sizes)
    require_unchanged(Path(restore.backup.path), before)
    deadline = time.monotonic() + PIVOT_TIMEOUT
    for target in sizes:
        progress.step("pivot", disk=target)
        created.clear()  # the point of no return: the domain is kept whatever happens now
        defined.clear()
        hv.pivot(uuid, target, deadline)
    return _finish_move(restore, hv, progress, uuid, final)


def _start_copy(hv, progress, uuid: str, target: str, size: int, final: Path) -> None:
    dest = final / MOVED.format(target=target)
    progress.step("copy", disk=target, dest=str(dest))
    if os.path.lexists(dest):  # a copy a stopped domain lost: ours, started again
        dest.unlink()
    private.create_file(dest)
    qemu_img.create(str(dest), "qcow2", size)
    bandwidth = settings.VMBACKUP_INSTANT_MOVE_MIB_S << 20
    hv.block_copy(uuid, target, str(dest), "qcow2", bandwidth=bandwidth)


def _wait_ready(hv, progress, uuid: str, sizes: dict[str, int]) -> None:
    """Until every copy is ready (copied once, now mirroring), reporting progress and
    honouring cancel and the chain check's failure every ``CANCEL_CHECK_EVERY`` s."""
    while True:
        done, ready = 0, True
        for target, size in sizes.items():
            job = hv.block_job(uuid, target)
            if job is None or job.kind != "copy":
                raise RestoreError(
                    f"the copy of disk {target} ended before it was done (was the domain "
                    f"{uuid} shut down?); the data did not move"
                )
            done += int(size * job.cur / job.end) if job.end else 0
            ready = ready and job.ready
        progress.bytes(done)
        progress.check_cancel(every=CANCEL_CHECK_EVERY)
        if ready:
            return
        time.sleep(0.5)


def _finish_move(restore, hv, progress, uuid: str, final: Path) -> str:
    """After the pivots: the definitions no longer name the backup, the overlays go, the
    backup is private again."""
    info = hv.domain(uuid)
    for disk in info.disks:
        moved = final / MOVED.format(target=disk.target)
        if disk.source == str(moved) and not disk.backing:
            continue
        raise RestoreError(f"disk {disk.target} still reads {disk.source} after the pivot")
    for target in {d.target for d in info.disks}:
        inactive = hv.disk_source(uuid, target, inactive=True)
        moved = str(final / MOVED.format(target=target))
        if inactive is not None and inactive != moved:  # libvirt normally does this itself
            hv.set_disk_source(uuid, target, moved, "qcow2")
    progress.step("independent")
    for overlay in final.glob(OVERLAY.format(target="*")):
        overlay.unlink()
    archive.fsync_dir(final)
    progress.step("given-back", paths=give_back(restore))
    progress.bytes(restore.bytes_total)
    return f"restored {restore.name} instantly in {final}; it no longer reads the backup"


# -- the chain, and QEMU's read access to it ---------------------------------------------------


def image_chain(backup_dir: Path, disk) -> list[tuple[str, str]]:
    """(path, format) of ``disk``'s images, the backup's own first, down to the full's, by
    the manifests' ``backing`` names (the headers were checked to say the same)."""
    chain = [(str(backup_dir / disk.file), disk.image_format)]
    directory, entry = backup_dir, disk
    while entry.backing:
        path = Path(os.path.normpath(directory / entry.backing))
        directory = path.parent
        manifest = archive.read_manifest(directory)
        entry = next((d for d in manifest.disks if d.file == path.name), None)
        if entry is None or len(chain) > 1000:
            raise RestoreError(f"disk {disk.target}: {path} is not in its backup's manifest")
        chain.append((str(path), entry.image_format))
    return chain


def _grants(chains: dict[str, list[tuple[str, str]]]) -> dict[str, int]:
    """What QEMU's user needs: read on each image, search on its backup's directory and on
    the VM's directory above (the root and its parents are search-only already, 0711)."""
    grants: dict[str, int] = {}
    for chain in chains.values():
        for path, _fmt in chain:
            image = Path(path)
            grants[str(image)] = 4
            grants[str(image.parent)] = 1
            grants[str(image.parent.parent)] = 1
    return grants


def lend(restore, progress, chains) -> None:
    """Journaled first (so whoever ends last knows to take it back), then granted, under
    the VM directory's lock (two instant restores of one chain never undo each other)."""
    grants = _grants(chains)
    progress.step("lend", user=settings.VMBACKUP_QEMU_USER, paths=sorted(grants))
    owner = private.owner_of(settings.VMBACKUP_QEMU_USER)
    if owner is None:
        return  # QEMU runs as root: nothing to lend
    with _locked(restore):
        for path, perm in sorted(grants.items(), key=lambda item: len(item[0])):
            private.grant_acl(path, owner[0], perm)


def give_back(restore) -> list[str]:
    """Take back what this restore (or drill) lent and no other active instant restore or
    drill still needs: the ACL removed, the private mode (0600 files, 0700 directories)
    exact again."""
    mine = _lent(restore)
    if not mine:
        return []
    with _locked(restore):
        others = Restore.objects.filter(mode=RestoreMode.INSTANT, status__in=ACTIVE_STATUSES)
        drills = Drill.objects.filter(status__in=ACTIVE_STATUSES)
        if isinstance(restore, Drill):
            drills = drills.exclude(pk=restore.pk)
        else:
            others = others.exclude(pk=restore.pk)
        still = {p for other in [*others, *drills] for p in _lent(other)}
        returned = sorted(mine - still, key=len, reverse=True)
        for path in returned:
            if os.path.isdir(path) and not os.path.islink(path):
                private.revoke_acl(path, private.DIR)
            else:
                private.revoke_acl(path, private.FILE)
    return returned


def _lent(restore) -> set[str]:
    entries = [e for e in restore.journal if isinstance(e, dict) and e.get("step") == "lend"]
    return {p for entry in entries for p in entry.get("paths", []) if isinstance(p, str)}


@contextlib.contextmanager
def _locked(restore):
    """flock on the VM's backup directory, where every image of the chain lies."""
    vm_dir = Path(restore.backup.path).parent
    try:
        fd = os.open(vm_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


# -- reconcile -----------------------------------------------------------------------------------


def _steps(restore) -> dict[str, dict]:
    return {e.get("step"): e for e in restore.journal if isinstance(e, dict)}


def _ours(restore, final: Path) -> bool:
    """``final`` is the directory this restore's journal says it made, in an allowed root."""
    staged = _steps(restore).get("staging", {}).get("path")
    return bool(staged) and str(final) == staged and final.is_dir() and not final.is_symlink()


def needs_worker(restore, hv) -> bool:
    """Reconcile's question for a dead instant restore: does a domain run (or wait) on the
    backup that a worker should finish moving?"""
    steps = _steps(restore)
    uuid = restore.domain_uuid or steps.get("define", {}).get("uuid", "")
    return bool(uuid) and not restore.cancel_requested and hv.exists(uuid)


def discard(restore, hv) -> str:
    """What reconcile does for a dead instant restore no worker should take over: its
    domain destroyed and undefined, its directory and TPM state removed, the backup
    private again. Returns the error text."""
    steps = _steps(restore)
    uuid = restore.domain_uuid or steps.get("define", {}).get("uuid", "")
    if uuid and hv.exists(uuid) and "pivot" not in steps:
        with contextlib.suppress(hypervisor.HypervisorError):
            hv.destroy(uuid)
        hv.undefine(uuid)
    final = Path(steps.get("staging", {}).get("path", ""))
    if "pivot" not in steps and _ours(restore, final):
        private_rmtree(final)
    tpm = Path(steps.get("tpm", {}).get("path", ""))
    if "pivot" not in steps and tpm.parent == Path(settings.VMBACKUP_SWTPM_DIR) and tpm.is_dir():
        private_rmtree(tpm)
    give_back(restore)
    if "pivot" in steps:
        return "interrupted after the pivot: the domain no longer reads the backup"
    return "interrupted: the worker died; the instantly restored domain and its files are removed"


def private_rmtree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def overlays(manifest, chains: dict, backup_dir: Path, directory: Path, name: str):
    """One new private qcow2 per disk in ``directory`` over the top of its (checked) chain,
    and a private copy of the NVRAM: what a domain running from a backup writes to, the
    backup itself read only. Returns ({target: (path, "qcow2")}, nvram path or None)."""
    disks = {}
    for disk in manifest.disks:
        overlay = directory / name.format(target=disk.target)
        private.create_file(overlay)
        top, top_format = chains[disk.target][0]
        qemu_img.create(
            str(overlay), "qcow2", disk.virtual_size, backing=top, backing_fmt=top_format
        )
        disks[disk.target] = (str(overlay), "qcow2")
    nvram = None
    if manifest.nvram:
        private.copy_file(backup_dir / manifest.nvram, directory / "nvram.fd")
        nvram = str(directory / "nvram.fd")
    return disks, nvram
