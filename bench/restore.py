"""Restore as a new domain, instant recovery and a restore drill of one backup, with
``virtnbdrestore`` of the same guest's data side by side.

    .venv/bin/python bench/restore.py [--size-gib 2] [--rounds 3] [--wait-quiet 60]
    .venv/bin/python bench/restore.py --smoke   # 128 MiB, 1 round: does it still run?

Needs Debian's ``virtnbdbackup`` package, libvirtd and root. One running TCG domain, the
disk-rooted agent guest of ``tests/agent_guest.py`` (its system and qemu-ga on vda, booted
by SeaBIOS: a restored disk that does not hold a working system never answers the agent),
its disk grown to ``--size-gib`` and filled past the system's 64 MiB like the other benches
(half random, a quarter text, a quarter hole). Once it answers ``guest-ping``: one push
backup by ``manage.py vmbackup_run VM --wait`` and one full ``virtnbdbackup -l copy`` (no
checkpoint: it refuses to start a chain beside ours) of the same guest. Then interleaved
rounds (the order rotates each round) of:

- **restore**: ``manage.py vmbackup_restore <backup> --name N --root R --wait`` timed to its
  exit (restored: defined, shut off), then the domain started and timed until libvirt says
  running (when it would run with ``--start``);
- **instant**: ``vmbackup_restore <backup> --instant --name N --root R --start --wait``:
  from the command's start until libvirt reports the domain running (polled every 20 ms),
  and to its exit (the move has ended: the domain no longer reads the backup);
- **drill**: ``manage.py vmbackup_drill <backup> --wait``: time to alive as the Drill row
  records it (from the drill's start to ``guest-ping`` answered, the chain check included)
  and to the command's exit (the sandbox removed);
- **virtnbdrestore**: ``virtnbdrestore -c -D -N N`` of the virtnbdbackup backup, a new
  domain like ours, timed to its exit, then started like ours (its serial console, still
  the source's log file, first pointed nowhere, untimed).

Every command is a subprocess against the bench's throwaway SQLite database; ``sync`` is
timed apart after each restore (ours fsyncs before it reports success, virtnbdrestore does
not). Each restored domain and its files are removed right after its measurement. Last line
(medians; ratios ours / theirs, lower is better): ``restore_vs_virtnbdrestore=<r>
instant_running_s=<s> instant_vs_virtnbdrestore=<r> drill_alive_s=<s>``. See
bench/README.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import _common as c

URI = "qemu:///system"
SMOKE = {"size_gib": 0.125, "rounds": 1, "wait_quiet": 0}
STEPS = ("restore", "instant", "drill", "theirs")
TIMEOUT = 1800
POLL = 0.02
BOOT_TIMEOUT = 300  # the source guest's first boot under TCG on a busy machine


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-gib", type=float, default=2.0, help="virtual disk size (GiB)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (>= 1)")
    parser.add_argument("--wait-quiet", type=float, default=60, metavar="SECONDS")
    parser.add_argument("--smoke", action="store_true", help="smallest size, one round")
    args = parser.parse_args(argv)
    if args.smoke:
        vars(args).update(SMOKE)
    size = int(args.size_gib * c.GiB)
    if not 0.125 <= args.size_gib <= 8 or size % (4 * c.CHUNK) or args.rounds < 1:
        parser.error(
            f"--size-gib: 0.125-8 (the guest's system takes 64 MiB), a multiple of"
            f" {4 * c.CHUNK // c.MiB} MiB; --rounds >= 1"
        )
    args.size = size
    return args


def say(text: str = "") -> None:
    print(text, flush=True)


# -- commands ---------------------------------------------------------------------------------
def is_running(conn, name: str) -> bool:
    import libvirt

    try:
        return conn.lookupByName(name).state()[0] == libvirt.VIR_DOMAIN_RUNNING
    except libvirt.libvirtError:  # not defined yet
        return False


def stop(proc: subprocess.Popen) -> None:
    """TERM the command's group (ours undoes what it made), wait up to 60 s, then KILL."""
    for sig, wait in ((signal.SIGTERM, 60), (signal.SIGKILL, 30)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def measure(argv: list[str], log: Path, env: dict, conn=None, watch: str = "") -> dict:
    """Run one command to its exit: ``wall``; with ``watch``, ``running``: when libvirt
    first reported the domain of that name running (polled while the command runs)."""
    running = None
    with open(log, "w") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env,
                                cwd=c.PROJECT, start_new_session=True)  # fmt: skip
        try:
            while proc.poll() is None:
                if watch and running is None and is_running(conn, watch):
                    running = time.perf_counter() - start
                if time.perf_counter() - start > TIMEOUT:
                    raise TimeoutError(f"{argv[:4]} still running after {TIMEOUT} s")
                time.sleep(POLL)
        except BaseException:  # Ctrl-C, SIGTERM, the timeout: let it undo its own work
            stop(proc)
            raise
        wall = time.perf_counter() - start
    if proc.returncode != 0:
        text = log.read_text(errors="replace")
        raise RuntimeError(f"{' '.join(argv[:4])} ... exited {proc.returncode}:\n{text[-3000:]}")
    if watch and running is None and is_running(conn, watch):
        running = wall  # started in the last poll interval
    return {"wall": wall, "running": running}


