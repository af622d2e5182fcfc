"""Plain helpers shared by the test modules; fixtures live in ``conftest.py``.

Test modules import from here (and from ``domains``/``agent_guest``, the libvirt scaffolding),
never from each other, so a reader finds a helper in one place and a test module can be run,
moved or deleted on its own (``test_test_layout.py`` holds that line).
"""

from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TypeVar

import pytest
from django.contrib.auth.models import Group, Permission
from django.test import Client
from django.utils import timezone

from backups import archive, jobs, qemu_img, requests, restic
from backups.archive import DiskEntry, Manifest
from backups.models import (
    Backup,
    BackupPolicy,
    BackupRun,
    Kind,
    OffsiteCopy,
    RunStatus,
    VirtualMachine,
)
from backups.offsite import restic_repository
from tests.domains import PREFIX, guest_write, run

T = TypeVar("T")

# ------------------------------------------------------------------------------ waiting


def wait_until(
    predicate: Callable[[], T],
    timeout: float = 30,
    message: str | Callable[[], str] = "",
    interval: float = 0.05,
) -> T:
    """Poll ``predicate`` until it returns something truthy and return that; fail the test
    after ``timeout`` seconds. Tests wait on what they can observe (a row, a file, a
    process), never for a fixed time that is too long on a fast machine and too short on a
    busy one. ``message`` may be a callable, for details only worth computing on failure."""
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() >= deadline:
            detail = message() if callable(message) else message
            pytest.fail(f"not true within {timeout:g} s: {detail or predicate}")
        time.sleep(interval)
    return value


# --------------------------------------------------------------------------- file modes


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
    """ "Private by default": nothing vmbackup creates is readable or writable by anyone
    but its owner."""
    problems = loose(top, allowed)
    assert not problems, "readable by others: " + "; ".join(problems)


# ---------------------------------------------------------------- web actors and rows


def make_user(django_user_model, name: str, *perms: str):
    """A user whose permissions come from a group, as in production."""
    # No password: the tests log in with force_login, and hashing one costs ~0.2 s per actor.
    user = django_user_model.objects.create_user(name, f"{name}@example.com")
    if perms:
        group, _ = Group.objects.get_or_create(name=f"{name}s")
        codenames = [perm.split(".", 1)[1] for perm in perms]
        group.permissions.set(Permission.objects.filter(codename__in=codenames))
        user.groups.add(group)
    return user


def logged_in(user) -> Client:
    client = Client()
    client.force_login(user)
    return client


MANIFEST = {
    "vm_name": "web-1",
    "method": "push",
    "kind": "full",
    "consistency": "filesystem-frozen",
    "disks": [
        {
            "target": "vda",
            "file": "vda.qcow2",
            "format": "qcow2",
            "bytes": 1048576,
            "sha256": "ab" * 32,
            "backing": None,
        }
    ],
    "started": "2026-01-01T02:00:00Z",
    "finished": "2026-01-01T02:05:00Z",
    "parent": None,
    "skipped": [],
}


def make_run(vm, status=RunStatus.SUCCEEDED, ago=timedelta(hours=1), **fields) -> BackupRun:
    now = timezone.now()
    defaults = {
        "created_at": now - ago,
        "started_at": now - ago,
        "finished_at": None if status in (RunStatus.QUEUED, RunStatus.RUNNING) else now - ago,
    }
    defaults.update(fields)
    return BackupRun.objects.create(vm=vm, status=status, **defaults)


def make_backup(vm, ago=timedelta(hours=1), kind=Kind.FULL, parent=None, **fields) -> Backup:
    created = timezone.now() - ago
    defaults = {
        "path": f"/var/backups/vms/{vm.name}/{created:%Y%m%dT%H%M%S%f}-{uuid.uuid4().hex[:6]}",
        "created_at": created,
        "kind": kind,
        "parent": parent,
        "size_bytes": 1000,
        "manifest": dict(MANIFEST, vm_name=vm.name, kind=kind),
    }
    defaults.update(fields)
    return Backup.objects.create(vm=vm, **defaults)


def populate(host, count: int, start: int = 0) -> None:
    """``count`` VMs, each in a policy, with a finished run and a full + incremental backup."""
    now = timezone.now()
    vms = VirtualMachine.objects.bulk_create(
        VirtualMachine(host=host, uuid=uuid.uuid4(), name=f"vm-{n:05d}")
        for n in range(start, start + count)
    )
    nightly, _ = BackupPolicy.objects.get_or_create(name="bulk")
    BackupPolicy.vms.through.objects.bulk_create(
        BackupPolicy.vms.through(backuppolicy_id=nightly.pk, virtualmachine_id=v.pk) for v in vms
    )
    statuses = [RunStatus.SUCCEEDED, RunStatus.FAILED, RunStatus.INTERRUPTED]
    BackupRun.objects.bulk_create(
        BackupRun(
            vm=v,
            status=statuses[i % 3],
            created_at=now - timedelta(hours=1),
            started_at=now - timedelta(hours=1),
            finished_at=now,
        )
        for i, v in enumerate(vms)
    )
    fulls = Backup.objects.bulk_create(
        Backup(vm=v, path=f"/b/{v.name}/full", created_at=now - timedelta(days=2), size_bytes=10)
        for v in vms
    )
    Backup.objects.bulk_create(
        Backup(
            vm=f.vm,
            parent=f,
            kind=Kind.INCREMENTAL,
            path=f"/b/{f.vm.name}/inc",
            created_at=now - timedelta(days=1),
            size_bytes=1,
        )
        for f in fulls
    )


