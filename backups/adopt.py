"""Rebuild the index from disk: published backups that have no row get one.

The directory is the source of truth (backup.json); the database is an index of it. A row
can be missing after a crash between the publish rename and the insert, after restoring an
older database, or when a backup root is moved to a new host. Only backups of VMs the
inventory knows (by UUID) are adopted; they are marked unverified until a verify pass.
"""

from __future__ import annotations

import json
import os
from datetime import datetime
from pathlib import Path

from django.db import transaction

from . import archive
from .models import Backup, BackupPolicy, BackupRun, VirtualMachine


def adopt(roots: set[str]) -> list[str]:
    """Create rows for published backups under ``roots`` that have none; returns their paths."""
    known = set(Backup.objects.values_list("path", flat=True))
    vms = {str(vm.uuid): vm for vm in VirtualMachine.objects.all()}
    adopted = []
    for root in sorted(roots):
        base = Path(root)
        if not base.is_dir():
            continue
        for vm_dir in sorted(
            p for p in base.iterdir() if p.is_dir() and not p.name.startswith(".")
        ):
            for path in archive.list_backups(root, vm_dir.name):  # oldest first: parents first
                if str(path) in known:
                    continue
                if _adopt_one(path, vms, root):
                    known.add(str(path))
                    adopted.append(str(path))
    return adopted


def _adopt_one(path: Path, vms: dict, root: str) -> bool:
    try:
        manifest = archive.read_manifest(path)
    except archive.ArchiveError:
        return False  # not ours to judge here; verify reports unreadable manifests
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
            size_bytes=sum(p.stat().st_size for p in path.rglob("*") if p.is_file()),
            manifest=json.loads(manifest.to_json()),
        )
    return True
