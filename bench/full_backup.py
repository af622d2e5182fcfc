"""Full backup vs bare ``qemu-img convert``, side by side, in interleaved rounds.

    .venv/bin/python bench/full_backup.py [--size-gib 2] [--rounds 3]
    .venv/bin/python bench/full_backup.py --smoke   # 64 MiB, 1 round, no waiting: does it run?

Builds one qcow2 disk (half random, a quarter text, a quarter hole), gives an identical copy to
two TCG domains (one shut off for ``offline``, one running for ``push``) and, in each round,
times in turn: bare convert of the shut-off disk and the SHA-256 of its output (hashlib, as the
product hashes: together the floor of a verified offline backup), our offline backup, bare
convert ``-U`` of the running disk (for reference), then QEMU's own push backup job of the
running disk started straight through libvirt (the floor of push) and our push backup, in
alternating order.
Backups run in-process through
``requests.request_backup`` + ``jobs.run_backup``, exactly as a worker runs them.

Figures: copy phase from the run journal (first ``copy`` / ``backup-begin`` step to the ``hash``
step), total from ``started_at`` to ``finished_at`` (pre-flight, copy, hashing, metadata,
verify, fsync + publish). Each ratio is against its floor: offline copy / bare convert (median
of both disks), push copy / QEMU's job alone, offline total / (bare convert + SHA-256).
Every read is from a warm page cache (nothing is dropped); no writeback carries over from one
measurement to the next (bare outputs are deleted unflushed, backups fsync their own). See
bench/README.md. The last line is
``ratio_offline=<a> ratio_push_vs_qemu=<b> ratio_total_vs_floor=<c>``; the line above it keeps
the earlier ratios against bare convert alone (``ratio_push=`` and ``ratio_with_verify=``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import _common as c

URI = "qemu:///system"
TARGETS = {"ratio_offline": 1.2, "ratio_push_vs_qemu": 1.15, "ratio_total_vs_floor": 1.15}
SMOKE = {"size_gib": 0.0625, "rounds": 1, "wait_quiet": 0}  # the smallest run (make bench-smoke)
# phases of a run, as (label, journal step or "started"/"finished", next boundary)
OFFLINE_PHASES = (
    ("preflight", "started", "copy"),
    ("copy", "copy", "hash"),
    ("hash+meta", "hash", "verify"),
    ("verify", "verify", "publish"),
    ("publish", "publish", "published"),
    ("finish", "published", "finished"),
)
PUSH_PHASES = (("preflight", "started", "backup-begin"), ("copy", "backup-begin", "hash"))
PUSH_PHASES += OFFLINE_PHASES[2:]


@dataclass
class RunFigures:
    copy: float
    total: float
    phases: dict[str, float]
    bytes_written: int
    job: float | None = None  # push: libvirt's own job time (time_elapsed)
    after_job: float | None = None  # push: job-completed event -> "hash" step (our tail)


@dataclass
class Round:
    bare: float = 0.0
    sha: float = 0.0  # SHA-256 of the bare convert's output, right after it
    sync: float = 0.0  # then sync(2): what making that output durable costs
    bare_u: float = 0.0
    job: float = 0.0  # QEMU's own backup job alone, started straight through libvirt
    offline: RunFigures | None = None
    push: RunFigures | None = None
    cached: dict[str, float | None] = field(default_factory=dict)
    others: dict[str, int] = field(default_factory=dict)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--size-gib", type=float, default=2.0, help="virtual disk size, 2-4 GiB (1/16 to smoke)"
    )
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (>= 1)")
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=60,
        metavar="SECONDS",
        help="wait up to this long for other guests/tests to stop before measuring",
    )
    parser.add_argument("--smoke", action="store_true", help="smallest size, one round")
    args = parser.parse_args(argv)
    if args.smoke:
        vars(args).update(SMOKE)
    if not 0.0625 <= args.size_gib <= 4:
        parser.error("--size-gib must be between 0.0625 and 4 (2 or more for figures)")
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    return args


def say(text: str = "") -> None:
    print(text, flush=True)


def phase_times(run, phases) -> dict[str, float]:
    """Seconds per phase from the journal; 'started'/'finished' are the run's own stamps."""
    marks = {"started": run.started_at, "finished": run.finished_at}
    for entry in run.journal:
        marks.setdefault(entry["step"], c.iso(entry["at"]))
    return {label: (marks[b] - marks[a]).total_seconds() for label, a, b in phases}


