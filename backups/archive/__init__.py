"""The on-disk backup format and the only code that reads or writes backup directories.

``format`` owns the names, patterns and the manifest (pure); ``store`` stages, publishes,
lists, hashes and opens stored files as untrusted input; ``check`` verifies a backup (and a
chain) against its own SHA256SUMS and manifest; ``instructions`` writes RESTORE.md and
restore.sh, which are part of the format. Nothing here imports Django: restore tooling and
tests must work without a database. The names below are the package's public surface.
"""

from .format import (
    FORMAT_VERSION,
    ArchiveError,
    DiskEntry,
    Manifest,
    final_name,
    partial_owner,
    safe_component,
    stamp,
)
from .store import (
    CHUNK,
    discard,
    fingerprint,
    fsync_dir,
    hash_fd,
    hash_file,
    hash_member,
    is_regular,
    list_backups,
    list_partials,
    make_durable,
    open_member,
    parse_sums,
    publish,
    read_manifest,
    read_member,
    read_sums,
    staging_dir,
    vm_dir,
    write_metadata,
    write_private,
)

__all__ = [
    "CHUNK",
    "FORMAT_VERSION",
    "ArchiveError",
    "DiskEntry",
    "Manifest",
    "discard",
    "final_name",
    "fingerprint",
    "fsync_dir",
    "hash_fd",
    "hash_file",
    "hash_member",
    "is_regular",
    "list_backups",
    "list_partials",
    "make_durable",
    "open_member",
    "parse_sums",
    "partial_owner",
    "publish",
    "read_manifest",
    "read_member",
    "read_sums",
    "safe_component",
    "stamp",
    "staging_dir",
    "vm_dir",
    "write_metadata",
    "write_private",
]
