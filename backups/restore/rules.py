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