# ------------------------------------------------------------------- archives on disk

KIB = 1024
MIB = 1024 * KIB
WHEN = datetime(2026, 11, 30, 1, 0, 0, tzinfo=UTC)
needs_tools = pytest.mark.skipif(
    not all(shutil.which(t) for t in ("qemu-img", "qemu-io", "sha256sum")),
    reason="qemu-img, qemu-io and sha256sum are required",
)


def disk(**overrides) -> DiskEntry:
    fields = dict(
        target="vda",
        source="/var/lib/libvirt/images/web.img",
        format="raw",
        virtual_size=MIB,
        file="vda.qcow2",
        bytes=200 * KIB,
        sha256="a" * 64,
    )
    return DiskEntry(**{**fields, **overrides})


def manifest(**overrides) -> Manifest:
    fields = dict(
        version=archive.FORMAT_VERSION,
        vm_name="web",
        vm_uuid="2b1c7a5e-1111-4d6f-9a49-0123456789ab",
        host="kvm1",
        method="offline",
        kind="full",
        consistency="offline",
        started="2026-11-30T01:00:00+00:00",
        finished="2026-11-30T01:02:03+00:00",
        run_id=4,
        disks=(disk(),),
    )
    return Manifest(**{**fields, **overrides})


def qemu_io(path: Path, fmt: str, command: str) -> None:
    argv = ["qemu-io", "-f", fmt, "-c", command, str(path)]
    subprocess.run(argv, check=True, capture_output=True, timeout=30)


def raw_source(path: Path, size: int = MIB) -> Path:
    """A small raw disk with a recognisable pattern in two places."""
    qemu_img.create(str(path), "raw", size)
    qemu_io(path, "raw", "write -P 0xab 0 64k")
    qemu_io(path, "raw", "write -P 0x5c 512k 64k")
    return path


def sha256sum_check(directory: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["sha256sum", "-c", "SHA256SUMS"], cwd=directory, capture_output=True, text=True, timeout=30
    )


def publish_backup(
    root: Path,
    vm_name: str,
    run_id: int,
    fill,
    *,
    when: datetime = WHEN,
    domain_xml: str = "<domain><name>x</name></domain>\n",
    **fields,
) -> Path:
    """Stage, fill, hash, write metadata and publish, as a backup job would.

    `fill(staging)` writes the data files and returns the disks as dicts without hashes.
    """
    staging = archive.staging_dir(root, vm_name, archive.stamp(when), run_id)
    disk_fields = fill(staging)
    sums = {
        path.relative_to(staging).as_posix(): archive.hash_file(path)
        for path in sorted(staging.rglob("*"))
        if path.is_file()
    }
    disks = tuple(
        DiskEntry(**d, sha256=sums[d["file"]], bytes=(staging / d["file"]).stat().st_size)
        for d in disk_fields
    )
    fields = {"vm_name": vm_name, "run_id": run_id, "disks": disks, **fields}
    archive.write_metadata(staging, manifest(**fields), domain_xml, sums)
    return archive.publish(staging)


def full_filler(source: Path, target: str = "vda", file: str | None = None):
    """Converts a raw source into `<target>.qcow2`, like an offline backup does."""
    file = file or f"{target}.qcow2"

    def fill(staging: Path) -> list[dict]:
        qemu_img.convert(str(source), "raw", str(staging / file), "qcow2")
        return [dict(target=target, source=str(source), format="raw", virtual_size=MIB, file=file)]

    return fill


def incremental_filler(parent: Path, command: str = "write -P 0xcd 128k 64k"):
    """An overlay on the parent's image by relative path, holding one changed range."""

    def fill(staging: Path) -> list[dict]:
        backing = f"../{parent.name}/vda.qcow2"
        image = staging / "vda.qcow2"
        qemu_img.create(str(image), "qcow2", MIB, backing=backing, backing_fmt="qcow2")
        qemu_io(image, "qcow2", command)
        entry = dict(target="vda", source="/x/vda.img", format="raw", virtual_size=MIB)
        return [dict(entry, file="vda.qcow2", backing=backing, backing_format="qcow2")]

    return fill


