"""The dashboard's own database, copied into the backup root every day.

The backups themselves never depend on it (``vmbackup_reconcile`` rebuilds the index of
published backups from their directories), but policies, schedules, users, the run history
and verify results live only here. The copy goes to ``<VMBACKUP_ROOT>/.vmbackup-db/`` —
beside the backups, so whatever protects the backup root (a second disk, an off-site sync)
protects it too; the leading dot keeps it out of the backup listing. It is private (0700
directory, 0600 files: it holds password hashes and session keys) and the newest
``VMBACKUP_DUMP_KEEP`` are kept.

SQLite (the embedded default): SQLite's online backup API, a consistent copy taken under a
read lock while the web and workers go on, checked with ``PRAGMA integrity_check``; restore
by copying it back. PostgreSQL: Django's ``dumpdata`` of users and the backups app (natural
keys, so it loads into a freshly migrated database); ``pg_dump`` stays the DBA's tool.

Its task is ``backups.jobs.dump_database`` (jobs owns the entry points).
"""

from __future__ import annotations

import logging
import os
import sqlite3
from datetime import UTC, datetime
from pathlib import Path

from django.conf import settings
from django.core.management import call_command
from django.db import connection

from . import private

log = logging.getLogger(__name__)

DIR_NAME = ".vmbackup-db"
PREFIX = "vmbackup-db-"


class DumpError(Exception):
    pass


def target_dir() -> Path:
    return Path(settings.VMBACKUP_ROOT) / DIR_NAME


def dumps(directory: Path | None = None) -> list[Path]:
    """The dumps in ``directory``, oldest first (the names sort by time)."""
    directory = directory or target_dir()
    if not directory.is_dir():
        return []
    return sorted(
        p for p in directory.iterdir() if p.name.startswith(PREFIX) and not p.is_symlink()
    )


def _private_dir(directory: Path) -> None:
    """The dump directory, 0700; a symlink planted in the root is refused, not followed.
    A root that does not exist yet is made search-only, as the worker makes roots."""
    root = directory.parent
    if not root.exists():
        root.mkdir(parents=True)
        root.chmod(private.TRAVERSE)
    if directory.is_symlink() or (directory.exists() and not directory.is_dir()):
        raise DumpError(f"{directory} is not a directory; refusing to write there")
    if not directory.exists():
        private.mkdir(directory)
    elif directory.stat().st_mode & 0o077:
        directory.chmod(private.DIR)


def _sqlite_copy(source: str, target: Path) -> None:
    src = sqlite3.connect(source, timeout=20)
    try:
        dst = sqlite3.connect(target)
        try:
            src.backup(dst)  # every page at once, under one read lock: consistent
            dst.execute("PRAGMA journal_mode=DELETE")  # one self-contained file
            result = dst.execute("PRAGMA integrity_check").fetchone()[0]
        finally:
            dst.close()
    finally:
        src.close()
    if result != "ok":
        raise DumpError(f"the copy of {source} fails its integrity check: {result}")


def _dumpdata(target: Path) -> None:
    with open(target, "w") as out:
        call_command(
            "dumpdata",
            "auth",
            "backups",
            exclude=["auth.permission"],
            natural_foreign=True,
            natural_primary=True,
            stdout=out,
        )


def _prune(directory: Path, keep: int) -> list[Path]:
    removed = dumps(directory)[:-keep] if keep > 0 else []
    for path in removed:
        path.unlink()
    return removed


def dump_database(keep: int | None = None) -> str:
    """Write one dump and keep the newest ``keep`` (VMBACKUP_DUMP_KEEP); returns what it did.
    Written under a hidden name, flushed, then renamed: a dump that is listed is whole."""
    keep = settings.VMBACKUP_DUMP_KEEP if keep is None else keep
    directory = target_dir()
    _private_dir(directory)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
    sqlite = connection.vendor == "sqlite"
    final = directory / f"{PREFIX}{stamp}.{'sqlite3' if sqlite else 'json'}"
    partial = directory / f".{final.name}.partial"
    if partial.exists() or partial.is_symlink():
        partial.unlink()
    private.create_file(partial)
    try:
        if sqlite:
            _sqlite_copy(str(connection.settings_dict["NAME"]), partial)
        else:
            _dumpdata(partial)
        with open(partial, "rb") as handle:
            os.fsync(handle.fileno())
        partial.chmod(private.FILE)  # sqlite may have recreated nothing, but be sure
        os.replace(partial, final)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    removed = _prune(directory, keep)
    size = final.stat().st_size
    log.info("database dumped to %s (%d bytes); %d older removed", final, size, len(removed))
    return f"{final} ({size} bytes); {len(removed)} older removed"
