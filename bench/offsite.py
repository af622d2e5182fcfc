"""An offsite copy against bare ``restic backup`` of the same directory, side by side, and
what a second full costs the repository after a little changed.

    .venv/bin/python bench/offsite.py [--size-gib 2] [--rounds 3] [--changed-mib 100]
    .venv/bin/python bench/offsite.py --smoke   # 64 MiB, 1 round, 4 MiB: does it run?

Publishes a full backup of a qcow2 disk (half random, a quarter text, a quarter hole, as
the other benches build it), verified as a run verifies it (its files' fingerprint on the
row), no libvirt needed: the copy reads a published directory. Each round, in rotating
order, into a fresh repository each (``restic init``, restic's cache in the same place for
all): the whole copy job as the backup requests it (``jobs.copy_offsite``: structure and
headers checked, ``restic backup`` of exactly its files with tags, the snapshot's listing
read back and compared; the backup was verified moments ago and is unchanged, so it is not
hashed again), the same copy with ``VMBACKUP_OFFSITE_REHASH_AFTER=0`` (SHA-256 and
``qemu-img check`` of everything beside the upload, as for a backup verified long ago), and
``restic backup <dir>`` run by hand from the VM's directory. ``sync`` before each.
``ratio_copy_vs_restic`` is the median copy time over the median restic time (target
<= 1.1); the re-reading copy's ratio is printed above it.

Then ``--changed-mib`` MiB of random data are written at spread offsets of the disk
(``--extent-mib`` at a time: 1 scatters 1 MiB blocks as bench/incremental.py does), a
second full backup is published from it, copied into the last round's copy repository and
backed up by bare restic into the last round's restic repository: ``growth_ratio`` is what
our repository grew by (its files' bytes) over the bytes changed (target <= 1.3), and
``growth_restic`` the same for bare restic, side by side. The last line:
``ratio_copy_vs_restic=<r> growth_ratio=<r> growth_restic=<r>``.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import _common as c

TARGETS = {"ratio_copy_vs_restic": 1.1, "growth_ratio": 1.3}
SMOKE = {"size_gib": 0.0625, "rounds": 1, "changed_mib": 4}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-gib", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--changed-mib", type=int, default=100)
    parser.add_argument("--extent-mib", type=int, default=1, help="size of each changed run")
    parser.add_argument("--quiet-wait", type=float, default=300, help="seconds to wait for it")
    parser.add_argument("--smoke", action="store_true", help="smallest size, one round")
    args = parser.parse_args(argv)
    if args.smoke:
        vars(args).update(SMOKE, quiet_wait=0)
    size = int(args.size_gib * c.GiB)
    if size <= 0 or size % (4 * c.CHUNK):
        parser.error(f"--size-gib must be a positive multiple of {4 * c.CHUNK // c.MiB} MiB")
    if not 1 <= args.changed_mib <= size // c.MiB or args.rounds < 1:
        parser.error("--changed-mib must fit in the disk; --rounds must be >= 1")
    if not 1 <= args.extent_mib <= args.changed_mib or args.changed_mib % args.extent_mib:
        parser.error("--extent-mib must divide --changed-mib")
    if not shutil.which("restic"):
        parser.error("restic is required (scripts/setup-host.sh installs it)")
    scratch, work = c.scratch_dir(), c.bench_dir("vmbackup-bench-offsite")
    try:
        with c.interrupts_as_keyboard():
            c.setup_django(scratch)
            return run_rounds(args, work)
    finally:
        with c.uninterruptible():
            c.close_django()
            shutil.rmtree(scratch, ignore_errors=True)
            shutil.rmtree(work, ignore_errors=True)


def publish(root: Path, vm, run_id: int, raw: Path, when: datetime):
    """A full backup of ``raw`` as a run publishes it (qcow2 image, SHA256SUMS, manifest)
    and its row."""
    from backups import archive
    from backups.archive import DiskEntry, Manifest
    from backups.models import Backup

    staging = archive.staging_dir(root, vm.name, archive.stamp(when), run_id)
    image = staging / "vda.qcow2"
    c.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(image)])
    digest = archive.hash_file(image)
    disk = DiskEntry(target="vda", source=str(raw), format="raw", file="vda.qcow2",
                     virtual_size=raw.stat().st_size, bytes=image.stat().st_size,
                     sha256=digest)  # fmt: skip
    stamp = when.isoformat()
    manifest = Manifest(version=archive.FORMAT_VERSION, vm_name=vm.name, vm_uuid=str(vm.uuid),
                        host="bench", method="offline", kind="full", consistency="offline",
                        started=stamp, finished=stamp, run_id=run_id, disks=(disk,))  # fmt: skip
    archive.write_metadata(staging, manifest, "<domain><name>x</name></domain>\n",
                           {"vda.qcow2": digest})  # fmt: skip
    path = archive.publish(staging)
    return Backup.objects.create(vm=vm, path=str(path), created_at=when, size_bytes=disk.bytes,
                                 manifest=manifest.to_dict(), verify_status="ok",
                                 verified_at=datetime.now(UTC),
                                 verified_files=archive.fingerprint(path))  # fmt: skip


def repository(work: Path, n: int, password: Path):
    from backups import restic
    from backups.models import OffsiteRepository
    from backups.offsite import restic_repository

    model = OffsiteRepository.objects.create(
        name=f"bench-{n}", url=str(work / f"repo-{n}"), password_file=str(password)
    )
    restic.init(restic_repository(model))
    return model


def copy_seconds(backup, model, rehash: bool = False) -> float:
    """The copy job, as a worker runs it; ``rehash``: as for a backup verified long ago."""
    from django.conf import settings

    from backups import jobs, requests

    copy = requests.request_offsite_copy(backup, model, enqueue=False)
    trusted = settings.VMBACKUP_OFFSITE_REHASH_AFTER
    settings.VMBACKUP_OFFSITE_REHASH_AFTER = 0 if rehash else trusted
    try:
        start = time.perf_counter()
        jobs.copy_offsite(copy.pk)
        elapsed = time.perf_counter() - start
    finally:
        settings.VMBACKUP_OFFSITE_REHASH_AFTER = trusted
    copy.refresh_from_db()
    if copy.status != "succeeded":
        raise RuntimeError(f"copy {copy.pk} {copy.status}: {copy.error}")
    hashed = "verified-before" not in [e["step"] for e in copy.journal]
    if hashed != rehash:
        raise RuntimeError(f"copy {copy.pk} {'re-read' if hashed else 'skipped'} the hash")
    return elapsed


def restic_seconds(backup, model) -> float:
    """Bare ``restic backup`` of the backup's directory, as a person would run it."""
    from django.conf import settings

    env = {"PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", "/root"), "TZ": "UTC",
           "RESTIC_REPOSITORY": model.url, "RESTIC_PASSWORD_FILE": model.password_file,
           "RESTIC_CACHE_DIR": settings.VMBACKUP_RESTIC_CACHE_DIR}  # fmt: skip
    directory = Path(backup.path)
    start = time.perf_counter()
    c.run_in([shutil.which("restic"), "backup", "--quiet", directory.name], directory.parent, env)
    return time.perf_counter() - start


def tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def change(raw: Path, mib: int, extent: int, seed: int = 7) -> int:
    """``mib`` MiB of random data in runs of ``extent`` MiB at distinct offsets spread over
    the disk (1: scattered blocks, as bench/incremental.py writes them)."""
    rng = random.Random(seed)
    slots = rng.sample(range(raw.stat().st_size // c.MiB // extent), mib // extent)
    with open(raw, "r+b") as f:
        for slot in slots:
            f.seek(slot * extent * c.MiB)
            f.write(os.urandom(extent * c.MiB))
    return mib * c.MiB


def run_rounds(args, work: Path) -> int:
    from backups.models import Host, VirtualMachine

    size = int(args.size_gib * c.GiB)
    root = c.subdir(work, "root")
    password = work / "password"
    password.write_text(uuid.uuid4().hex + "\n")
    password.chmod(0o600)
    raw = work / "disk.raw"
    c.build_raw(raw, size)
    host = Host.objects.create(name="bench", uri="qemu:///system")
    vm = VirtualMachine.objects.create(host=host, uuid=uuid.uuid4(), name="bench-vm")
    when = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1)
    first = publish(root, vm, 1, raw, when)
    c.wait_quiet(args.quiet_wait)
    print(f"disk {args.size_gib:g} GiB ({first.size_bytes / c.MiB:.0f} MiB backup), "
          f"{args.changed_mib} MiB changed in {args.extent_mib} MiB runs "
          "for the second full")  # fmt: skip
    print(f"{'round':>5} {'copy s':>8} {'re-read s':>10} {'restic s':>9}")
    times: dict[str, list[float]] = {"copy": [], "reread": [], "restic": []}
    kinds = list(times)
    last: dict[str, object] = {}
    for i in range(args.rounds):
        order = kinds[i % 3 :] + kinds[: i % 3]  # each goes first in turn
        for n, what in enumerate(order):
            model = repository(work, 3 * i + n, password)
            c.settle()
            if what == "restic":
                times[what].append(restic_seconds(first, model))
            else:
                times[what].append(copy_seconds(first, model, rehash=what == "reread"))
            last[what] = model
        print(f"{i + 1:>5} {times['copy'][-1]:8.2f} {times['reread'][-1]:10.2f} "
              f"{times['restic'][-1]:9.2f}")  # fmt: skip
    changed = change(raw, args.changed_mib, args.extent_mib)
    second = publish(root, vm, 2, raw, when + timedelta(minutes=30))
    ours, theirs = Path(last["copy"].url), Path(last["restic"].url)
    before = tree_bytes(ours), tree_bytes(theirs)
    c.settle()
    copy_seconds(second, last["copy"])
    c.settle()
    restic_seconds(second, last["restic"])
    grown = tree_bytes(ours) - before[0]
    grown_bare = tree_bytes(theirs) - before[1]
    med = {what: statistics.median(values) for what, values in times.items()}
    ratio, reread = med["copy"] / med["restic"], med["reread"] / med["restic"]
    growth, growth_bare = grown / changed, grown_bare / changed
    print(f"median copy {med['copy']:.2f}s, re-reading copy {med['reread']:.2f}s, "
          f"restic {med['restic']:.2f}s; re-reading copy / restic {reread:.2f}")  # fmt: skip
    print(f"second full grew our repository by {grown / c.MiB:.1f} MiB, bare restic's by "
          f"{grown_bare / c.MiB:.1f} MiB, for {changed / c.MiB:.0f} MiB changed")  # fmt: skip
    for name, value in (("ratio_copy_vs_restic", ratio), ("growth_ratio", growth)):
        verdict = "ok" if value <= TARGETS[name] else "MISSED"
        print(f"target {name} <= {TARGETS[name]}: {verdict}")
    print(f"ratio_copy_vs_restic={ratio:.2f} growth_ratio={growth:.2f} "
          f"growth_restic={growth_bare:.2f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
