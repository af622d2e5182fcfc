"""Restore a backup as a new domain (DESIGN "Restore").

The same steps an operator follows in RESTORE.md, done so that nothing half-made is ever
visible: check the whole chain's structure (headers, manifests, ``qemu-img check``) before
qemu-img opens it, refuse early (name taken, root not allowed, not enough space), flatten
every disk into a hidden ``<root>/.<name>.restore-<site>-<id>.partial`` directory while
every file of the chain is hashed beside it, and only when both have succeeded fsync,
rename it to ``<root>/<name>`` and define the domain. Whatever fails, what this restore
created is removed again (by the caller, from ``created``) and the original VM is never
touched.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import uuid as uuidlib
from pathlib import Path

from django.conf import settings

from .. import archive, domain_xml, hypervisor, private, site
from ..models import Restore
from . import resume as running_state
from .common import (
    Progress,
    fingerprint,
    flatten,
    needed_bytes,
    record_result,
    refuse_while_backing_up,
    require_space,
    require_unchanged,
    verify_chain,
)
from .rules import RestoreError, check_request


def refusals(restore, hv) -> Path:
    """What is refused before anything is read or fetched; returns the final directory."""
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
    return final


def restore(
    restore,
    hv,
    progress: Progress,
    created: list[Path],
    defined: list[str],
    backup_dir: Path | None = None,
) -> str:
    """``backup_dir``: where the backup is read (its chain beside it) when not in its own
    directory — fetched from offsite."""
    final = refusals(restore, hv)
    root = final.parent
    staging = staging_paths(restore)[0]
    backup_dir = backup_dir or Path(restore.backup.path)
    before = fingerprint(backup_dir)
    manifest, check = verify_chain(backup_dir, progress)
    resume = bool(manifest.memory) and restore.start  # started: from its saved RAM state
    with check:  # the data hashed beside the copy; the block ends when both have succeeded
        ram = (backup_dir / manifest.memory).stat().st_size if resume else 0
        require_space(root, needed_bytes(backup_dir, manifest.disks) + ram)

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
        if resume:
            progress.step("saved-state", path=str(staging / running_state.MEMORY))
            saved_state = running_state.copy_saved_state(backup_dir, manifest, staging)

    require_unchanged(backup_dir, before)  # the check covered memory.save too
    new_uuid = str(uuidlib.uuid4())
    xml, notes = domain_xml.restored_xml(
        (backup_dir / "domain.xml").read_text(),
        name=restore.name,
        uuid=new_uuid,
        disks=disks,
        nvram=nvram,
    )
    if resume:
        try:
            xml, notes = running_state.prepare(
                hv, saved_state, name=restore.name, uuid=new_uuid, disks=disks, nvram=nvram
            )
        except running_state.ERRORS as exc:
            resume = False
            saved_state.unlink()
            notes.append(running_state.not_resumed(exc))
    notes = [_with_reason(note, manifest.skipped) for note in notes]
    if manifest.nvram and "<nvram" not in xml:
        notes.append("the definition has no <nvram>: the backed-up variable store is not used")
    if manifest.tpm:
        tpm = Path(settings.VMBACKUP_SWTPM_DIR) / new_uuid
        progress.step("tpm", path=str(tpm))
        created.append(tpm)
        _restore_tpm(backup_dir / manifest.tpm, tpm)
    if manifest.memory and not restore.start:
        notes.append("the RAM state is resumed only when the restore starts the domain")

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
    if resume:
        progress.step("resume")
        try:
            notes.append(running_state.resume(hv, final / running_state.MEMORY))
        except hypervisor.HypervisorError as exc:
            resume = False
            notes.append(running_state.not_resumed(exc))
    record_result(
        restore, hv, progress, path=str(final), uuid=new_uuid, notes=notes, started=resume
    )
    return f"restored as {restore.name} in {final}"


def _with_reason(note: str, skipped: tuple[dict, ...]) -> str:
    """'disk vdc was not in the backup ...' with the reason the backup recorded, if any."""
    for skip in skipped:
        if note.startswith(f"disk {skip['target']} was not in the backup"):
            return f"disk {skip['target']} was not backed up ({skip['reason']}) and is left out"
    return note


def _restore_tpm(source: Path, target: Path) -> None:
    """The TPM state goes where libvirt's swtpm looks for the new UUID, owned by the user
    swtpm runs as (``tss`` on Debian) when there is one; private (0700/0600) throughout."""
    private.copy_tree(source, target)
    with contextlib.suppress(KeyError):
        user = pwd.getpwnam("tss")
        for path in [target, *target.rglob("*")]:
            os.chown(path, user.pw_uid, user.pw_gid)


def staging_paths(restore: Restore) -> list[Path]:
    """Where a dead restore may have left files (for reconcile)."""
    root = Path(os.path.abspath(restore.root))
    # named with the installation, as every directory a job leaves while it runs
    return [root / f".{restore.name}.restore-{site.site_id()}-{restore.pk}.partial"]
