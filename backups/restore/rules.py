"""What a restore request may ask for, checked by the form and again in the worker: a
domain name libvirt accepts and a restore root from the configured allowlist. No libvirt
here: the web process imports it."""

import os
import re

from django.conf import settings

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


NAME_HELP = "letters, digits, '.', '_' and '-', up to 64, starting with a letter or digit"


class RestoreError(Exception):
    """A restore cannot go on; the message is for the user."""


def allowed_roots() -> list[str]:
    """The configured restore roots, absolute and normalised."""
    return [os.path.abspath(root) for root in settings.VMBACKUP_RESTORE_ROOTS if root]


def check_request(name: str, root: str) -> None:
    """What the form checks, checked again where it matters: in the worker."""
    if not NAME_RE.match(name or ""):
        raise RestoreError(f"invalid domain name {name!r}: {NAME_HELP}")
    if os.path.abspath(root) not in allowed_roots():
        raise RestoreError(f"{root} is not one of the configured restore roots")


FILE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
FILE_HELP = "letters, digits, '.', '_' and '-', up to 128, starting with a letter or digit"


def check_disk_file(path: str) -> tuple[str, str]:
    """Where a one-disk restore may write: a new file (a plain name) in an existing
    directory that is a configured restore root or lies below one, with no symlink below
    the root on the way. Checked by the request and again by the worker, which also
    creates the file so that nothing planted meanwhile is followed. Returns (directory,
    file name)."""
    path = os.path.abspath(path or "")
    directory, name = os.path.split(path)
    if not FILE_RE.match(name):
        raise RestoreError(f"invalid file name {name!r}: {FILE_HELP}")
    root = next((r for r in allowed_roots() if within(directory, r)), None)
    if root is None:
        raise RestoreError(f"{path} is not in one of the configured restore roots")
    below = os.path.relpath(directory, root)
    real = os.path.normpath(os.path.join(os.path.realpath(root), below))
    if not os.path.isdir(directory) or os.path.realpath(directory) != real:
        raise RestoreError(f"{directory} is not a directory (or is reached through a symlink)")
    if os.path.lexists(path):
        raise RestoreError(f"{path} already exists; nothing is overwritten")
    return directory, name


def within(directory: str, root: str) -> bool:
    return directory == root or directory.startswith(root.rstrip("/") + "/")
