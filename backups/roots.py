"""The configured backup roots: the only directories the worker writes, deletes or adopts
backups under. A policy's ``destination`` must be one of them (checked by the model when it
is saved, and again here by the worker, so a row edited in the database changes nothing).

``VMBACKUP_ROOT`` (the default destination) is always one of them, with every entry of
``VMBACKUP_ROOTS``. Paths compare after ``normpath``: ``/srv/b/`` is ``/srv/b``.
"""

import os
import posixpath

from django.conf import settings


def _norm(path: str) -> str:
    return posixpath.normpath(path) if path else ""


def configured() -> list[str]:
    """Absolute, normalised, without duplicates; VMBACKUP_ROOT first."""
    candidates = [settings.VMBACKUP_ROOT, *getattr(settings, "VMBACKUP_ROOTS", [])]
    roots = [_norm(r) for r in candidates if r and os.path.isabs(r)]
    return [r for r in dict.fromkeys(roots) if r != "/"]


def refusal(root: str) -> str:
    """Why the worker must not write under ``root``; empty when it is a configured root."""
    if _norm(root) in configured():
        return ""
    return (
        f"backup root {root!r} is not one of the configured roots "
        f"({', '.join(configured()) or 'none'}); set VMBACKUP_ROOTS"
    )
