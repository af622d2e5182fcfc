"""The running state: a ``memory`` backup restored as a new domain (and started) resumes
from its saved RAM (``memory.save``) instead of booting (DESIGN "Restore").

``memory.save`` is untrusted input like every file of a backup: it is copied (regular file
only) into the restore's private staging directory while the chain check hashes the
original against SHA256SUMS, and libvirt reads the copy only after that check has passed
and the chain's fingerprint is unchanged. libvirtd opens the copy as root and hands QEMU a
descriptor, so QEMU's user needs no access to the backup or the copy.

The saved definition is made the new domain's: restored disks, the allowlist, NVRAM, under
the *old* name, UUID and MAC addresses first, so that libvirt checks the saved state can run
under it (``save_image_define``: same devices, same ABI) — then ``archive.save_image``
swaps name and UUID, which libvirt never lets change. The MAC addresses stay the
original's in the running definition: the guest's network cards hold them in their saved
state and its RAM, whatever a definition says; the persistent definition gets fresh ones,
used from its next boot. Whatever does not fit (an allowlisted device removed, an unknown
save format) is a note, and the domain boots from its disks as any new domain does.
"""

from __future__ import annotations

import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

from .. import archive, domain_xml, hypervisor, private
from ..archive import save_image

MEMORY = "memory.save"


def copy_saved_state(backup_dir: Path, manifest, staging: Path) -> Path:
    """The backup's memory.save copied into ``staging``, private from its first byte."""
    out = staging / MEMORY
    private.create_file(out)
    fd = archive.open_member(backup_dir, manifest.memory)
    with open(fd, "rb") as src, open(out, "r+b") as dst:
        shutil.copyfileobj(src, dst, 8 * 1024 * 1024)
    return out


def prepare(hv, saved_state: Path, *, name: str, uuid: str, disks, nvram) -> tuple[str, list[str]]:
    """Make the copied save image the new domain's; returns the persistent definition and
    notes. Raises ``hypervisor.HypervisorError``/``archive.ArchiveError`` when it cannot be
    resumed (the caller boots the domain from its disks instead)."""
    image = save_image.read(saved_state)  # our own checks first: version, lengths
    saved = hv.save_image_xml(str(saved_state))
    live, _ = domain_xml.restored_xml(
        saved, name=image.name, uuid=image.uuid, disks=disks, nvram=nvram
    )
    hv.save_image_define(str(saved_state), _with_macs_of(live, saved))
    save_image.set_identity(saved_state, name=name, uuid=uuid)
    return domain_xml.restored_xml(saved, name=name, uuid=uuid, disks=disks, nvram=nvram)


def _with_macs_of(xml: str, saved: str) -> str:
    """``xml``'s network interfaces given the saved definition's MAC addresses, in order."""
    root, old = ET.fromstring(xml), ET.fromstring(saved)
    macs = [i.find("mac") for i in old.iterfind("./devices/interface")]
    for interface, mac in zip(root.iterfind("./devices/interface"), macs, strict=False):
        if mac is not None:
            interface.insert(0, ET.Element("mac", address=mac.get("address", "")))
    return ET.tostring(root, encoding="unicode")


def resume(hv, saved_state: Path) -> str:
    """Run the new domain from its saved state; the copy goes whatever happens (it holds
    the guest's RAM). Returns a note."""
    try:
        hv.restore_saved(str(saved_state))
    finally:
        saved_state.unlink(missing_ok=True)
    return (
        "resumed from the saved RAM state, not booted; until it is shut down its network "
        "cards keep the original's MAC addresses (the guest holds them), the definition has "
        "fresh ones"
    )


def not_resumed(exc: Exception) -> str:
    return f"the saved RAM state was not resumed ({exc}); the domain boots from its disks"


ERRORS = (hypervisor.HypervisorError, archive.ArchiveError, ET.ParseError, OSError)
