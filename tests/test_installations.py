"""Two installations (two data dirs, two databases) on one libvirtd: each reconcile repairs
only what its own jobs left, and reports the other's without touching it."""

import json
import os
import signal
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from tests.domains import DiskSpec
from tests.helpers import wait_until

pytestmark = [pytest.mark.libvirt]
BASE_DIR = Path(__file__).resolve().parent.parent
FAKE_QEMU_IMG = """#!/bin/sh
# the real qemu-img, with a pause in `convert` long enough to act while a backup is in flight
if [ "$1" = convert ] && [ -n "$SLOW_CONVERT" ]; then touch "$SLOW_CONVERT"; sleep "$SLOW_FOR"; fi
exec {real} "$@"
"""
SHOW_FOREIGN = (
    "from backups.models import Host; print(json.dumps(Host.objects.get().foreign_artifacts))"
)


class Installation:
    def __init__(self, data_dir: Path, root: Path, bin_dir: Path):
        self.env = {k: v for k, v in os.environ.items() if k not in {"DATABASE_URL"}}
        self.env |= {
            "VMBACKUP_DATA_DIR": str(data_dir),
            "VMBACKUP_ROOT": str(root),
            "DJANGO_SETTINGS_MODULE": "vmbackup_site.settings",
            "PATH": f"{bin_dir}:{os.environ['PATH']}",
        }
        self.env.pop("VMBACKUP_SQLITE_PATH", None)

    def argv(self, *args: str) -> list[str]:
        return [sys.executable, str(BASE_DIR / "manage.py"), *args]

    def manage(self, *args: str) -> str:
        done = subprocess.run(
            self.argv(*args), cwd=BASE_DIR, env=self.env, capture_output=True, text=True,
            timeout=300,
        )  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    def shell(self, code: str) -> str:
        return self.manage("shell", "-c", "import json\n" + code).strip().splitlines()[-1]

    def slow_backup(self, vm: str, marker: Path, seconds: int) -> subprocess.Popen:
        env = self.env | {"SLOW_CONVERT": str(marker), "SLOW_FOR": str(seconds)}
        argv = self.argv("vmbackup_run", vm, "--method", "snapshot", "--wait")
        return subprocess.Popen(argv, cwd=BASE_DIR, env=env, stdout=subprocess.PIPE, text=True)


@pytest.fixture
def installations(tmp_path, backup_root, _swept):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "qemu-img"
    real = subprocess.check_output(["which", "qemu-img"], text=True).strip()
    fake.write_text(FAKE_QEMU_IMG.format(real=real))
    fake.chmod(0o755)
    made = []
    for name in ("a", "b"):
        inst = Installation(tmp_path / name, backup_root, bin_dir)
        inst.manage("migrate", "--noinput")
        made.append(inst)
    return made


def disk_source(domains, dom) -> str:
    xml = ET.fromstring(domains.lookup(dom).XMLDesc(0))
    return xml.find("devices/disk[@device='disk']/source").get("file")


def wait_for(path: Path, timeout: float = 60) -> None:
    wait_until(path.exists, timeout, f"{path} never appeared")


def test_each_installation_repairs_only_what_it_made(domains, installations, backup_root,
                                                     tmp_path):  # fmt: skip
    a, b = installations
    dom = domains.create([DiskSpec("vda", "qcow2", 16, [(0, 2, 0xA1)])], start=True)
    original = disk_source(domains, dom)
    for inst in (a, b):
        inst.manage("vmbackup_sync")
    site_a = a.shell("from backups import site; print(site.site_id())")
    assert site_a != b.shell("from backups import site; print(site.site_id())")

    # 1. A's snapshot backup is in flight (the guest runs on A's overlay) when B reconciles
    marker = tmp_path / "copying"
    running = a.slow_backup(dom.name, marker, seconds=8)
    wait_for(marker)
    overlay = disk_source(domains, dom)
    assert Path(overlay).name.startswith(f".vmbackup-{site_a}-")
    b.manage("vmbackup_reconcile")
    assert disk_source(domains, dom) == overlay  # untouched
    assert overlay in " ".join(json.loads(b.shell(SHOW_FOREIGN)))
    out, _ = running.communicate(timeout=300)
    assert running.returncode == 0, out
    assert disk_source(domains, dom) == original and not Path(overlay).exists()
    published = Path(out.strip().splitlines()[-1])
    assert (published / "SHA256SUMS").is_file()

    # 2. A is killed mid-copy: B's reconcile leaves its overlay and staging; A's repairs both
    marker.unlink()
    killed = a.slow_backup(dom.name, marker, seconds=60)
    wait_for(marker)
    overlay = disk_source(domains, dom)
    killed.send_signal(signal.SIGKILL)
    killed.wait(timeout=30)
    staging = list((backup_root / dom.name).glob(f".*.{site_a}.partial"))
    assert len(staging) == 1
    b.manage("vmbackup_reconcile")
    assert disk_source(domains, dom) == overlay and staging[0].is_dir()
    a.manage("vmbackup_reconcile")
    assert disk_source(domains, dom) == original and not Path(overlay).exists()
    assert not staging[0].exists()
    last_run = (
        "from backups.models import BackupRun as R; print(R.objects.order_by('pk').last().status)"
    )
    assert a.shell(last_run) == "interrupted"
    assert json.loads(a.shell(SHOW_FOREIGN)) == []
