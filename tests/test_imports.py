"""The shape of the code: imports point one way (web -> jobs -> engines -> doors), with no
cycle and no import hidden in a function to break one; the on-disk format needs no Django;
the web process never loads libvirt."""

import ast
import subprocess
import sys
from pathlib import Path

BASE = Path(__file__).resolve().parent.parent
PACKAGE = BASE / "backups"
# Django wants signal handlers connected in AppConfig.ready(), once the models are loaded
ALLOWED_FUNCTION_IMPORTS = {("backups.apps", "backups.signals")}


def module_name(path: Path) -> str:
    parts = path.relative_to(BASE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def sources() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        if "migrations" in path.parts:
            continue
        found[module_name(path)] = path
    return found


MODULES = sources()


def resolve(importer: str, node: ast.ImportFrom | ast.Import) -> list[str]:
    """The backups modules an import statement loads (a package's __init__ included)."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
        return [n for n in names if n in MODULES]
    is_package = MODULES[importer].name == "__init__.py"
    base = importer.split(".") if is_package else importer.split(".")[:-1]
    if node.level:
        base = base[: len(base) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    if not target.startswith("backups"):
        return []
    loaded = []
    parts = target.split(".")
    for i in range(2, len(parts) + 1):  # importing a.b.c loads a.b, a.b.c (a: empty)
        if ".".join(parts[:i]) in MODULES:
            loaded.append(".".join(parts[:i]))
    for alias in node.names:
        if f"{target}.{alias.name}" in MODULES:
            loaded.append(f"{target}.{alias.name}")
    return loaded


def imports(name: str) -> tuple[set[str], set[str]]:
    """(module-level, function-level) backups modules ``name`` imports."""
    tree = ast.parse(MODULES[name].read_text())
    top_nodes = {id(node) for node in tree.body}
    for node in tree.body:  # `if TYPE_CHECKING:` blocks at module level count as top level
        if isinstance(node, ast.If):
            top_nodes |= {id(child) for child in node.body}
    top, inner = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            (top if id(node) in top_nodes else inner).update(resolve(name, node))
    return top - {name}, inner - {name}


GRAPH = {name: imports(name) for name in MODULES}


def test_it_has_no_import_cycle():
    edges = {name: top for name, (top, _inner) in GRAPH.items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for name in sorted(edges):
        if name not in state:
            visit(name, [name])
    # a package's __init__ re-exporting its own submodules is not a cycle of ours
    real = [c for c in cycles if not all(m.startswith(c[0] + ".") or m == c[0] for m in c)]
    assert real == []


def test_no_backups_module_is_imported_inside_a_function():
    hidden = sorted(
        (name, target)
        for name, (_top, inner) in GRAPH.items()
        for target in inner
        if ".management." not in name and (name, target) not in ALLOWED_FUNCTION_IMPORTS
    )
    assert hidden == []


def test_the_on_disk_format_needs_no_django():
    for name, path in MODULES.items():
        if name.startswith("backups.archive"):
            tree = ast.parse(path.read_text())
            for node in ast.walk(tree):
                if isinstance(node, ast.Import | ast.ImportFrom):
                    names = [a.name for a in node.names] + [getattr(node, "module", "") or ""]
                    assert not any(n.startswith("django") for n in names), name
                    loaded = resolve(name, node) if isinstance(node, ast.ImportFrom) else []
                    assert all(
                        m.startswith("backups.archive") or m == "backups.qemu_img" for m in loaded
                    ), (name, loaded)


def test_the_web_process_never_loads_libvirt():
    code = (
        "import django; django.setup(); "
        "import backups.views, backups.urls, backups.admin, backups.forms, backups.metrics"
    )
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", code],
        cwd=BASE,
        env={"DJANGO_SETTINGS_MODULE": "vmbackup_site.settings", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    loaded = [line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines()]
    assert [m for m in loaded if "libvirt" in m] == []
    assert "backups.views" in loaded and "backups.hypervisor" not in loaded


def test_only_the_hypervisor_package_imports_libvirt():
    importers = set()
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [a.name for a in node.names] + [getattr(node, "module", "") or ""]
                if any(n.split(".")[0] in ("libvirt", "libvirt_qemu") for n in names):
                    importers.add(name)
    assert importers and all(n.startswith("backups.hypervisor.") for n in importers), importers