class Bench:
    def __init__(self, root: Path, bare_dir: Path, domains, size: int, watch: c.JobWatch, smoke):
        self.smoke = smoke
        self.root = root
        self.bare_dir = bare_dir
        self.domains = domains
        self.size = size
        self.watch = watch
        self.job_dir = c.subdir(root.parent, "job")
        self.job_dir.chmod(0o777)  # QEMU (not root) creates the bare job's target here

    # -- setup -------------------------------------------------------------------------------
    def build(self, work: Path) -> None:
        from backups import inventory
        from backups.models import BackupPolicy, Host, VirtualMachine
        from tests.domains import DiskSpec

        raw = work / "source.raw"
        start = time.perf_counter()
        parts = c.build_raw(raw, self.size)
        say(
            f"disk: {self.size / c.GiB:g} GiB virtual = {parts['random'] // c.MiB} MiB random"
            f" + {parts['text'] // c.MiB} MiB text + {parts['hole'] // c.MiB} MiB hole"
            f" (raw written in {time.perf_counter() - start:.1f} s)"
        )
        size_mib = self.size // c.MiB
        self.doms = {}
        token = work.name.rsplit("-", 1)[-1]
        for role in ("off", "on"):
            dom = self.domains.create(
                [DiskSpec("vda", "qcow2", size_mib)], name=f"vmbench-{token}-{role}"
            )
            disk = dom.disks["vda"]
            c.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(disk)])
            self.doms[role] = dom
        raw.unlink()
        self.domains.lookup(self.doms["on"]).create()
        self.src = {role: dom.disks["vda"] for role, dom in self.doms.items()}
        allocated = self.src["off"].stat().st_blocks * 512
        say(f"source qcow2: {allocated / c.MiB:.0f} MiB allocated ({self.src['off']})")
        host = Host.objects.create(name="bench", uri=URI)
        inventory.sync_host(host)
        self.vms = {
            role: VirtualMachine.objects.get(host=host, uuid=dom.uuid)
            for role, dom in self.doms.items()
        }
        if self.vms["on"].state != "running" or self.vms["off"].state != "shutoff":
            raise RuntimeError(f"unexpected domain states: {self.vms}")
        self.policy = BackupPolicy.objects.create(
            name="bench-verify", method="offline", verify_after=True
        )
        for path in self.src.values():
            c.read_through(path)  # warm the cache once; nothing is ever dropped
        c.settle()
        if not self.smoke:
            busy = c.cpu_busy(2.0)
            say(f"CPU busy with our idle guest running, before measuring: {100 * busy:.0f}%")
        # Untimed, right before round 1: after an idle pause the first convert runs slow
        # (memory freed a while ago has been handed back to the host; see README).
        self.bare("off", "warmup")

    def names(self) -> tuple[str, ...]:
        return tuple(f"guest={dom.name}," for dom in self.doms.values())

    # -- measurements ------------------------------------------------------------------------
    def bare(self, role: str, tag: str) -> float:
        return self.bare_hashed(role, tag, hash_it=False)[0]

    def bare_hashed(self, role: str, tag: str, hash_it: bool = True) -> tuple[float, float, float]:
        """Seconds of a bare convert, then of SHA-256 over its fresh output and of a sync
        that makes it durable (both 0 if not asked)."""
        out = self.bare_dir / f"{tag}-{role}.qcow2"
        share = ["-U"] if role == "on" else []
        argv = ["qemu-img", "convert", *share, "-f", "qcow2", "-O", "qcow2"]
        seconds = c.timed([*argv, str(self.src[role]), str(out)])
        hashed = synced = 0.0
        if hash_it:
            start = time.perf_counter()
            c.sha256_file(out)
            hashed = time.perf_counter() - start
            start = time.perf_counter()
            os.sync()
            synced = time.perf_counter() - start
        out.unlink()
        return seconds, hashed, synced

    def qemu_job(self, tag: str) -> float:
        """The physical floor of push: libvirt's push backup of the running disk into a new
        qcow2, nothing of ours around it (no checkpoint, no runner), until the job ends."""
        from backups import domain_xml

        out = self.job_dir / f"{tag}.qcow2"
        dom = self.domains.lookup(self.doms["on"])
        uuid = self.doms["on"].uuid
        self.watch.events.pop(uuid, None)
        start = time.perf_counter()
        dom.backupBegin(domain_xml.backup_xml({"vda": str(out)}, ("vda",), None, ()), None, 0)
        event = self.watch.pop(uuid, wait=600)
        seconds = time.perf_counter() - start
        while dom.jobInfo()[0] != 0:  # VIR_DOMAIN_JOB_NONE: the job is gone
            time.sleep(0.05)
        out.unlink()
        if event is None:
            raise RuntimeError("the bare QEMU backup job sent no job-completed event")
        return seconds

    def backup(self, role: str, method: str, policy) -> RunFigures:
        from backups import jobs, requests
        from backups.models import RunStatus, Trigger

        vm = self.vms[role]
        run = requests.request_backup(
            vm, method=method, trigger=Trigger.COMMAND, policy=policy, enqueue=False
        )
        self.watch.events.pop(str(vm.uuid), None)
        outcome = jobs.run_backup(run.pk)
        run.refresh_from_db()
        if run.status != RunStatus.SUCCEEDED:
            raise RuntimeError(f"{method} backup failed: {outcome}; {run.error}")
        first = "copy" if method == "offline" else "backup-begin"
        phases = phase_times(run, OFFLINE_PHASES if method == "offline" else PUSH_PHASES)
        figures = RunFigures(
            copy=c.span(run.journal, first, "hash"),
            total=(run.finished_at - run.started_at).total_seconds(),
            phases=phases,
            bytes_written=run.bytes_written,
        )
        event = self.watch.pop(str(vm.uuid)) if method == "push" else None
        if event is not None:
            figures.job = event[1]
            figures.after_job = (c.first_step(run.journal, "hash") - event[0]).total_seconds()
        published = Path(run.backup.path)
        if published.parent.parent != self.root:
            raise RuntimeError(f"backup published outside the bench root: {published}")
        shutil.rmtree(published)
        return figures

    def round(self, number: int) -> Round:
        r = Round()
        r.cached = {role: c.cached_fraction(path) for role, path in self.src.items()}
        r.others = c.foreign_activity(self.names())
        r.bare, r.sha, r.sync = self.bare_hashed("off", f"r{number}")
        r.offline = self.backup("off", "offline", self.policy)
        r.bare_u = self.bare("on", f"r{number}")
        # QEMU's job alone and our push, in alternating order: whichever of the two runs
        # first after the converts tends to be the slower one
        if number % 2:
            r.job = self.qemu_job(f"r{number}")
            r.push = self.backup("on", "push", None)
        else:
            r.push = self.backup("on", "push", None)
            r.job = self.qemu_job(f"r{number}")
        return r