def timed_sync() -> float:
    start = time.perf_counter()
    os.sync()
    return time.perf_counter() - start


# -- the bench --------------------------------------------------------------------------------
class Bench:
    def __init__(self, work: Path, scratch: Path, domains, args):
        self.work, self.domains, self.args = work, domains, args
        self.conn = domains.conn
        self.env = c.installed_env(scratch)  # our commands' bytecode kept, as installed
        self.token = work.name.rsplit("-", 1)[-1]
        self.restore_root = Path(os.environ["VMBACKUP_RESTORE_ROOTS"])
        self.theirs_root = c.subdir(work, "virtnbdbackup")
        self.theirs_out = work / "virtnbdrestore"
        self.sockets = c.subdir(work, "sockets")
        self.sockets.chmod(0o1777)  # QEMU (not root) listens on virtnbdbackup's socket here
        self.logs = c.subdir(work, "logs")
        self.figures: dict[str, list[float]] = {}
        self.source = self.backup = None

    def manage(self, *args: str) -> list[str]:
        return [sys.executable, "manage.py", *args]

    # -- the guest and its two backups -------------------------------------------------------
    def build(self) -> None:
        from tests import agent_guest

        image = agent_guest.ensure_guest()
        size_mib = self.args.size // c.MiB
        dom = agent_guest.create_rooted_domain(
            self.domains, size_mib=size_mib, start=False, image=image
        )
        raw = self.work / "seed.raw"
        c.build_raw(raw, self.args.size)
        with open(image.disk_root, "rb") as src, open(raw, "r+b") as dst:
            shutil.copyfileobj(src, dst, c.CHUNK)  # the system over the first 64 MiB
        c.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(dom.disks["vda"])])
        raw.unlink()
        self.conn.lookupByUUIDString(dom.uuid).create()
        booted = agent_guest.wait_for_agent(self.conn, dom.uuid, timeout=BOOT_TIMEOUT)
        say(f"guest {dom.name}: {size_mib} MiB disk, agent answered after {booted:.1f} s")
        self.source = dom

    def back_up(self) -> None:
        from django.db import connections

        from backups import inventory
        from backups.models import Backup, BackupPolicy, Host, VirtualMachine

        host = Host.objects.create(name="bench", uri=URI)
        inventory.sync_host(host)
        vm = VirtualMachine.objects.get(host=host, uuid=self.source.uuid)
        keep_all = {f: 0 for f in BackupPolicy.KEEP_FIELDS}
        policy = BackupPolicy.objects.create(name="restore-bench", schedule="", **keep_all)
        policy.vms.add(vm)  # its drill settings: the default timeout, guest-ping alone
        connections.close_all()  # the commands write the same SQLite file
        subprocess.run(self.manage("vmbackup_run", "--help"), cwd=c.PROJECT, env=self.env,
                       capture_output=True, check=True)  # fmt: skip  # writes the bytecode
        measure(self.manage("vmbackup_run", vm.name, "--wait"), self.logs / "backup.log", self.env)
        self.backup = Backup.objects.filter(vm=vm).latest("pk")
        if self.backup.kind != "full" or self.backup.method != "push":
            raise RuntimeError(f"expected a full push backup: {self.backup.kind} {self.backup}")
        # "copy": a full without a checkpoint (it refuses to make one beside ours); the
        # same data file a "full" writes, restored the same way
        argv = ["virtnbdbackup", "-U", URI, "-d", self.source.name, "-l", "copy"]
        argv += ["-o", str(self.theirs_root / "full"), "-f", str(self.sockets / "backup.sock")]
        measure([*argv, "-n"], self.logs / "virtnbdbackup.log", dict(os.environ))
        for path in self.images():
            c.read_through(path)  # warm the cache once; nothing is ever dropped
        c.settle()

    def images(self) -> list[Path]:
        ours = [p for p in Path(self.backup.path).iterdir() if p.suffix == ".qcow2"]
        theirs = [p for p in (self.theirs_root / "full").iterdir() if p.suffix == ".data"]
        return ours + theirs

    # -- one measurement each ----------------------------------------------------------------
    def restore(self, tag: str) -> dict:
        name = f"vmbench-{self.token}-{tag}-restore"
        argv = self.manage("vmbackup_restore", str(self.backup.pk), "--name", name)
        out = measure([*argv, "--root", str(self.restore_root), "--wait"],
                      self.logs / f"{name}.log", self.env)  # fmt: skip
        start = self.start(name)
        sync = timed_sync()
        self.remove(name, self.restore_root / name)
        return {"restore": out["wall"], "restore_running": out["wall"] + start,
                "restore_sync": sync}  # fmt: skip

    def instant(self, tag: str) -> dict:
        name = f"vmbench-{self.token}-{tag}-instant"
        argv = self.manage("vmbackup_restore", str(self.backup.pk), "--instant", "--name", name)
        argv += ["--root", str(self.restore_root), "--start", "--wait"]
        out = measure(argv, self.logs / f"{name}.log", self.env, self.conn, watch=name)
        if out["running"] is None:
            raise RuntimeError(f"{name} was never seen running")
        self.remove(name, self.restore_root / name)
        return {"instant_running": out["running"], "instant_moved": out["wall"]}

    def drill(self, tag: str) -> dict:
        from backups.models import Drill, DrillResult

        out = measure(self.manage("vmbackup_drill", str(self.backup.pk), "--wait"),
                      self.logs / f"{tag}-drill.log", self.env)  # fmt: skip
        drill = Drill.objects.latest("pk")
        if drill.result != DrillResult.PASSED or drill.alive_after_seconds is None:
            raise RuntimeError(f"drill {drill.pk}: {drill.status} {drill.error}")
        return {"drill_alive": drill.alive_after_seconds, "drill_total": out["wall"]}

    def theirs(self, tag: str) -> dict:
        name = f"vmbench-{self.token}-{tag}-theirs"
        dest = self.theirs_out / tag
        argv = ["virtnbdrestore", "-U", URI, "-i", str(self.theirs_root / "full")]
        argv += ["-o", str(dest), "-c", "-D", "-N", name, "-n"]
        argv += ["-f", str(self.sockets / f"{tag}-restore.sock")]
        argv += ["-L", str(self.logs / f"{tag}-virtnbdrestore.log")]
        out = measure(argv, self.logs / f"{name}.log", dict(os.environ))
        self.own_console(name)
        start = self.start(name)
        sync = timed_sync()
        self.remove(name, dest)
        return {"theirs": out["wall"], "theirs_running": out["wall"] + start,
                "theirs_sync": sync}  # fmt: skip

    def own_console(self, name: str) -> None:
        """virtnbdrestore keeps the source's serial log file, which the running source
        holds (libvirt then refuses the start): the restored domain's console goes nowhere.
        Ours drops host paths itself (the restore allowlist)."""
        import xml.etree.ElementTree as ET

        root = ET.fromstring(self.conn.lookupByName(name).XMLDesc(0))
        for node in root.iterfind("devices/*[@type='file']"):
            if node.tag in ("serial", "console"):
                node.set("type", "null")
                for source in node.findall("source"):
                    node.remove(source)
        self.conn.defineXML(ET.tostring(root, encoding="unicode"))

    def start(self, name: str) -> float:
        """Seconds from asking libvirt to start the restored domain until it runs."""
        dom = self.conn.lookupByName(name)
        start = time.perf_counter()
        dom.create()
        while not is_running(self.conn, name):
            time.sleep(POLL)
        return time.perf_counter() - start

    def remove(self, name: str, files: Path) -> None:
        """A restored domain and its files (the domain first: a defined domain pointing at
        removed files is worse than a leftover file)."""
        import libvirt

        from tests.domains import remove_domain

        try:
            remove_domain(self.conn, self.conn.lookupByName(name).UUIDString())
        except libvirt.libvirtError:  # not defined (the restore failed before)
            pass
        shutil.rmtree(files, ignore_errors=True)

    def tidy(self) -> None:
        """Whatever a failed or interrupted measurement left: domains named like ours, the
        restore roots' and virtnbdrestore's outputs; a drill removes its own sandbox even
        when stopped, but not when killed."""
        from backups.models import Drill

        sandboxes = set(Drill.objects.values_list("name", flat=True))
        for dom in self.conn.listAllDomains():
            if dom.name().startswith(f"vmbench-{self.token}-") or dom.name() in sandboxes:
                self.remove(dom.name(), self.restore_root / dom.name())
        for child in self.restore_root.iterdir() if self.restore_root.exists() else ():
            shutil.rmtree(child, ignore_errors=True)
        shutil.rmtree(self.theirs_out, ignore_errors=True)

    # -- a round -----------------------------------------------------------------------------
    def round(self, number: int) -> dict:
        from django.db import connections

        turn = (number - 1) % len(STEPS)
        row: dict[str, float] = {}
        for step in STEPS[turn:] + STEPS[:turn]:
            connections.close_all()  # the commands write the same SQLite file
            row.update(getattr(self, step)(f"r{number}"))
            c.settle()
        for key, value in row.items():
            self.figures.setdefault(key, []).append(value)
        return row


