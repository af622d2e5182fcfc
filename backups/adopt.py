"""Rebuild the index from disk: published backups that have no row get one.

The directory is the source of truth (backup.json); the database is an index of it. A row
can be missing after a crash between the publish rename and the insert, after restoring an
older database, or when a backup root is moved to a new host. Only backups of VMs the
inventory knows (by UUID) are adopted; they are marked unverified until a verify pass.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from django.db import transaction

from . import archive
from .models import Backup, BackupPolicy, BackupRun, VirtualMachine


@dataclass
class Adopted:
    paths: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # what could not be trusted, and why


def adopt(roots: set[str]) -> Adopted:
    """Create rows for published backups under ``roots`` that have none.

    A root is untrusted input: a VM directory that is a symlink, or a backup whose
    manifest cannot be read, is skipped and reported — it never stops the rest (reconcile
    runs this every ten minutes, and one bad entry must not disable it)."""
    known = set(Backup.objects.values_list("path", flat=True))
    vms = {str(vm.uuid): vm for vm in VirtualMachine.objects.all()}
    result = Adopted()
    for root in sorted(roots):
        base = Path(root)
        if not base.is_dir():
            continue
        for vm_dir in sorted(p for p in base.iterdir() if not p.name.startswith(".")):
            if vm_dir.is_symlink() or not vm_dir.is_dir():
                if vm_dir.is_symlink():
                    result.skipped.append(f"{vm_dir}: a symlink in a backup root; not read")
                continue
            try:
                paths = archive.list_backups(root, vm_dir.name)  # oldest first: parents first
            except (archive.ArchiveError, OSError) as exc:
                result.skipped.append(f"{vm_dir}: {exc}")
                continue
            for path in paths:
                if str(path) in known:
                    continue
                try:
                    adopted = _adopt_one(path, vms, root)
                except (archive.ArchiveError, OSError) as exc:
                    result.skipped.append(f"{path}: not adopted: {exc}")
                    continue
                if adopted:
                    known.add(str(path))
                    result.paths.append(str(path))
    return result


def _adopt_one(path: Path, vms: dict, root: str) -> bool:
    manifest = archive.read_manifest(path)  # an unreadable one is reported by the caller
    vm = vms.get(manifest.vm_uuid)
    if vm is None:
        return False
    parent = None
    if manifest.parent:
        parent = Backup.objects.filter(path=str(path.parent / manifest.parent)).first()
    run = BackupRun.objects.filter(pk=manifest.run_id, vm=vm).select_related("policy").first()
    if run is not None:
        policy = run.policy
        run = None if Backup.objects.filter(run=run).exists() else run
    else:  # another database: the root tells which policy wrote there, if only one did
        writers = BackupPolicy.objects.filter(destination__in=[root, root.rstrip(os.sep)])
        policy = writers.first() if writers.count() == 1 else None
    with transaction.atomic():
        Backup.objects.create(
            vm=vm,
            run=run,
            policy=policy,
            path=str(path),
            created_at=datetime.fromisoformat(manifest.started),
            kind=manifest.kind,
            parent=parent,
            method=manifest.method,
            consistency=manifest.consistency,
            checkpoint=manifest.checkpoint or "",
            size_bytes=sum(p.lstat().st_size for p in path.rglob("*") if archive.is_regular(p)),
            manifest=manifest.to_dict(),
        )
    return True
