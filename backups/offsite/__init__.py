"""Offsite copies: each published backup sent as one restic snapshot (``copy``), and the
repository's own jobs — init, probe, check (``repository``).

This module is the snapshot layout, the contract that import and restore from offsite
rely on: a backup can be rebuilt from its snapshot alone, with no database.

One snapshot per backup, taken from inside the VM's directory so its paths do not depend on
the root it came from::

    /<backup dir name>/            e.g. /20261130T020000Z-42/
        backup.json  domain.xml  SHA256SUMS  RESTORE.md  restore.sh
        <target>.qcow2 …           the manifest's images
        nvram.fd  memory.save  checkpoint.xml  tpm/…   when the backup has them

exactly the files the backup's SHA256SUMS lists, plus SHA256SUMS itself — nothing the
manifest does not account for (see ``files_to_send``). Restoring the snapshots of a chain
into one directory gives ``<dir>/<backup>/…`` for each of them, so an incremental's backing
file (``../<parent>/<file>``) resolves, and ``sha256sum -c SHA256SUMS`` in each directory
checks it. The snapshot's time is the backup's to the second (restic's ``--time``: two
backups in one second share it, so order a chain by its ``parent`` tags, or by ``run``),
its host name the hypervisor host's (``Host.name``).
Tags (``key=value``; restic separates tags by ',', so a value's ',' and '%' are escaped as
%2C and %25)::

    vmbackup  site=<installation id>  uuid=<vm uuid>  vm=<vm name>  backup=<dir name>
    kind=full|incremental  parent=<parent dir name> (incrementals only)  run=<run id>
"""

from __future__ import annotations

from django.conf import settings

from .. import restic
from ..archive.format import GENERATED, SUMS, Manifest

TAG = "vmbackup"
CHECKPOINT_XML = "checkpoint.xml"  # a push backup's checkpoint, listed in SHA256SUMS


class OffsiteError(Exception):
    """A copy, init or check that cannot go on, with the reason in words."""


def restic_repository(model) -> restic.Repository:
    """The restic door's view of an ``OffsiteRepository`` row on this worker."""
    return restic.Repository(
        model.url,
        model.password_file,
        settings.VMBACKUP_RESTIC_CACHE_DIR,
        settings.VMBACKUP_SSH_CONFIG or None,
    )


def encode(value: str) -> str:
    return value.replace("%", "%25").replace(",", "%2C")


def decode(value: str) -> str:
    return value.replace("%2C", ",").replace("%25", "%")


def tags(manifest: Manifest, name: str, site: str) -> list[str]:
    """The snapshot's tags: enough to list and filter backups without reading them."""
    found = [TAG, f"site={site}", f"uuid={manifest.vm_uuid}", f"vm={encode(manifest.vm_name)}"]
    found += [f"backup={name}", f"kind={manifest.kind}", f"run={manifest.run_id}"]
    return found + ([f"parent={manifest.parent}"] if manifest.parent else [])


def files_to_send(manifest: Manifest, sums: dict[str, str]) -> list[str]:
    """What a copy sends of a verified backup: SHA256SUMS and what it lists, provided each
    is a file the format accounts for (the metadata, the manifest's images, NVRAM, memory,
    TPM state, the checkpoint). A name SHA256SUMS lists but the manifest does not explain
    is refused rather than sent: it would land offsite unexplained."""
    allowed = set(GENERATED) | {d.file for d in manifest.disks} | {CHECKPOINT_XML}
    allowed |= {name for name in (manifest.nvram, manifest.memory) if name}
    tpm = f"{manifest.tpm}/" if manifest.tpm else None
    unexplained = [n for n in sums if n not in allowed and not (tpm and n.startswith(tpm))]
    if unexplained:
        raise OffsiteError(
            "not sent: SHA256SUMS lists files the manifest does not account for: "
            + ", ".join(sorted(unexplained))
        )
    return sorted({*sums, SUMS})


def listing_problems(
    nodes: list[restic.Node], name: str, sizes: dict[str, int], manifest: Manifest
) -> list[str]:
    """The snapshot (``restic ls``) against what was sent: the same files, each a regular
    file of the size it had (the images' the manifest's), nothing else."""
    expected = {f"/{name}/{rel}": size for rel, size in sizes.items()}
    for disk in manifest.disks:
        if sizes.get(disk.file) != disk.bytes:
            return [f"{disk.file}: {sizes.get(disk.file)} bytes sent, manifest says {disk.bytes}"]
    dirs = {path.rsplit("/", n)[0] for path in expected for n in range(1, path.count("/"))}
    problems = []
    seen = {}
    for node in nodes:
        if node.type == "dir" and node.path in dirs:
            continue
        if node.type != "file" or node.path not in expected:
            problems.append(f"{node.path}: {node.type} in the snapshot, not sent")
            continue
        seen[node.path] = node.size
    for path, size in sorted(expected.items()):
        if path not in seen:
            problems.append(f"{path}: missing from the snapshot")
        elif seen[path] != size:
            problems.append(f"{path}: {seen[path]} bytes in the snapshot, {size} sent")
    return problems