# -- reporting --------------------------------------------------------------------------------
def cached(bench: Bench) -> str:
    shares = [c.cached_fraction(p) for p in bench.images()]
    return "?" if None in shares else f"{100 * min(shares):.0f}%"


def report_round(number: int, row: dict, others: dict, cache: str) -> None:
    say(
        f"round {number} ({others['qemu']}q{others['pytest']}p, cache {cache}), s:"
        f" restore {row['restore']:.2f} (running {row['restore_running']:.2f},"
        f" sync {row['restore_sync']:.2f}); instant running {row['instant_running']:.2f},"
        f" moved {row['instant_moved']:.2f}; drill alive {row['drill_alive']:.2f},"
        f" total {row['drill_total']:.2f}; virtnbdrestore {row['theirs']:.2f}"
        f" (running {row['theirs_running']:.2f}, sync {row['theirs_sync']:.2f})"
    )


ROWS = (
    ("vmbackup_restore --wait", "restore", "restore_running", "restore_sync"),
    ("vmbackup_restore --instant --start", "instant_moved", "instant_running", None),
    ("vmbackup_drill (alive)", "drill_total", "drill_alive", None),
    ("virtnbdrestore -c -D", "theirs", "theirs_running", "theirs_sync"),
)


def report(bench: Bench, rounds: int, busy: int, elapsed: float) -> None:
    m = {key: c.median(values) for key, values in bench.figures.items()}
    say()
    say("medians (s): exit = the command's end; running = libvirt says running (restore and")
    say("virtnbdrestore: exit + start; drill: alive as its row records it); sync apart")
    say(f"{'':<36} {'exit':>7} {'running':>8} {'sync':>6}")
    for title, end, running, sync in ROWS:
        tail = f" {m[sync]:6.2f}" if sync else ""
        say(f"{title:<36} {m[end]:7.2f} {m[running]:8.2f}{tail}")
    with_sync = (m["restore"] + m["restore_sync"]) / (m["theirs"] + m["theirs_sync"])
    say(
        f"restore vs virtnbdrestore with sync {with_sync:.2f}; time to running: restore vs"
        f" virtnbdrestore {m['restore_running'] / m['theirs_running']:.2f}, instant vs"
        f" virtnbdrestore {m['instant_running'] / m['theirs_running']:.2f}"
    )
    if busy:
        say(f"WARNING: other guests/test runs were active in {busy} of {rounds} rounds: noisy")
    say(f"{rounds} rounds, {bench.args.size / c.GiB:g} GiB disk, {elapsed:.0f} s in all")
    say(
        f"restore_vs_virtnbdrestore={m['restore'] / m['theirs']:.2f}"
        f" instant_running_s={m['instant_running']:.2f}"
        f" instant_vs_virtnbdrestore={m['instant_running'] / m['theirs']:.2f}"
        f" drill_alive_s={m['drill_alive']:.2f}"
    )