def data_filler(staging: Path) -> list[dict]:
    """Files without qemu-img, for tests about the directory rather than the images."""
    (staging / "vda.qcow2").write_bytes(b"not really qcow2")
    (staging / "nvram.fd").write_bytes(b"\0" * 128)
    (staging / "tpm").mkdir()
    (staging / "tpm" / "tpm2-00.permall").write_bytes(b"tpm state")
    return [
        dict(target="vda", source="/x/vda.img", format="raw", virtual_size=MIB, file="vda.qcow2")
    ]


def flip_byte(path: Path, offset: int | None = None) -> None:
    """Bit rot; by default inside the 0xab pattern, i.e. guest data, not qcow2 metadata."""
    if offset is None:
        offset = path.read_bytes().index(b"\xab" * 4096) + 100
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


# ----------------------------------------------- backups and restores of real domains


def push(vm, policy=None):
    """A push backup run to the end in this process; it must succeed."""
    r = requests.request_backup(vm, method="push", enqueue=False, policy=policy)
    jobs.run_backup(r.pk)
    r.refresh_from_db()
    assert r.status == RunStatus.SUCCEEDED, r.error
    return r


def write(domains, dom, index, command):
    """A qemu-io command on the running guest's disk ``index``, flushed."""
    guest_write(domains.conn, dom.uuid, index, command)
    guest_write(domains.conn, dom.uuid, index, "flush")


def snapshot_copy(dom, target, dest: Path) -> Path:
    """The disk's content now, taken beside the running guest (-U) after a flush."""
    out = dest / f"{target}.ref.qcow2"
    run(["qemu-img", "convert", "-U", "-f", dom.formats[target], "-O", "qcow2",
         str(dom.disks[target]), str(out)])  # fmt: skip
    return out


def new_name() -> str:
    return f"{PREFIX}r-{uuid.uuid4().hex[:8]}"


def restore_now(backup: Backup, root: Path, name: str | None = None, start: bool = False):
    """A restore as a new domain, run to the end in this process, whatever its outcome."""
    restore = requests.request_restore(backup, name=name or new_name(), root=str(root), start=start)
    jobs.run_restore(restore.pk)
    restore.refresh_from_db()
    return restore


def modes_at_copy(monkeypatch) -> dict[str, int]:
    """The mode each restored image has when qemu-img starts writing into it."""
    seen, real = {}, qemu_img.convert

    def convert(src, src_fmt, dst, dst_fmt, **kwargs):
        seen[dst] = os.stat(dst).st_mode & 0o777
        return real(src, src_fmt, dst, dst_fmt, **kwargs)

    monkeypatch.setattr(qemu_img, "convert", convert)
    return seen


def assert_vm_untouched(domains, dom, running: bool):
    """The domain is as the backup found it: same state, own disks, no job, no leftovers."""
    d = domains.lookup(dom)
    assert bool(d.isActive()) == running
    xml = d.XMLDesc(0)
    for path in dom.disks.values():
        assert f"file='{path}'" in xml
    assert ".overlay." not in xml
    assert [p.name for p in dom.dir.iterdir() if p.name.startswith(".vmbackup-")] == []
    if running:
        for target in dom.disks:
            assert not d.blockJobInfo(target, 0)
        assert d.jobStats().get("type", 0) == 0


def assert_images_equal(dom, backup_dir: Path):
    for target, path in dom.disks.items():
        image = backup_dir / f"{target}.qcow2"
        assert qemu_img.compare(str(path), dom.formats[target], str(image), "qcow2")


# --- processes (for tests that kill commands and clusters) ---------------------------------


def _stat_fields(pid: int | str) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name; None when it is gone."""
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def alive(pid: int) -> bool:
    """Running (a zombie is not: it only waits for its parent to read its status)."""
    fields = _stat_fields(pid)
    return fields is not None and fields[0] != "Z"


def _children_by_parent() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        fields = _stat_fields(entry.name) if entry.name.isdigit() else None
        if fields is not None:
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    return children


def children_of(pid: int) -> set[int]:
    return set(_children_by_parent().get(pid, []))


def descendants(pid: int) -> set[int]:
    """Every process below ``pid`` (by parent links in /proc)."""
    children = _children_by_parent()
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# -- offsite copies ---------------------------------------------------------------------------
def random_image(size: int):
    """A raw image of random data, as ``publish_backup`` fills a staging directory."""

    def fill(staging: Path) -> list[dict]:
        with open(staging / "vda.raw", "wb") as f:
            f.write(os.urandom(size))
        return [
            dict(target="vda", source="/x/vda.img", format="raw", virtual_size=size, file="vda.raw")
        ]

    return fill


def copy_now(backup, repository) -> OffsiteCopy:
    copy = requests.request_offsite_copy(backup, repository, enqueue=False)
    jobs.copy_offsite(copy.pk)
    copy.refresh_from_db()
    return copy


def snapshots(repository) -> list:
    return restic.snapshots(restic_repository(repository))


def flip_first_byte(path: Path) -> None:
    with open(path, "r+b") as f:
        byte = f.read(1)
        f.seek(0)
        f.write(bytes([byte[0] ^ 0xFF]))
