"""The test suite's own layout: fixtures come from conftest.py, helpers from helpers.py (or
the libvirt scaffolding), never from another test module, so each module stands alone."""

import ast
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent


def _is_test_module(dotted: str) -> bool:
    return dotted.rsplit(".", 1)[-1].startswith("test_")


def imports_of_test_modules(top: Path) -> list[str]:
    """``path:line name`` for every import, anywhere below ``top``, that reaches a
    ``test_*`` module: ``import tests.test_x``, ``from tests.test_x import y``,
    ``from tests import test_x`` and their relative forms."""
    found = []
    for path in sorted(top.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                names = [base] + [f"{base}.{alias.name}" for alias in node.names]
            else:
                continue
            for name in names:
                if any(_is_test_module(part) for part in name.split(".")):
                    found.append(f"{path.relative_to(top)}:{node.lineno} {name.lstrip('.')}")
                    break
    return found


def test_it_finds_no_test_module_importing_another():
    assert imports_of_test_modules(TESTS) == []


@pytest.mark.parametrize(
    "line",
    [
        "import tests.test_archive",
        "from tests.test_archive import manifest",
        "from tests.test_views_support import *",
        "from tests import test_archive",
        "from tests import helpers, test_archive",
        "from tests.e2e.test_browser import CHROMIUM",
        "from .test_archive import manifest",
        "from . import test_archive",
        "def f():\n    from tests.test_archive import manifest",
    ],
)
def test_it_catches_every_way_of_importing_a_test_module(tmp_path, line):
    (tmp_path / "test_new.py").write_text(line + "\n")
    assert len(imports_of_test_modules(tmp_path)) == 1


def test_it_allows_helpers_fixtures_and_the_libvirt_scaffolding(tmp_path):
    (tmp_path / "test_new.py").write_text(
        "import pytest\n"
        "from tests import domains\n"
        "from tests.helpers import push, wait_until\n"
        "from tests.e2e.browser import CHROMIUM\n"
        "from backups.models import BackupRun\n"
    )
    assert imports_of_test_modules(tmp_path) == []