# -- reporting -------------------------------------------------------------------------------
COLUMNS = (
    ("bare", "bare", 6),
    ("sha", "sha256", 6),
    ("floor", "floor", 6),
    ("bare_u", "bare-U", 6),
    ("job", "qemu.job", 8),
    ("off_copy", "off.copy", 8),
    ("off_total", "off.total", 9),
    ("push_copy", "push.copy", 9),
    ("push_total", "push.tot", 8),
)
# (numerator, title, width, denominator: "bare" is the median of the bare converts)
RATIOS = (
    ("off_copy", "r.off", 5, "bare"),
    ("push_copy", "r.p/job", 7, "job"),
    ("off_total", "r.floor", 7, "floor"),
)
HEADER = " ".join(
    [f"{'round':>5} {'cache':>5} {'others':>6}"]
    + [f"{title:>{width}}" for _key, title, width in COLUMNS]
    + ["|"]
    + [f"{title:>{width}}" for _key, title, width, _den in RATIOS]
)


def row(label: str, bare: float, r: dict[str, float], cache: str = "", others: str = "") -> str:
    """One line of seconds; ratios against their floors, `bare` being the round's or the
    pooled median of the bare converts."""
    floors = {**r, "bare": bare}
    return " ".join(
        [f"{label:>5} {cache:>5} {others:>6}"]
        + [f"{r[key]:{width}.2f}" for key, _title, width in COLUMNS]
        + ["|"]
        + [f"{r[key] / floors[den]:{width}.2f}" for key, _title, width, den in RATIOS]
    )


