"""This installation's identity (``Installation``): one short id, made once per database.

Several installations may share a libvirt host (a staging install, a second dashboard, an
operator running the test suite); each reconcile must repair only what its own jobs left.
Names of in-flight artifacts carry the id — see ``methods.overlay_name``,
``chain.checkpoint_name``, ``archive.staging_dir`` and ``fold``.
"""

import re
import secrets

from django.db import IntegrityError, transaction

from .models import Installation

PATTERN = r"[0-9a-f]{8}"
_RE = re.compile(rf"^{PATTERN}$")


def site_id() -> str:
    """The id, created on first use (the row is a singleton: two workers racing to create
    it both end up with the one that won)."""
    try:
        with transaction.atomic():
            row, _ = Installation.objects.get_or_create(
                pk=1, defaults={"site_id": secrets.token_hex(4)}
            )
    except IntegrityError:
        row = Installation.objects.get(pk=1)
    return row.site_id


def is_site(value: str) -> bool:
    return bool(_RE.match(value or ""))


# A drill's sandbox domain (and its scratch directory) is named for the installation and
# the drill: ``vmbackup-drill-<site>-<id>``. The inventory never lists such a domain as a
# VM, whoever made it; reconcile removes only its own.
DRILL_PREFIX = "vmbackup-drill-"
_DRILL_RE = re.compile(rf"^{DRILL_PREFIX}({PATTERN})-([0-9]+)$")


def drill_name(drill_id: int) -> str:
    return f"{DRILL_PREFIX}{site_id()}-{drill_id}"


def is_drill_name(name: str) -> bool:
    return (name or "").startswith(DRILL_PREFIX)


def parse_drill_name(name: str) -> tuple[str, int] | None:
    """(site, drill id) of a sandbox's name, or None for any other name."""
    found = _DRILL_RE.match(name or "")
    return (found.group(1), int(found.group(2))) if found else None
