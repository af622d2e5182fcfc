"""Mode assertions for "private by default": nothing vmbackup creates is readable or
writable by anyone but its owner."""

from __future__ import annotations

import os
import stat
from pathlib import Path


def loose(top: Path, allowed: dict[Path, int] | None = None) -> list[str]:
    """Every file or directory from ``top`` down (``top`` included) that group or others
    may read, write or enter, except the paths in ``allowed`` whose mode must then be
    exactly the one given."""
    allowed = {Path(p): mode for p, mode in (allowed or {}).items()}
    problems = []
    paths = [top]
    for dirpath, dirnames, filenames in os.walk(top):
        paths += [Path(dirpath, name) for name in dirnames + filenames]
    for path in paths:
        mode = stat.S_IMODE(path.lstat().st_mode)
        if path in allowed:
            if mode != allowed[path]:
                problems.append(f"{path}: {mode:o}, expected {allowed[path]:o}")
        elif mode & 0o077:
            problems.append(f"{path}: {mode:o}")
    return problems


def assert_private(top: Path, allowed: dict[Path, int] | None = None) -> None:
    problems = loose(top, allowed)
    assert not problems, "readable by others: " + "; ".join(problems)
