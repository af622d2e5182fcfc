"""What the user-facing commands cost around the job they run: start-up, and the wait after
the result is recorded.

    .venv/bin/python bench/cli.py [--size-mib 512] [--rounds 5] [--changed-mib 32]
                                  [--keep-last N] [--verbose] [--profile DIR]
    .venv/bin/python bench/cli.py --smoke   # 64 MiB, 1 round, 4 MiB: does it still run?

A running TCG domain with one qcow2 disk (half random, a quarter text, a quarter hole) under
one policy (keeping everything, or the last ``--keep-last``: then from the third round on
every run's tidy-up folds its oldest full into the next incremental). After one untimed full,
each round runs, as subprocesses timed from start to exit (CPU from the kernel's accounting
of the reaped command and the children it waited for):

- **import**: ``manage.py vmbackup_run --help`` (Python, Django set-up, the command's imports);
- **run**: ``--changed-mib`` MiB written into the guest, then ``manage.py vmbackup_run VM
  --wait`` (an incremental); from the run's journal: start-up (process start to the claim),
  the run (claim to ``published``, when the backup is recorded), then to the last line on
  stdout and to the exit (no worker cluster runs here, so the command tidies up itself
  after its last line); run overhead = wall - the run;
- **restore**: ``manage.py vmbackup_restore <newest> --name N --root R --wait``; overhead =
  wall - the restore's own start-to-end on its row; then ``sh restore.sh DEST``.

Subprocesses keep their bytecode (``PYTHONPYCACHEPREFIX`` in the scratch dir, written once
before the rounds), as an installed copy has it; with ``PYTHONDONTWRITEBYTECODE`` set, every
start would compile the project again. Last line: ``import_ms=<a> run_overhead_ms=<b>
restore_overhead_ms=<c>`` (medians). ``--profile DIR`` runs each command under cProfile
(the figures then mean little); ``--verbose`` prints each journal step's offset.
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import _common as c

URI = "qemu:///system"
SMOKE = {"size_mib": 64, "rounds": 1, "changed_mib": 4}
TIMEOUT = 900


@dataclass
class Sample:
    start: float  # time.time() at spawn
    wall: float  # spawn to exit
    last_line: float  # spawn to the last line on stdout
    cpu: float  # user + system of the command and the children it waited for
    out: str


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--changed-mib", type=int, default=32)
    parser.add_argument("--keep-last", type=int, default=0, help="the policy's keep-last")
    parser.add_argument("--verbose", action="store_true", help="each journal step's offset")
    parser.add_argument("--profile", type=Path, help="write cProfile output of each command here")
    parser.add_argument("--smoke", action="store_true", help="smallest size, one round")
    args = parser.parse_args(argv)
    if args.smoke:
        vars(args).update(SMOKE)
    if (args.size_mib * c.MiB) % (4 * c.CHUNK) or args.rounds < 1:
        parser.error(f"--size-mib: a multiple of {4 * c.CHUNK // c.MiB}; --rounds >= 1")
    if not 1 <= args.changed_mib <= args.size_mib * 3 // 4:
        parser.error("--changed-mib must fit in 3/4 of the disk")
    return args


_reaped = [0.0]


def _child_cpu() -> float:
    """CPU of the children reaped since the last call."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    total = usage.ru_utime + usage.ru_stime
    spent, _reaped[0] = total - _reaped[0], total
    return spent


def measure(argv: list[str], env: dict) -> Sample:
    """Run one command to its exit, noting when each line of its output arrived."""
    _child_cpu()  # forget children reaped by anything else (qemu-img, sync)
    start, t0 = time.time(), time.perf_counter()
    proc = subprocess.Popen(
        argv, cwd=c.PROJECT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    timer = threading.Timer(TIMEOUT, proc.kill)
    timer.start()
    lines, last = [], 0.0
    try:
        for line in proc.stdout:
            lines.append(line.decode(errors="replace"))
            last = time.perf_counter() - t0
        proc.wait()
    except BaseException:
        proc.terminate()  # ours undoes its work on TERM
        proc.wait(timeout=60)
        raise
    finally:
        timer.cancel()
    wall = time.perf_counter() - t0
    out = "".join(lines)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[-6:])} exited {proc.returncode}:\n{out[-3000:]}")
    return Sample(start, wall, last, _child_cpu(), out)