def figures(r: Round) -> dict[str, float]:
    return {
        "bare": r.bare,
        "sha": r.sha,
        "floor": r.bare + r.sha,
        "durable": r.bare + r.sha + r.sync,
        "bare_u": r.bare_u,
        "job": r.job,
        "off_copy": r.offline.copy,
        "off_total": r.offline.total,
        "push_copy": r.push.copy,
        "push_total": r.push.total,
    }


def cache_label(cached: dict[str, float | None]) -> str:
    values = [v for v in cached.values() if v is not None]
    return "n/a" if not values else f"{100 * min(values):.0f}%"


def report_round(number: int, r: Round) -> None:
    others = f"{r.others['qemu']}q{r.others['pytest']}p"
    say(row(str(number), c.median([r.bare, r.bare_u]), figures(r), cache_label(r.cached), others))


def phase_line(name: str, runs: list[RunFigures]) -> str:
    labels = list(runs[0].phases)
    parts = [f"{label} {c.median([f.phases[label] for f in runs]):.2f}" for label in labels]
    return f"  {name:<8} " + ", ".join(parts)


def spread(values: list[float]) -> str:
    return f"{min(values):.2f} / {c.median(values):.2f} / {max(values):.2f}"


def report(rounds: list[Round], size: int, elapsed: float) -> None:
    per_round = [figures(r) for r in rounds]
    med = {key: c.median([f[key] for f in per_round]) for key in per_round[0]}
    bare_samples = [r.bare for r in rounds] + [r.bare_u for r in rounds]
    bare = c.median(bare_samples)
    say()
    say(HEADER)
    say(row("med", bare, med))
    say()
    say("spread, min / median / max (s):")
    say(f"  bare convert (both disks, {len(bare_samples)} samples): {spread(bare_samples)}")
    for key, label in (("off_copy", "offline copy"), ("push_copy", "push copy")):
        say(f"  {label}: {spread([f[key] for f in per_round])}")
    say(f"  offline total: {spread([f['off_total'] for f in per_round])}")
    say(
        f"  floor (bare convert + SHA-256 of its output): {spread([f['floor'] for f in per_round])}"
    )
    say(
        "  durable floor (the same + sync of its output: the backup fsyncs its own):"
        f" {spread([f['durable'] for f in per_round])}"
    )
    say(f"  QEMU's backup job alone: {spread([f['job'] for f in per_round])}")
    say("phases of a run (journal, medians, s):")
    say(phase_line("offline", [r.offline for r in rounds]))
    say(phase_line("push", [r.push for r in rounds]))
    say(
        f"push copy vs QEMU's backup job alone (same rounds): {med['push_copy'] / med['job']:.2f}x"
        f" (QEMU job alone {med['job']:.2f} s = {med['job'] / bare:.2f}x bare convert)"
    )
    jobs = [r.push for r in rounds if r.push.job is not None]
    if jobs:
        job = c.median([f.job for f in jobs])
        tail = c.median([f.after_job for f in jobs])
        say(
            f"  push copy = libvirt/QEMU job {job:.2f} ({job / bare:.2f}x bare)"
            f" + job end -> 'hash' step {tail:.2f} (runner: job stats, chown)"
        )
    written, pushed = rounds[-1].offline.bytes_written, rounds[-1].push.bytes_written
    say(
        f"images: offline {written / c.MiB:.0f} MiB, push {pushed / c.MiB:.0f} MiB;"
        f" bare convert ran at {written / c.MiB / bare:.0f} MiB/s (median);"
        f" push copy vs bare -U alone {med['push_copy'] / med['bare_u']:.2f}x,"
        f" offline copy vs bare alone {med['off_copy'] / med['bare']:.2f}x"
    )
    say(
        "cache: every run read its source from a warm page cache (nothing dropped; 'cache' is"
        " the resident share of the sources before each round). Outputs go to the page cache;"
        " the backup runs fsync theirs (publish), bare convert does not."
    )
    best = {key: min(f[key] for f in per_round) for key in per_round[0]}
    best_bare = min(bare_samples)
    say(
        "ratios of minimums (least disturbed samples; noise only ever adds time):"
        f" offline {best['off_copy'] / best_bare:.2f}, push {best['push_copy'] / best_bare:.2f},"
        f" with verify {best['off_total'] / best_bare:.2f}; push vs QEMU's job"
        f" {best['push_copy'] / best['job']:.2f}, total vs floor"
        f" {best['off_total'] / best['floor']:.2f}"
    )
    say(
        "offline total vs the durable floor (bare + SHA-256 + sync):"
        f" {med['off_total'] / med['durable']:.2f} (medians),"
        f" {best['off_total'] / best['durable']:.2f} (minimums)"
    )
    say(
        "against bare convert alone (the earlier targets):"
        f" ratio_push={med['push_copy'] / bare:.2f} ratio_with_verify={med['off_total'] / bare:.2f}"
    )
    ratios = {
        "ratio_offline": med["off_copy"] / bare,
        "ratio_push_vs_qemu": med["push_copy"] / med["job"],
        "ratio_total_vs_floor": med["off_total"] / med["floor"],
    }
    verdict = ", ".join(
        f"{name} {value:.2f} {'<=' if value <= TARGETS[name] else '>'} {TARGETS[name]}"
        for name, value in ratios.items()
    )
    busy = [r for r in rounds if any(r.others.values())]
    if busy:
        say(
            f"WARNING: other guests/test runs were active in {len(busy)} of {len(rounds)} rounds"
            " ('others': q = foreign QEMU processes, p = pytest processes): figures are noisy"
        )
    say(f"targets: {verdict}")
    say(f"{len(rounds)} rounds, {size / c.GiB:g} GiB disk, {elapsed:.0f} s in all")
    say(" ".join(f"{name}={value:.2f}" for name, value in ratios.items()))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    size = int(args.size_gib * c.GiB) // (4 * c.CHUNK) * (4 * c.CHUNK)
    started = time.perf_counter()
    work = c.bench_dir()
    scratch = c.scratch_dir()
    domains = watch = None
    rounds: list[Round] = []
    try:
        with c.interrupts_as_keyboard():
            c.setup_django(scratch)
            from django.conf import settings

            from tests import domains as domains_mod

            domains_mod.BASE = work  # domain dirs live in our scratch dir, not the tests'
            root = c.subdir(work, "root")
            settings.VMBACKUP_ROOT = str(root)
            domains = domains_mod.Domains(URI)
            if not args.smoke:
                c.wait_quiet(args.wait_quiet)
            watch = c.JobWatch(URI)
            bench = Bench(root, c.subdir(work, "bare"), domains, size, watch, args.smoke)
            bench.build(work)
            say(
                f"backup root {root}; {args.rounds} rounds: bare, offline, bare -U, QEMU job + push"
            )
            say(HEADER)
            for number in range(1, args.rounds + 1):
                rounds.append(bench.round(number))
                report_round(number, rounds[-1])
    except KeyboardInterrupt:
        print("interrupted: cleaning up", file=sys.stderr)
        return 130
    finally:
        with c.uninterruptible():
            cleanup(domains, watch, work, scratch)
    report(rounds, size, time.perf_counter() - started)
    return 0


def cleanup(domains, watch: c.JobWatch | None, work: Path, scratch: Path) -> None:
    """Domains (destroyed, undefined, their dirs removed), backups, bare outputs, database."""
    if watch is not None:
        try:
            watch.close()
        except Exception as exc:
            print(f"cleanup: closing the event connection failed: {exc}", file=sys.stderr)
    if domains is not None:
        try:
            domains.close()
        except Exception as exc:  # keep going: the directories must still go
            print(f"cleanup: removing domains failed: {exc}", file=sys.stderr)
    c.close_django()
    shutil.rmtree(work, ignore_errors=True)
    shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
