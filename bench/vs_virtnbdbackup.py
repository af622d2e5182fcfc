"""vmbackup vs virtnbdbackup, side by side: the whole commands a user runs, interleaved.

    .venv/bin/python bench/vs_virtnbdbackup.py [--size-gib 2] [--rounds 3] [--changed-mib 100]
    .venv/bin/python bench/vs_virtnbdbackup.py --smoke   # 64 MiB, 1 round, 4 MiB: does it run?

Needs Debian's ``virtnbdbackup`` package (``scripts/setup-host.sh --test`` installs it; this
script installs nothing), libvirtd and root. Builds one qcow2 disk (half random, a quarter
text, a quarter hole) and gives an identical copy to two running TCG domains, one per tool, so
neither sees the other's checkpoints. Each round times, for both tools, in alternating order
(A B, B A, A B, B A, and the other way round in the next round):

- **full compressed**: ``manage.py vmbackup_run VM --wait`` under a policy with zstd
  compression (nothing else configured: ours pulls a full over NBD through its default socket
  directory, qemu-img compressing) vs ``virtnbdbackup -l full -z`` (lz4);
- **full**: ``vmbackup_run`` under a plain policy vs ``virtnbdbackup -l full``;
- **incremental** after the same ``--changed-mib`` MiB written into both guests (1 MiB writes
  at the same offsets with the same patterns, through QEMU's block layer with HMP ``qemu-io``):
  ``vmbackup_run`` under the plain policy again vs ``virtnbdbackup -l inc``;
- **restore** of that newest point: ``manage.py vmbackup_restore <inc> --name N --wait`` (and,
  timed apart, the backup's own ``sh restore.sh DEST``) vs ``virtnbdrestore -c -D -N N``; both
  commands define a new domain, ``restore.sh`` only writes the disks.

Every command runs as a subprocess against the bench's throwaway SQLite database, timed from
start to exit; then ``sync`` is timed apart (ours fsyncs before it reports success,
virtnbdbackup does not), and the ratios compare command + sync. CPU is the command's own
(user + system, with its children), QEMU's is the guest process's meanwhile (a push backup
copies inside QEMU, a pull backup in the tool); peak memory is the command's maximum RSS
(wait4). Each restored disk is compared (``qemu-img compare``) with a reference copy of its
guest's disk taken right after the writes with the guest paused. The last line is
``vs_full=<r> vs_full_compressed=<r> vs_inc=<r> vs_restore=<r> identical=<k>/<n>``, each ratio
ours / theirs (lower is better).

Each round also times the **floors** of our steps, with no tool around them, on our guest's
disk and our backups (``--no-floors`` skips them): a full = ``qemu-img convert -U`` of the
running disk + SHA-256 of the output + ``sync`` (what any full that is verified and durable
must do; compressed: the same convert with ``-c -W``, zstd); a restore = ``qemu-img
convert -t none`` (around the page cache, as ours writes a restored disk) flattening our
incremental chain + ``sync`` beside SHA-256 of the chain's files (overlapped: the longer of
the two counts, as ours overlaps them); an incremental = the start
of a Django management command (``manage.py vmbackup_run --help``). Printed beside each
ratio: ``floor / theirs``, the best ratio a verified, durable implementation of that step
could reach here. See bench/README.md.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import _common as c

URI = "qemu:///system"
TARGETS = {"vs_full": 0.5, "vs_full_compressed": 0.8, "vs_inc": 0.5, "vs_restore": 0.5}
SMOKE = {"size_gib": 0.0625, "rounds": 1, "changed_mib": 4, "wait_quiet": 0}
# (step, title, last-line key); the order of a round
STEPS = (
    ("full_z", "full compressed", "vs_full_compressed"),
    ("full", "full", "vs_full"),
    ("inc", "incremental", "vs_inc"),
    ("restore", "restore", "vs_restore"),
)
TOOLS = ("ours", "theirs")
TIMEOUT = 1800


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-gib", type=float, default=2.0, help="virtual disk size (GiB)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (>= 1)")
    parser.add_argument("--changed-mib", type=int, default=100, help="written before the inc")
    parser.add_argument("--wait-quiet", type=float, default=60, metavar="SECONDS")
    parser.add_argument("--smoke", action="store_true", help="smallest size, one round")
    parser.add_argument("--verbose", action="store_true", help="our runs' journal steps")
    parser.add_argument("--no-floors", dest="floors", action="store_false", help="skip them")
    args = parser.parse_args(argv)
    if args.smoke:
        vars(args).update(SMOKE)
    if not 0.0625 <= args.size_gib <= 8:
        parser.error("--size-gib must be between 0.0625 and 8 (2 or more for figures)")
    size = int(args.size_gib * c.GiB)
    if size % (4 * c.CHUNK):
        parser.error(f"--size-gib must be a multiple of {4 * c.CHUNK // c.MiB} MiB")
    if not 1 <= args.changed_mib <= size * 3 // 4 // c.MiB or args.rounds < 1:
        parser.error("--changed-mib must fit in 3/4 of the disk; --rounds must be >= 1")
    args.size = size
    return args


def say(text: str = "") -> None:
    print(text, flush=True)


@dataclass
class Sample:
    wall: float  # the command, start to exit
    sync: float  # sync(2) right after it
    cpu: float  # user + system of the command and its children
    rss_mib: float  # the command's peak RSS (largest of it and its children)
    qemu_cpu: float  # the guest's QEMU process meanwhile
    spawned: float = 0.0  # time.time() when the command was started

    @property
    def total(self) -> float:
        return self.wall + self.sync


# -- commands ---------------------------------------------------------------------------------
def qemu_cpu_seconds(pid: int | None) -> float:
    if pid is None:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(argv: list[str], log: Path, env: dict, qemu_pid: int | None) -> tuple[Sample, str]:
    """Run one command to its exit, then time sync. CPU and peak RSS come from GNU time: a
    child forked from this (large) process inherits its RSS high-water mark, one forked by
    the small `time` does not."""
    usage_file = log.with_suffix(".usage")
    timed_argv = ["/usr/bin/time", "-f", "%U %S %M", "-o", str(usage_file), *argv]
    qemu0 = qemu_cpu_seconds(qemu_pid)
    with open(log, "w") as out:
        spawned, start = time.time(), time.perf_counter()
        proc = subprocess.Popen(
            timed_argv,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=c.PROJECT,
            start_new_session=True,  # its own group: stop() reaches the command behind `time`
        )
        timer = threading.Timer(TIMEOUT, _kill_group, (proc.pid, signal.SIGKILL))
        timer.start()
        try:
            proc.wait()
        except BaseException:  # Ctrl-C/SIGTERM: let the command undo its own work first
            stop(proc)
            raise
        finally:
            timer.cancel()
        wall = time.perf_counter() - start
    qemu = qemu_cpu_seconds(qemu_pid) - qemu0
    text = log.read_text(errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:4])} ... exited {proc.returncode}:\n{text[-3000:]}")
    user, system, rss_kib = usage_file.read_text().split("\n")[-2].split()
    start = time.perf_counter()
    os.sync()
    synced = time.perf_counter() - start
    cpu = float(user) + float(system)
    return Sample(wall, synced, cpu, int(rss_kib) / 1024, qemu, spawned), text


def _kill_group(pgid: int, sig: int) -> bool:
    try:
        os.killpg(pgid, sig)
        return True
    except ProcessLookupError:  # the whole group is gone
        return False


def stop(proc: subprocess.Popen) -> None:
    """TERM the command's group (ours undoes what it made), wait up to 60 s, then KILL."""
    _kill_group(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        proc.poll()  # reap `time`: a zombie would keep the group alive
        if not _kill_group(proc.pid, 0):
            return
        time.sleep(0.1)
    _kill_group(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def allocated(path: Path) -> int:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_blocks * 512 for p in files)


def disk_of(conn, name: str, target: str = "vda") -> Path:
    xml = ET.fromstring(conn.lookupByName(name).XMLDesc(0))
    for disk in xml.findall("devices/disk"):
        if disk.find("target").get("dev") == target:
            return Path(disk.find("source").get("file"))
    raise RuntimeError(f"restored domain {name} has no disk {target}")


# -- the bench --------------------------------------------------------------------------------
class Bench:
    def __init__(self, work: Path, domains, args, scratch: Path):
        self.work, self.domains, self.args = work, domains, args
        self.env = c.installed_env(scratch)  # our commands' bytecode kept, as installed
        self.token = work.name.rsplit("-", 1)[-1]
        self.root = Path(os.environ["VMBACKUP_ROOT"])
        self.restore_root = Path(os.environ["VMBACKUP_RESTORE_ROOTS"])
        self.theirs = c.subdir(work, "virtnbdbackup")
        self.sockets = c.subdir(work, "sockets")
        self.sockets.chmod(0o1777)  # QEMU (not root) listens on virtnbdbackup's socket here
        self.refs = c.subdir(work, "refs")
        self.logs = c.subdir(work, "logs")
        self.restored: list[str] = []  # names of domains the restores defined
        self.samples: dict[tuple[str, str], list[Sample]] = {}
        self.checks: list[tuple[str, bool]] = []
        self.sizes: dict[tuple[str, str], int] = {}
        self.floors: dict[str, list[float]] = {}  # step -> seconds, one per round
        self.kept: dict[str, Path] = {}  # step -> our backup of this round

    # -- setup -------------------------------------------------------------------------------
    def build(self) -> None:
        from backups import inventory
        from backups.models import BackupPolicy, Host, VirtualMachine
        from tests.domains import DiskSpec

        raw = self.work / "source.raw"
        parts = c.build_raw(raw, self.args.size)
        say(
            f"disk: {self.args.size / c.GiB:g} GiB virtual = {parts['random'] // c.MiB} MiB"
            f" random + {parts['text'] // c.MiB} MiB text + {parts['hole'] // c.MiB} MiB hole"
        )
        self.doms = {}
        for tool in TOOLS:
            dom = self.domains.create(
                [DiskSpec("vda", "qcow2", self.args.size // c.MiB)],
                name=f"vmbench-{self.token}-{tool}",
            )
            c.run(
                ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(dom.disks["vda"])]
            )
            self.domains.lookup(dom).create()
            self.doms[tool] = dom
        raw.unlink()
        host = Host.objects.create(name="bench", uri=URI)
        inventory.sync_host(host)
        self.vm = VirtualMachine.objects.get(host=host, uuid=self.doms["ours"].uuid)
        keep_all = {f: 0 for f in BackupPolicy.KEEP_FIELDS}
        # plain: full, incremental, full, ... (full_every=1); zstd: always full (full_every=0)
        for name, compression, full_every in (("plain", "none", 1), ("zstd", "zstd", 0)):
            policy = BackupPolicy.objects.create(
                name=name, schedule="", compression=compression, full_every=full_every, **keep_all
            )
            policy.vms.add(self.vm)
        manage = [sys.executable, "manage.py", "vmbackup_run", "--help"]  # writes the bytecode
        subprocess.run(manage, cwd=c.PROJECT, env=self.env, capture_output=True, check=True)
        for dom in self.doms.values():
            c.read_through(dom.disks["vda"])  # warm the cache once; nothing is ever dropped
        c.settle()

    def qemu_pid(self, tool: str) -> int | None:
        try:
            return int(Path(f"/run/libvirt/qemu/{self.doms[tool].name}.pid").read_text())
        except (OSError, ValueError):
            return None

    # -- one step of one tool ----------------------------------------------------------------
    def timed(self, step: str, tool: str, argv: list[str], tag: str, env=None) -> str:
        log = self.logs / f"{tag}-{step}-{tool}.log"
        sample, out = measure(argv, log, env or dict(os.environ), self.qemu_pid(tool))
        self.samples.setdefault((step, tool), []).append(sample)
        return out

    def ours_backup(self, step: str, tag: str) -> Path:
        from django.db import connections

        from backups.models import Backup, BackupPolicy

        policy = "zstd" if step == "full_z" else "plain"
        BackupPolicy.objects.update(enabled=False)
        BackupPolicy.objects.filter(name=policy).update(enabled=True)
        connections.close_all()  # the command writes the same SQLite file
        manage = [sys.executable, "manage.py"]
        argv = [*manage, "vmbackup_run", self.vm.name, "--wait"]
        out = self.timed(step, "ours", argv, tag, self.env)
        path = Path(out.strip().splitlines()[-1])
        backup = Backup.objects.get(path=str(path))
        want = "incremental" if step == "inc" else "full"
        if backup.kind != want or backup.method != "push":
            raise RuntimeError(f"expected a {want} push backup, got {backup.kind} {backup.method}")
        steps = {e.get("step"): e for e in backup.run.journal}
        compressed = steps["backup-begin"].get("mode") == "pull" or "compress" in steps
        if step == "full_z" and not compressed:
            raise RuntimeError(f"the compressed full was not compressed: {backup.run.journal}")
        self.sizes[(step, "ours")] = allocated(path)
        self.kept[step] = path
        if self.args.verbose:
            self.steps(step, backup.run)
        return path

    def steps(self, step: str, run) -> None:
        """Each journal step's offset (s) from the command's start, and its exit (a run's
        or a restore's: both journal and have a ``started_at``)."""
        sample = self.last(step, "ours")
        marks = [f"{e['step']}+{c.iso(e['at']).timestamp() - sample.spawned:.2f}"
                 for e in run.journal]  # fmt: skip
        say(f"  {step}: claimed+{run.started_at.timestamp() - sample.spawned:.2f}, "
            + ", ".join(marks) + f", exit+{sample.wall:.2f}")  # fmt: skip

    def theirs_backup(self, step: str, tag: str) -> Path:
        level = "inc" if step == "inc" else "full"
        out = self.theirs / tag / ("z" if step == "full_z" else "plain")
        argv = ["virtnbdbackup", "-U", URI, "-d", self.doms["theirs"].name, "-l", level]
        argv += ["-o", str(out), "-f", str(self.sockets / f"{tag}-{step}.sock"), "-n"]
        if step == "full_z":
            argv.append("-z")  # last: its level argument is optional
        before = allocated(out) if out.exists() else 0
        self.timed(step, "theirs", argv, tag)
        self.sizes[(step, "theirs")] = allocated(out) - before
        return out

    def ours_restore(self, backup: Path, tag: str) -> list[tuple[str, Path]]:
        from django.db import connections

        name = f"vmbench-{self.token}-{tag}-ours"
        self.restored.append(name)
        connections.close_all()
        argv = [sys.executable, "manage.py", "vmbackup_restore", str(backup), "--name", name]
        argv += ["--root", str(self.restore_root), "--wait"]
        self.timed("restore", "ours", argv, tag, self.env)
        if self.args.verbose:
            from backups.models import Restore

            self.steps("restore", Restore.objects.latest("pk"))
        dest = self.work / "restore-sh" / tag
        self.timed("restore_sh", "ours", ["sh", str(backup / "restore.sh"), str(dest)], tag)
        return [("ours", disk_of(self.domains.conn, name)), ("ours restore.sh", dest / "vda.qcow2")]

    def theirs_restore(self, backup: Path, tag: str) -> list[tuple[str, Path]]:
        name = f"vmbench-{self.token}-{tag}-theirs"
        self.restored.append(name)
        dest = self.work / "virtnbdrestore" / tag
        argv = ["virtnbdrestore", "-U", URI, "-i", str(backup), "-o", str(dest), "-c", "-D"]
        argv += ["-N", name, "-n", "-f", str(self.sockets / f"{tag}-restore.sock")]
        argv += ["-L", str(self.logs / f"{tag}-virtnbdrestore.log")]
        self.timed("restore", "theirs", argv, tag)
        return [("virtnbdrestore", disk_of(self.domains.conn, name))]

    # -- guest writes and references ---------------------------------------------------------
    def write(self, seed: int) -> None:
        """The same 1 MiB writes (offsets and patterns) into both guests, then a flush."""
        from tests.domains import guest_write

        rng = random.Random(seed)
        offsets = rng.sample(range(self.args.size * 3 // 4 // c.MiB), self.args.changed_mib)
        for tool in TOOLS:
            uuid = self.doms[tool].uuid
            for i, offset in enumerate(offsets):
                pattern = (seed * 7 + i) % 251 + 1
                guest_write(self.domains.conn, uuid, 0, f"write -P {pattern} {offset}M 1M")
            guest_write(self.domains.conn, uuid, 0, "flush")

    def reference(self, tool: str, tag: str) -> Path:
        """The guest's disk as it is now, copied with the guest paused."""
        out = self.refs / f"{tag}-{tool}.qcow2"
        dom = self.domains.lookup(self.doms[tool])
        dom.suspend()
        try:
            src = str(self.doms[tool].disks["vda"])
            c.run(["qemu-img", "convert", "-U", "-f", "qcow2", "-O", "qcow2", src, str(out)])
        finally:
            dom.resume()
        return out

    def compare(self, label: str, ref: Path, restored: Path) -> None:
        done = subprocess.run(
            ["qemu-img", "compare", "-q", str(ref), str(restored)],
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            check=False,
        )
        same = done.returncode == 0
        self.checks.append((label, same))
        if not same:
            say(f"  DIFFERENT: {label} restored {restored} vs {ref}: {done.stdout}{done.stderr}")

    # -- a round -----------------------------------------------------------------------------
    def round(self, number: int) -> None:
        tag = f"r{number}"
        backups: dict[str, Path] = {}
        refs: dict[str, Path] = {}
        for index, (step, _title, _key) in enumerate(STEPS):
            order = TOOLS if (index + number) % 2 else TOOLS[::-1]
            if step == "inc":
                self.write(seed=number)
                refs = {tool: self.reference(tool, tag) for tool in TOOLS}
                c.settle()
            if step == "restore":
                self.warm(backups)
            for tool in order:
                if step == "restore":
                    restore = self.ours_restore if tool == "ours" else self.theirs_restore
                    for label, disk in restore(backups[tool], tag):
                        self.compare(label, refs[tool], disk)
                else:
                    run = self.ours_backup if tool == "ours" else self.theirs_backup
                    backups[tool] = run(step, tag)
        if self.args.floors:
            self.measure_floors()
        self.tidy(tag)

    # -- floors: the least each step can cost here, no tool around it ------------------------
    def measure_floors(self) -> None:
        source = str(self.doms["ours"].disks["vda"])
        out = self.work / "floor.qcow2"
        for step, extra in (("full", []), ("full_z", ["-c", "-W", "-o", "compression_type=zstd"])):
            c.settle()
            start = time.perf_counter()
            c.run(["qemu-img", "convert", "-U", "-f", "qcow2", "-O", "qcow2", *extra, source,
                   str(out)])  # fmt: skip
            c.sha256_file(out)
            os.sync()
            self.floors.setdefault(step, []).append(time.perf_counter() - start)
            out.unlink()
        c.settle()
        chain = (self.kept["full"], self.kept["inc"])
        start = time.perf_counter()
        hashing = threading.Thread(
            target=lambda: [c.sha256_file(f) for d in chain for f in d.rglob("*") if f.is_file()]
        )
        hashing.start()
        c.run(["qemu-img", "convert", "-t", "none", "-f", "qcow2", "-O", "qcow2",
               str(chain[-1] / "vda.qcow2"), str(out)])  # fmt: skip
        os.sync()
        hashing.join()
        self.floors.setdefault("restore", []).append(time.perf_counter() - start)
        out.unlink()
        c.settle()
        start = time.perf_counter()
        help_argv = [sys.executable, "manage.py", "vmbackup_run", "--help"]
        subprocess.run(help_argv, cwd=c.PROJECT, env=self.env, capture_output=True, check=True)
        self.floors.setdefault("inc", []).append(time.perf_counter() - start)

    def warm(self, backups: dict[str, Path]) -> None:
        """Both tools' chains read into the page cache before the restores: our backups
        drop their pages after hashing them (not to evict the host's working set), while
        virtnbdbackup's stay cached, so without this ours were restored from the disk and
        theirs from memory. Warm for both, like every other input here."""
        for path in (self.kept["full"], self.kept["inc"], backups["theirs"]):
            for member in sorted(p for p in path.rglob("*") if p.is_file()):
                c.read_through(member)

    def tidy(self, tag: str) -> None:
        """Drop this round's outputs (backups, restores, references) to bound disk use; the
        database rows stay, and the next round's first backup of each policy is a full."""
        from tests.domains import remove_domain

        for name in self.restored:
            try:  # first: a defined domain pointing at removed files is worse than a leftover file
                remove_domain(self.domains.conn, self.domains.conn.lookupByName(name).UUIDString())
            except Exception:  # not defined (the restore failed before): nothing to remove
                pass
        for path in (self.root, self.restore_root, self.work / "restore-sh", self.theirs):
            for child in path.iterdir() if path.exists() else ():
                shutil.rmtree(child, ignore_errors=True)
        shutil.rmtree(self.work / "virtnbdrestore", ignore_errors=True)
        self.restored.clear()
        for ref in self.refs.iterdir():
            ref.unlink()

    def last(self, step: str, tool: str) -> Sample:
        return self.samples[(step, tool)][-1]


# -- reporting --------------------------------------------------------------------------------
def med(samples: list[Sample], attr: str) -> float:
    return c.median([getattr(s, attr) for s in samples])


def report_round(bench: Bench, number: int, others: dict[str, int]) -> None:
    parts = []
    for step, _title, _key in STEPS:
        ours, theirs = bench.last(step, "ours").total, bench.last(step, "theirs").total
        parts.append(f"{step} {ours:.2f}/{theirs:.2f}")
    parts.append(f"restore.sh {bench.last('restore_sh', 'ours').total:.2f}")
    say(
        f"round {number} ({others['qemu']}q{others['pytest']}p), ours/theirs s: " + ", ".join(parts)
    )


def report(bench: Bench, rounds: int, busy: int, elapsed: float) -> None:
    say()
    say("medians over rounds; total = command + sync (s); cpu = the command's user+sys (s);")
    say("qemu = the guest's QEMU process meanwhile (s); rss = the command's peak RSS (MiB)")
    head = f"{'step':<16} {'tool':<22} {'command':>8} {'sync':>6} {'total':>6}"
    say(head + f" {'cpu':>6} {'qemu':>6} {'rss':>6} {'MiB out':>8}")
    rows = [(step, title) for step, title, _key in STEPS] + [("restore_sh", "restore")]
    for step, title in rows:
        for tool in TOOLS:
            samples = bench.samples.get((step, tool))
            if not samples:
                continue
            label = {"ours": "vmbackup", "theirs": "virtnbdbackup"}[tool]
            if step == "restore_sh":
                label = "vmbackup restore.sh"
            elif step == "restore":
                label = "vmbackup_restore" if tool == "ours" else "virtnbdrestore"
            size = bench.sizes.get((step, tool))
            say(
                f"{title:<16} {label:<22} {med(samples, 'wall'):8.2f} {med(samples, 'sync'):6.2f}"
                f" {med(samples, 'total'):6.2f} {med(samples, 'cpu'):6.2f}"
                f" {med(samples, 'qemu_cpu'):6.2f} {max(s.rss_mib for s in samples):6.0f}"
                + (f" {size / c.MiB:8.1f}" if size is not None else "")
            )
    ratios, alone = {}, {}
    for step, _title, key in STEPS:
        ours, theirs = bench.samples[(step, "ours")], bench.samples[(step, "theirs")]
        ratios[key] = med(ours, "total") / med(theirs, "total")
        alone[key] = med(ours, "wall") / med(theirs, "wall")
    sh = med(bench.samples[("restore_sh", "ours")], "total")
    sh_ratio = sh / med(bench.samples[("restore", "theirs")], "total")
    if bench.floors:
        say()
        say("floors (s, no tool around them) and floor / theirs: the best ratio a verified,")
        say("durable implementation could reach here")
        what = {
            "full_z": "convert -U -c -W (zstd) + sha256 + sync",
            "full": "convert -U + sha256 + sync",
            "inc": "start of a management command (manage.py vmbackup_run --help)",
            "restore": "flattening convert -t none + sync, beside sha256 of the chain",
        }
        for step, _title, key in STEPS:
            floor = c.median(bench.floors[step])
            theirs = med(bench.samples[(step, "theirs")], "total")
            say(f"  {key:<20} floor {floor:6.2f}  floor/theirs {floor / theirs:5.2f}  "
                f"ours/floor {med(bench.samples[(step, 'ours')], 'total') / floor:5.2f}  "
                f"({what[step]})")  # fmt: skip
    say()
    say("commands alone, without the sync: " + " ".join(f"{k}={v:.2f}" for k, v in alone.items()))
    say(f"restore.sh vs virtnbdrestore (with sync): {sh_ratio:.2f}")
    say(
        "ours compresses with zstd (a full pulled over NBD, qemu-img compressing);"
        " virtnbdbackup -z compresses with lz4"
    )
    verdict = ", ".join(
        f"{k} {ratios[k]:.2f} {'<=' if ratios[k] <= limit else '>'} {limit}"
        for k, limit in TARGETS.items()
    )
    if busy:
        say(f"WARNING: other guests/test runs were active in {busy} of {rounds} rounds: noisy")
    say(f"targets: {verdict}")
    same = sum(ok for _label, ok in bench.checks)
    say(f"{rounds} rounds, {bench.args.size / c.GiB:g} GiB disk, {elapsed:.0f} s in all")
    last = " ".join(f"{key}={ratios[key]:.2f}" for key in TARGETS)
    say(f"{last} identical={same}/{len(bench.checks)}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for tool in ("virtnbdbackup", "virtnbdrestore"):
        if shutil.which(tool) is None:
            print(f"{tool} is not installed (scripts/setup-host.sh --test)", file=sys.stderr)
            return 2
    started = time.perf_counter()
    work = c.bench_dir()
    scratch = c.scratch_dir()
    domains = bench = None
    busy = 0
    try:
        with c.interrupts_as_keyboard():
            # the commands run as subprocesses: they read these, as the bench's own Django does
            os.environ["VMBACKUP_ROOT"] = str(c.subdir(work, "root"))
            os.environ["VMBACKUP_RESTORE_ROOTS"] = str(c.subdir(work, "restored"))
            for name in ("VMBACKUP_ROOTS", "VMBACKUP_NBD_DIR", "VMBACKUP_OVERLAY_DIR"):
                os.environ.pop(name, None)
            c.setup_django(scratch)
            from tests import domains as domains_mod

            domains_mod.BASE = work  # domain dirs live in our scratch dir, not the tests'
            domains = domains_mod.Domains(URI)
            if not args.smoke:
                c.wait_quiet(args.wait_quiet)
            bench = Bench(work, domains, args, scratch)
            bench.build()
            say(f"{args.rounds} rounds of {', '.join(t for _s, t, _k in STEPS)}")
            for number in range(1, args.rounds + 1):
                others = c.foreign_activity(tuple(f"guest={d.name}," for d in bench.doms.values()))
                busy += any(others.values())
                bench.round(number)
                report_round(bench, number, others)
    except KeyboardInterrupt:
        print("interrupted: cleaning up", file=sys.stderr)
        return 130
    finally:
        with c.uninterruptible():
            cleanup(bench, domains, work, scratch)
    report(bench, args.rounds, busy, time.perf_counter() - started)
    return 0


def cleanup(bench: Bench | None, domains, work: Path, scratch: Path) -> None:
    """Restored domains, both guests (with their checkpoints), every file, the database."""
    if bench is not None:
        try:
            bench.tidy("end")
        except Exception as exc:  # keep going: the domains and directories must still go
            print(f"cleanup: removing restores failed: {exc}", file=sys.stderr)
    if domains is not None:
        try:
            domains.close()
        except Exception as exc:
            print(f"cleanup: removing domains failed: {exc}", file=sys.stderr)
    c.close_django()
    shutil.rmtree(work, ignore_errors=True)
    shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
