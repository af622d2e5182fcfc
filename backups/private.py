"""Private by default: a backup holds every secret of every VM (disks, RAM, TPM keys, VNC
passwords in domain.xml), so whatever vmbackup writes is readable by its owner only.

The worker runs with umask 077 (see ``manage.py``), but the modes are also set here
explicitly when a file is created: code run from another entry point (a test, a shell, a
future one) must not publish a backup the world can read, and a mode fixed after a copy
leaves a window in which it could be read. No Django imports: ``archive`` uses this too.
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import pwd
import shutil
import struct
from collections.abc import Iterator
from pathlib import Path

UMASK = 0o077
FILE = 0o600
DIR = 0o700
# Search-only: lets QEMU (another user) reach a file it was handed below, and lists nothing.
TRAVERSE = 0o711
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def set_umask() -> int:
    """Every file a process creates afterwards is private unless a mode says otherwise."""
    return os.umask(UMASK)


def create_file(path: str | os.PathLike, mode: int = FILE) -> None:
    """An empty file, created exclusively (nothing planted there is followed) with ``mode``
    from the start. qemu-img writes into an existing file and keeps its mode, so an image
    created here is never readable by others, not even while it is being written."""
    fd = os.open(path, _CREATE, mode)
    try:
        os.fchmod(fd, mode)  # the umask must not decide
    finally:
        os.close(fd)


def write_file(path: str | os.PathLike, data: bytes | str, mode: int = FILE) -> None:
    """A new file with ``data``, private from its first byte."""
    fd = os.open(path, _CREATE, mode)
    with open(fd, "wb") as f:
        os.fchmod(fd, mode)
        f.write(data.encode() if isinstance(data, str) else data)


def mkdir(path: str | os.PathLike, mode: int = DIR) -> None:
    """A new directory with exactly ``mode`` (mkdir alone would apply the umask)."""
    os.mkdir(path, mode)
    os.chmod(path, mode)


def copy_file(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """Copy into a new private file (shutil.copyfile creates it with the umask's mode)."""
    create_file(target)
    with open(source, "rb") as src, open(target, "r+b") as dst:
        shutil.copyfileobj(src, dst, 1024 * 1024)


def copy_tree(
    source: str | os.PathLike, target: str | os.PathLike, skip: tuple[str, ...] = ()
) -> None:
    """Copy a directory of regular files: directories 0700, files 0600; names matching a
    ``skip`` pattern, links and special files are left out, never followed (TPM state is
    plain files)."""
    mkdir(target)
    for entry in sorted(os.scandir(source), key=lambda e: e.name):
        destination = Path(target, entry.name)
        if any(fnmatch.fnmatch(entry.name, pattern) for pattern in skip):
            continue
        if entry.is_dir(follow_symlinks=False):
            copy_tree(entry.path, destination, skip)
        elif entry.is_file(follow_symlinks=False):
            copy_file(entry.path, destination)


def make_root(root: str | os.PathLike) -> None:
    """A root we create is search-only for others (0711): QEMU, running as its own user,
    must pass through it to write push targets, and it lists nothing. Everything below it
    is 0700/0600. A root that exists keeps the mode its owner chose; missing parents are
    made 0711 too (the worker's umask would make them 0700, closed to QEMU)."""
    for path in [*reversed(Path(root).parents), Path(root)]:
        try:
            os.mkdir(path, TRAVERSE)
        except FileExistsError:
            continue
        os.chmod(path, TRAVERSE)


def owner_of(user: str) -> tuple[int, int] | None:
    """(uid, gid) of ``user``, or None when there is no such user (QEMU runs as root)."""
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        return None
    return entry.pw_uid, entry.pw_gid


@contextlib.contextmanager
def lent_to(directory: Path, user: str) -> Iterator[None]:
    """Hand ``directory`` (0700) and search permission on its parent to ``user`` for the
    duration of a job, then take both back, whatever happens.

    QEMU runs as its own user and opens push targets and pull scratch files by path, so it
    must reach them; nobody else may. The parent is the VM's directory, which only one run
    of the VM uses at a time.
    """
    owner = owner_of(user)
    if owner is None:
        yield
        return
    parent = directory.parent
    before = parent.stat().st_mode & 0o777  # 0710 with an instant restore's ACL: kept
    parent.chmod(TRAVERSE)
    os.chown(directory, *owner)
    try:
        yield
    finally:
        os.chown(directory, os.getuid(), os.getgid())
        directory.chmod(DIR)
        parent.chmod(before & 0o710)  # never wider than private, the mask kept


def take_back(path: str | os.PathLike) -> None:
    """A file another user (QEMU) wrote for us: ours again, and private."""
    with contextlib.suppress(OSError):
        os.chown(path, os.getuid(), os.getgid())
    os.chmod(path, FILE)


def tighten(path: str | os.PathLike, mode: int) -> None:
    """Narrow an existing file or directory of ours to ``mode`` (never widen it)."""
    with contextlib.suppress(FileNotFoundError):
        current = os.stat(path).st_mode & 0o777
        if current & ~mode:
            os.chmod(path, current & mode)


# -- read access for QEMU's user, by POSIX ACL ------------------------------------------------
# An instantly restored domain runs on overlays whose backing files are a backup's images:
# QEMU (its own user) must read them while the data moves, and nobody else may. Neither the
# owner nor the mode bits change (libvirt must not chown them either: the definition marks
# them ``relabel='no'``); one ACL entry names QEMU's user, and taking it back removes the
# ACL and puts the private mode back exactly.
ACL_XATTR = "system.posix_acl_access"
_ACL_VERSION = 2
_USER_OBJ, _USER, _GROUP_OBJ, _MASK, _OTHER = 0x01, 0x02, 0x04, 0x10, 0x20
_NO_ID = 0xFFFFFFFF


def _acl(mode: int, uid: int, perm: int) -> bytes:
    """The kernel's ACL xattr: owner, group and other as the mode says, plus ``uid``."""
    entries = [
        (_USER_OBJ, (mode >> 6) & 7, _NO_ID),
        (_USER, perm, uid),
        (_GROUP_OBJ, (mode >> 3) & 7, _NO_ID),
        (_MASK, perm | ((mode >> 3) & 7), _NO_ID),
        (_OTHER, mode & 7, _NO_ID),
    ]
    packed = b"".join(struct.pack("<HHI", tag, p, ident) for tag, p, ident in entries)
    return struct.pack("<I", _ACL_VERSION) + packed


def grant_acl(path: str | os.PathLike, uid: int, perm: int) -> None:
    """Let ``uid`` read (4) a file or pass (1) a directory of ours, without following a
    link and without changing owner or mode bits (the group bits show the mask)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        os.setxattr(fd, ACL_XATTR, _acl(os.fstat(fd).st_mode, uid, perm))
    finally:
        os.close(fd)


def revoke_acl(path: str | os.PathLike, mode: int) -> None:
    """No ACL any more and exactly ``mode`` (what ``grant_acl`` found); a path already gone
    or already without an ACL is fine."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        with contextlib.suppress(OSError):  # ENODATA: no ACL there
            os.removexattr(fd, ACL_XATTR)
        os.fchmod(fd, mode)
    finally:
        os.close(fd)


def has_acl(path: str | os.PathLike) -> bool:
    try:
        os.getxattr(path, ACL_XATTR, follow_symlinks=False)
    except OSError:
        return False
    return True
