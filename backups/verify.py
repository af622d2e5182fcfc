"""Re-read stored backups: our SHA256SUMS catch bit rot that ``qemu-img check`` cannot see."""

from pathlib import Path

from . import archive_check
from .models import Backup, VerifyStatus


def verify_backup(backup: Backup) -> str:
    """Re-hash and check one backup; record verified / corrupt / missing on its row."""
    path = Path(backup.path)
    if not path.is_dir():
        backup.verify_status = VerifyStatus.MISSING
        backup.verify_error = f"{path} does not exist"
        backup.save(update_fields=["verify_status", "verify_error"])
        return f"missing: {path}"
    result = archive_check.verify(path)
    backup.mark_verified(result.ok, "; ".join(result.errors))
    return f"{'ok' if result.ok else 'corrupt'}: {path}" + (
        "" if result.ok else " (" + "; ".join(result.errors) + ")"
    )