def configure(work: Path, scratch: Path) -> None:
    """What our commands (subprocesses) and the bench's own Django read: every place in
    the bench's scratch directories."""
    os.environ["VMBACKUP_ROOT"] = str(c.subdir(work, "root"))
    os.environ["VMBACKUP_RESTORE_ROOTS"] = str(c.subdir(work, "restored"))
    os.environ["VMBACKUP_DRILL_DIR"] = str(work / "drills")  # made 0711 by the first drill
    os.environ["VMBACKUP_DRILL_EVIDENCE_DIR"] = str(scratch / "evidence")
    for name in ("VMBACKUP_ROOTS", "VMBACKUP_NBD_DIR", "VMBACKUP_OVERLAY_DIR"):
        os.environ.pop(name, None)


def run_rounds(bench: Bench, args) -> int:
    busy = 0
    say(f"{args.rounds} rounds of {', '.join(STEPS)} (the order rotates)")
    for number in range(1, args.rounds + 1):
        others = c.foreign_activity((f"guest={bench.source.name},",))
        busy += any(others.values())
        cache = cached(bench)
        report_round(number, bench.round(number), others, cache)
    return busy


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for tool in ("virtnbdbackup", "virtnbdrestore"):
        if shutil.which(tool) is None:
            print(f"{tool} is not installed (scripts/setup-host.sh --test)", file=sys.stderr)
            return 2
    started = time.perf_counter()
    work, scratch = c.bench_dir(), c.scratch_dir()
    domains = bench = None
    try:
        with c.interrupts_as_keyboard():
            configure(work, scratch)
            c.setup_django(scratch)
            from tests import agent_guest
            from tests import domains as domains_mod

            # the guest's files live in our scratch dir, not the tests'
            domains_mod.BASE = agent_guest.BASE = work
            domains = domains_mod.Domains(URI)
            if not args.smoke:
                c.wait_quiet(args.wait_quiet)
            bench = Bench(work, scratch, domains, args)
            bench.build()
            bench.back_up()
            busy = run_rounds(bench, args)
    except KeyboardInterrupt:
        print("interrupted: cleaning up", file=sys.stderr)
        return 130
    finally:
        with c.uninterruptible():
            cleanup(bench, domains, work, scratch)
    report(bench, args.rounds, busy, time.perf_counter() - started)
    return 0


def cleanup(bench: Bench | None, domains, work: Path, scratch: Path) -> None:
    """Restored domains, the guest (with its checkpoints), every file, the database."""
    if bench is not None:
        try:
            bench.tidy()
        except Exception as exc:  # keep going: the guest and directories must still go
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