class Commands:
    """``manage.py`` as a user runs it, with bytecode kept as an installed copy keeps it."""

    def __init__(self, scratch: Path, profile: Path | None):
        self.env = c.installed_env(scratch)
        self.profile, self.count = profile, 0

    def run(self, *args: str, tag: str = "") -> Sample:
        argv = [sys.executable, "manage.py", *args]
        if self.profile is not None and tag:
            self.count += 1
            out = self.profile / f"{self.count:02d}-{tag}.prof"
            argv[1:1] = ["-m", "cProfile", "-o", str(out)]
        return measure(argv, self.env)


def at(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


def secs(a: datetime, b: datetime) -> float:
    return (b - a).total_seconds()


def steps(spawn: datetime, journal: list[dict], finished: datetime) -> None:
    """Each journal step's offset from the command's start (``--verbose``)."""
    marks = [f"{e['step']}+{secs(spawn, c.iso(e['at'])):.2f}" for e in journal]
    print("       " + ", ".join([*marks, f"finished+{secs(spawn, finished):.2f}"]))


def build(work: Path, domains, args):
    from backups import inventory
    from backups.models import BackupPolicy, Host, VirtualMachine
    from tests.domains import DiskSpec

    raw = work / "seed.raw"
    c.build_raw(raw, args.size_mib * c.MiB)
    dom = domains.create([DiskSpec("vda", "qcow2", args.size_mib)], name=f"vmbench-{work.name}")
    c.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(dom.disks["vda"])])
    raw.unlink()
    domains.lookup(dom).create()
    host = Host.objects.create(name="bench", uri=URI)
    inventory.sync_host(host)
    vm = VirtualMachine.objects.get(uuid=dom.uuid)
    keep = {f: 0 for f in BackupPolicy.KEEP_FIELDS} | {"keep_last": args.keep_last}
    # full_every: no full forced; with --keep-last the tidy-up's folds keep the chain short
    policy = BackupPolicy.objects.create(name="cli", schedule="", full_every=1000, **keep)
    policy.vms.add(vm)
    return dom, vm


