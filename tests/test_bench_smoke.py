"""Benches cannot rot: every script in bench/ runs at its smallest size (``--smoke``: one
round, tiny disk or inventory) as the whole command a user types, and must exit 0 and end
with its ``key=value ...`` line, leaving no domain and no file behind. The figures are not
checked: at these sizes they mean nothing (full-size runs are in bench/README.md).

``make test`` runs this with the rest of the suite; ``make bench-smoke`` runs it alone.
"""

import os
import re
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import libvirt
import pytest

from tests import domains as domains_mod

pytestmark = pytest.mark.libvirt

BENCH = Path(__file__).resolve().parent.parent / "bench"
SCRIPTS = sorted(p.name for p in BENCH.glob("*.py") if not p.name.startswith("_"))
# The last line of each known script; a new script only needs the key=value form.
LAST_KEYS = {
    "cli.py": ["import_ms", "run_overhead_ms", "restore_overhead_ms"],
    "dashboard.py": ["overview_p50_ms", "vm_p50_ms", "runs_p50_ms"],
    "full_backup.py": ["ratio_offline", "ratio_push_vs_qemu", "ratio_total_vs_floor"],
    "incremental.py": ["ratio_time", "ratio_size_to_changed"],
    "offsite.py": ["ratio_copy_vs_restic", "growth_ratio", "growth_restic"],
    "restore.py": [
        "restore_vs_virtnbdrestore",
        "instant_running_s",
        "instant_vs_virtnbdrestore",
        "drill_alive_s",
    ],
    "vs_virtnbdbackup.py": ["vs_full", "vs_full_compressed", "vs_inc", "vs_restore", "identical"],
}
NUMBER = r"-?\d+(?:\.\d+)?(?:/\d+)?"  # a figure, or a count like identical=3/3
LAST_LINE = re.compile(rf"\w+={NUMBER}(?: \w+={NUMBER})*")


@pytest.fixture
def bench_parent():
    """Where the script makes its scratch dirs (VMBACKUP_BENCH_DIR): traversable by QEMU,
    checked empty afterwards, removed in any case."""
    path = domains_mod.make_dir(Path("/var/tmp") / f"vmbackup-bench-smoke-{uuid.uuid4().hex[:8]}")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def owned_domains(pid: int) -> list[str]:
    """Domains a process made with the tests' scaffolding (its pid is in the description)."""
    conn = libvirt.open(domains_mod.URI)
    try:
        found = []
        for dom in conn.listAllDomains():
            try:
                if f"{domains_mod.OWNER_TAG}{pid}</description>" in dom.XMLDesc(0):
                    found.append(dom.name())
            except libvirt.libvirtError:  # removed meanwhile by whoever made it
                continue
        return found
    finally:
        conn.close()


def test_it_finds_every_known_bench_script():
    assert set(LAST_KEYS) <= set(SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS)
def test_it_runs_each_bench_at_its_smallest_size(script, bench_parent):
    env = {k: v for k, v in os.environ.items() if not k.startswith("DATABASE_URL")}
    env["VMBACKUP_BENCH_DIR"] = str(bench_parent)
    proc = subprocess.Popen(
        [sys.executable, str(BENCH / script), "--smoke"],
        cwd=BENCH.parent,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        out, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:  # timed out: SIGTERM unwinds the bench's own cleanup
            proc.terminate()
            proc.communicate(timeout=60)
    lines = [line for line in out.splitlines() if line.strip()]
    assert proc.returncode == 0, f"{script} exited {proc.returncode}:\n{out[-3000:]}\n{err[-3000:]}"
    assert lines and LAST_LINE.fullmatch(lines[-1]), f"{script} ended with: {lines[-1:]}"
    keys = [pair.split("=")[0] for pair in lines[-1].split()]
    assert keys == LAST_KEYS.get(script, keys)
    assert owned_domains(proc.pid) == []
    assert list(bench_parent.iterdir()) == []
