"""Re-read stored backups: our SHA256SUMS catch bit rot that ``qemu-img check`` cannot see.

An incremental is only as good as the chain under it: its result also says when a backup
it builds on is corrupt or missing (from that backup's own check — re-read here too when
``chain`` is asked for, as ``vmbackup_verify BACKUP`` does)."""

import os
import stat
from pathlib import Path

from . import alerts, archive
from .archive import check as archive_check
from .models import Backup, VerifyStatus

BROKEN = (VerifyStatus.CORRUPT, VerifyStatus.MISSING)


def verify_backup(backup: Backup, *, chain: bool = False) -> str:
    """Re-hash and check one backup; record verified / corrupt / missing on its row."""
    path = Path(backup.path)
    if not _plain_dir(path):
        backup.verify_status = VerifyStatus.MISSING
        backup.verify_error = f"{path} does not exist (or is not a plain directory)"
        backup.save(update_fields=["verify_status", "verify_error"])
        alerts.backup_checked(backup)
        return f"missing: {path}"
    before = _fingerprint(path)
    result = archive_check.verify(path)
    errors = list(result.errors) + _ancestor_problems(backup, chain)
    read = before if before and _fingerprint(path) == before else None
    backup.mark_verified(not errors, "; ".join(errors), files=read)
    alerts.backup_checked(backup)
    return f"{'ok' if not errors else 'corrupt'}: {path}" + (
        "" if not errors else " (" + "; ".join(errors) + ")"
    )


def _ancestor_problems(backup: Backup, chain: bool) -> list[str]:
    problems, seen = [], {backup.pk}
    node = backup.parent
    while node is not None and node.pk not in seen:
        seen.add(node.pk)
        if node.pruned_at is not None:
            problems.append(f"builds on backup {node.pk}, which was pruned")
            break
        if chain:
            verify_backup(node)
            node.refresh_from_db(fields=["verify_status"])
        if node.verify_status in BROKEN:
            problems.append(f"builds on backup {node.pk}, which is {node.verify_status}")
        node = node.parent
    return problems


def _fingerprint(path: Path) -> dict:
    try:
        return archive.fingerprint(path)
    except OSError:
        return {}


def _plain_dir(path: Path) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False