def write(domains, dom, args, seed: int) -> None:
    from tests.domains import guest_write

    rng = random.Random(seed)
    for i, offset in enumerate(rng.sample(range(args.size_mib * 3 // 4), args.changed_mib)):
        guest_write(domains.conn, dom.uuid, 0, f"write -P {(seed * 7 + i) % 251 + 1} {offset}M 1M")
    guest_write(domains.conn, dom.uuid, 0, "flush")


def one_round(number: int, args, work: Path, commands: Commands, domains, dom, vm) -> dict:
    from django.db import connections

    from backups.models import BackupRun, Restore
    from tests.domains import remove_domain

    imp = commands.run("vmbackup_run", "--help", tag="help")
    write(domains, dom, args, seed=number)
    c.settle()
    connections.close_all()  # the command writes the same SQLite file
    cmd = commands.run("vmbackup_run", vm.name, "--wait", tag="run")
    run = BackupRun.objects.filter(vm=vm).latest("pk")
    if run.kind != "incremental":
        raise RuntimeError(f"expected an incremental: {run.kind_reason}")
    spawn, published = at(cmd.start), c.first_step(run.journal, "published")
    job = secs(run.started_at, published)
    newest = Path(cmd.out.strip().splitlines()[-1])
    name = f"vmbench-{work.name}-r{number}"
    restored = Path(os.environ["VMBACKUP_RESTORE_ROOTS"])
    connections.close_all()
    argv = ["vmbackup_restore", str(newest), "--name", name, "--root", str(restored), "--wait"]
    res = commands.run(*argv, tag="restore")
    restore = Restore.objects.latest("pk")
    restore_job = secs(restore.started_at, restore.finished_at)
    sh = measure(["sh", str(newest / "restore.sh"), str(work / "sh")], dict(os.environ))
    remove_domain(domains.conn, restore.domain_uuid)
    shutil.rmtree(restored / name, ignore_errors=True)
    shutil.rmtree(work / "sh", ignore_errors=True)
    if args.verbose:
        steps(spawn, run.journal, run.finished_at)
        steps(at(res.start), restore.journal, restore.finished_at)
    return {
        "import": imp.wall, "import_cpu": imp.cpu, "run_wall": cmd.wall, "run_cpu": cmd.cpu,
        "startup": secs(spawn, run.started_at), "job": job,
        "to_line": secs(published, at(cmd.start + cmd.last_line)),
        "to_exit": cmd.wall - cmd.last_line, "run_overhead": cmd.wall - job,
        "restore_wall": res.wall, "restore_cpu": res.cpu, "restore_job": restore_job,
        "restore_overhead": res.wall - restore_job, "sh_wall": sh.wall, "sh_cpu": sh.cpu,
    }  # fmt: skip


ROW = (
    "{n:>5} {import:6.3f} {import_cpu:5.2f} | {run_wall:6.3f} {run_cpu:5.2f} {startup:6.3f}"
    " {job:6.3f} {to_line:6.3f} {to_exit:6.3f} | {restore_wall:6.3f} {restore_cpu:5.2f}"
    " {restore_job:6.3f} | {sh_wall:6.3f} {sh_cpu:5.2f}"
)
HEAD = (
    "round import   cpu |    run   cpu  start    job  +line  +exit |"
    " restore  cpu    job | restore.sh cpu"
)


def rounds(args, work: Path, scratch: Path, domains) -> dict[str, list[float]]:
    from django.db import connections

    commands = Commands(scratch, args.profile)
    dom, vm = build(work, domains, args)
    commands.run("vmbackup_run", "--help")  # writes the bytecode once
    connections.close_all()
    commands.run("vmbackup_run", vm.name, "--wait")  # the first full, untimed
    figures: dict[str, list[float]] = {}
    print(HEAD, flush=True)
    for number in range(1, args.rounds + 1):
        row = one_round(number, args, work, commands, domains, dom, vm)
        print(ROW.format(n=number, **row), flush=True)
        for key, value in row.items():
            figures.setdefault(key, []).append(value)
    return figures


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.profile is not None:
        args.profile.mkdir(parents=True, exist_ok=True)
    work, scratch = c.bench_dir(), c.scratch_dir()
    domains = None
    try:
        with c.interrupts_as_keyboard():
            os.environ["VMBACKUP_ROOT"] = str(c.subdir(work, "root"))
            os.environ["VMBACKUP_RESTORE_ROOTS"] = str(c.subdir(work, "restored"))
            for name in ("VMBACKUP_ROOTS", "VMBACKUP_NBD_DIR", "VMBACKUP_OVERLAY_DIR"):
                os.environ.pop(name, None)
            c.setup_django(scratch)
            from tests import domains as domains_mod

            domains_mod.BASE = work  # domain dirs live in our scratch dir, not the tests'
            domains = domains_mod.Domains(URI)
            figures = rounds(args, work, scratch, domains)
    except KeyboardInterrupt:
        print("interrupted: cleaning up", file=sys.stderr)
        return 130
    finally:
        with c.uninterruptible():
            if domains is not None:
                domains.close()
            c.close_django()
            shutil.rmtree(work, ignore_errors=True)
            shutil.rmtree(scratch, ignore_errors=True)
    m = {k: c.median(v) for k, v in figures.items()}
    print(
        f"medians (s): import {m['import']:.3f} ({m['import_cpu']:.2f} cpu);"
        f" vmbackup_run --wait {m['run_wall']:.3f} ({m['run_cpu']:.2f} cpu) = start-up"
        f" {m['startup']:.3f} + run {m['job']:.3f} + to the last line {m['to_line']:.3f}"
        f" + to the exit {m['to_exit']:.3f}; vmbackup_restore --wait {m['restore_wall']:.3f}"
        f" ({m['restore_cpu']:.2f} cpu), the restore itself {m['restore_job']:.3f};"
        f" restore.sh {m['sh_wall']:.3f} ({m['sh_cpu']:.2f} cpu)"
    )
    print(
        f"import_ms={1000 * m['import']:.0f} run_overhead_ms={1000 * m['run_overhead']:.0f}"
        f" restore_overhead_ms={1000 * m['restore_overhead']:.0f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
