"""Incremental push backup vs full push backup of the same running disk, side by side.

    .venv/bin/python bench/incremental.py [--size-gib 2] [--rounds 3] [--changed-mib 100]
    .venv/bin/python bench/incremental.py --smoke   # 64 MiB, 1 round, 4 MiB: does it run?

Builds a qcow2 disk (half random, a quarter text, a quarter hole) for a running TCG domain.
Both backups of a round are made under one policy with ``full_every=1`` (chains never cross
policies), so its backups alternate full, incremental, full...: each round takes a full push
backup, writes ``--changed-mib`` MiB into the running guest's disk (1 MiB writes at spread
offsets, through QEMU's own block layer with HMP ``qemu-io``), then an incremental push
backup on top of that full. Wall time is the run's ``started_at`` to
``finished_at`` (pre-flight, copy, hash, verify, publish: everything a user waits for); size is
the incremental's image file. The last line is ``ratio_time=<x> ratio_size_to_changed=<y>``
(incremental time / full time; incremental image bytes / bytes changed).
Targets: ratio_time <= 0.10, ratio_size_to_changed <= 1.1.
"""

from __future__ import annotations

import argparse
import random
import shutil
import statistics
import sys
from pathlib import Path

import _common as c

TARGETS = {"ratio_time": 0.10, "ratio_size_to_changed": 1.1}
SMOKE = {"size_gib": 0.0625, "rounds": 1, "changed_mib": 4}  # the smallest run (make bench-smoke)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-gib", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--changed-mib", type=int, default=100)
    parser.add_argument("--verbose", action="store_true", help="print each step's offset")
    parser.add_argument("--smoke", action="store_true", help="smallest size, one round")
    args = parser.parse_args(argv)
    if args.smoke:
        vars(args).update(SMOKE)
    size = int(args.size_gib * c.GiB)
    if size <= 0 or size % (4 * c.CHUNK):
        parser.error(f"--size-gib must be a positive multiple of {4 * c.CHUNK // c.MiB} MiB")
    if not 1 <= args.changed_mib <= size * 3 // 4 // c.MiB or args.rounds < 1:
        parser.error("--changed-mib must fit in 3/4 of the disk; --rounds must be >= 1")
    scratch, work = c.scratch_dir(), c.bench_dir()
    domains = None
    try:
        with c.interrupts_as_keyboard():
            c.setup_django(scratch)
            c.project_on_path()
            from tests import domains as domains_mod

            domains_mod.BASE = work  # domain dirs live in our scratch dir, not the tests'
            domains = domains_mod.Domains()
            return run_rounds(args, work, domains)
    finally:
        with c.uninterruptible():
            if domains is not None:
                domains.close()
            c.close_django()
            shutil.rmtree(scratch, ignore_errors=True)
            shutil.rmtree(work, ignore_errors=True)


def build_domain(domains, work: Path, size: int):
    from tests.domains import domain_xml

    raw = work / "seed.raw"
    c.build_raw(raw, size)
    disk = c.subdir(work, "disk") / "vda.qcow2"
    c.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(disk)])
    raw.unlink()
    dom = domains.create([], start=False)
    xml = domain_xml(dom.name, dom.uuid, {"vda": (disk, "qcow2")})
    domains.lookup(dom).undefine()
    domains.conn.defineXML(xml).create()
    dom.disks["vda"], dom.formats["vda"] = disk, "qcow2"
    return dom


def backup(vm, policy):
    from backups import jobs, requests

    run = requests.request_backup(vm, method="push", enqueue=False, policy=policy)
    jobs.run_backup(run.pk)
    run.refresh_from_db()
    if run.status != "succeeded":
        raise RuntimeError(f"run {run.pk} {run.status}: {run.error}")
    return run


def change(domains, dom, size: int, mib: int, seed: int) -> int:
    """Write ``mib`` 1 MiB blocks at distinct random offsets of the first 3/4 of the disk."""
    from tests.domains import guest_write

    rng = random.Random(seed)
    offsets = rng.sample(range(size * 3 // 4 // c.MiB), mib)
    for i, offset in enumerate(offsets):
        guest_write(domains.conn, dom.uuid, 0, f"write -P {(seed * 7 + i) % 251 + 1} {offset}M 1M")
    guest_write(domains.conn, dom.uuid, 0, "flush")
    return mib * c.MiB


def run_rounds(args, work: Path, domains) -> int:
    from django.conf import settings

    from backups import inventory
    from backups.models import BackupPolicy, Host, VirtualMachine

    size = int(args.size_gib * c.GiB)
    root = c.subdir(work, "root")
    settings.VMBACKUP_ROOT = str(root)
    dom = build_domain(domains, work, size)
    host = Host.objects.create(name="bench", uri="qemu:///system")
    inventory.sync_host(host)
    vm = VirtualMachine.objects.get(uuid=dom.uuid)
    keep_all = {"keep_last": 0, "keep_daily": 0, "keep_weekly": 0, "keep_monthly": 0}
    # One policy: an incremental's parent is the newest backup under the same policy.
    # full_every=1 makes every second backup a full again (full, incremental, full, ...).
    policy = BackupPolicy.objects.create(name="bench", schedule="", full_every=1, **keep_all)
    fulls, incs, sizes, changed_bytes = [], [], [], 0
    print(f"disk {args.size_gib:g} GiB, {args.changed_mib} MiB changed per round")
    print(f"{'round':>5} {'full s':>8} {'inc s':>8} {'inc MiB':>9} {'kind':>12}")
    for i in range(args.rounds):
        c.settle()
        full = backup(vm, policy)
        if full.kind != "full":
            raise RuntimeError(f"expected a full, got an incremental: {full.kind_reason}")
        changed_bytes = change(domains, dom, size, args.changed_mib, seed=i)
        c.settle()
        inc = backup(vm, policy)
        if inc.kind != "incremental":
            raise RuntimeError(f"expected an incremental, got a full: {inc.kind_reason}")
        image = Path(inc.backup.path) / "vda.qcow2"
        fulls.append((full.finished_at - full.started_at).total_seconds())
        incs.append((inc.finished_at - inc.started_at).total_seconds())
        sizes.append(image.stat().st_size)
        print(
            f"{i + 1:>5} {fulls[-1]:8.2f} {incs[-1]:8.2f} {sizes[-1] / c.MiB:9.1f} {inc.kind:>12}"
        )
        if args.verbose:
            t0 = inc.started_at
            print("      " + ", ".join(
                f"{e['step']}+{(c.iso(e['at']) - t0).total_seconds():.2f}" for e in inc.journal
            ) + f", finished+{(inc.finished_at - t0).total_seconds():.2f}")  # fmt: skip
        for run in (full, inc):  # keep disk use bounded; the DB rows stay for the next round
            shutil.rmtree(run.backup.path, ignore_errors=True)
    ratio_time = statistics.median(incs) / statistics.median(fulls)
    ratio_size = statistics.median(sizes) / changed_bytes
    full_s, inc_s, inc_mib = (
        statistics.median(fulls),
        statistics.median(incs),
        statistics.median(sizes) / c.MiB,
    )
    print(f"median full {full_s:.2f}s, incremental {inc_s:.2f}s, "
          f"{inc_mib:.1f} MiB for {changed_bytes / c.MiB:.0f} MiB changed")  # fmt: skip
    for name, value in (("ratio_time", ratio_time), ("ratio_size_to_changed", ratio_size)):
        verdict = "ok" if value <= TARGETS[name] else "MISSED"
        print(f"target {name} <= {TARGETS[name]}: {verdict}")
    print(f"ratio_time={ratio_time:.2f} ratio_size_to_changed={ratio_size:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
