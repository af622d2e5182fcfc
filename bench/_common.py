"""Helpers shared by the benchmark scripts: Django bootstrap, scratch directories, test disks,
hashing, timing statistics, waiting for a quiet machine, libvirt job events and signal
handling. Nothing here imports Django, libvirt or the project at module level, so a script
can set the environment first."""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent
MiB = 1024 * 1024
GiB = 1024 * MiB
CHUNK = 8 * MiB


def project_on_path() -> None:
    """``python bench/x.py`` puts bench/ on sys.path, not the project: add it."""
    if str(PROJECT) not in sys.path:
        sys.path.insert(0, str(PROJECT))


def setup_django(scratch: Path) -> None:
    """Settings from the project, but a throwaway SQLite database and data dir in `scratch`."""
    project_on_path()
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "vmbackup_site.settings")
    # A DATABASE_URL (or a *_FILE variant, which settings read first) from the caller's
    # environment would point the bench's migrate and seeding at a real database.
    for name in ("DATABASE_URL", "VMBACKUP_SQLITE_PATH", "VMBACKUP_DATA_DIR"):
        os.environ.pop(name, None)
        os.environ.pop(f"{name}_FILE", None)
    os.environ["VMBACKUP_SQLITE_PATH"] = str(scratch / "bench.sqlite3")
    os.environ["VMBACKUP_DATA_DIR"] = str(scratch / "data")
    os.environ.setdefault("LOG_LEVEL", "WARNING")
    import django
    from django.core.management import call_command

    django.setup()
    call_command("migrate", verbosity=0)


def close_django() -> None:
    """Close the database connections so the SQLite file can be removed."""
    try:
        from django.db import connections

        connections.close_all()
    except Exception:  # Django never got set up: nothing to close
        pass


def scratch_parent() -> Path | None:
    """``VMBACKUP_BENCH_DIR`` if set: the smoke test points it at a directory of its own, to
    see that nothing is left behind. Else the defaults (/var/tmp, and the system's temp dir
    for the database)."""
    return Path(os.environ["VMBACKUP_BENCH_DIR"]) if os.environ.get("VMBACKUP_BENCH_DIR") else None


def bench_dir(prefix: str = "vmbackup-bench") -> Path:
    """<parent>/<prefix>-<random>, mode 0755 so QEMU (libvirt-qemu) can traverse it."""
    path = (scratch_parent() or Path("/var/tmp")) / f"{prefix}-{uuid.uuid4().hex[:8]}"
    path.mkdir(mode=0o755)
    path.chmod(0o755)
    return path


def installed_env(scratch: Path) -> dict[str, str]:
    """The environment for our commands as subprocesses, with their bytecode kept (in
    ``scratch``) as an installed copy keeps it: with ``PYTHONDONTWRITEBYTECODE`` (set in
    some shells and CI) every start would compile the project again (~0.1-0.2 s of CPU),
    while a packaged tool reads its precompiled bytecode. Run one command untimed first."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = str(scratch / "pyc")
    return env


def scratch_dir() -> Path:
    """A private directory for the throwaway database (0700, as tempfile makes it)."""
    parent = scratch_parent()
    return Path(tempfile.mkdtemp(prefix="vmbackup-bench-db-", dir=parent))


def subdir(parent: Path, name: str) -> Path:
    path = parent / name
    path.mkdir(mode=0o755, exist_ok=True)
    path.chmod(0o755)
    return path


WORDS = (
    "the a of and to in is it that was for on are with as his they be at one have this from "
    "or had by hot word but what some we can out other were all there when up use your how "
    "said an each she which do their time if will way about many then them write would like "
    "so these her long make thing see him two has look more day could go come did number "
    "sound no most people my over know water than call first who may down side been now find "
    "backup disk image machine virtual copy block cluster snapshot restore verify checksum"
).split()


def text_block(size: int = MiB, seed: int = 1) -> bytes:
    """About `size` bytes of English-like lines (a sentence per line), exactly `size` long."""
    rng = random.Random(seed)
    lines, total = [], 0
    while total < size:
        words = [rng.choice(WORDS) for _ in range(rng.randint(6, 16))]
        line = (" ".join(words).capitalize() + ".\n").encode()
        lines.append(line)
        total += len(line)
    return b"".join(lines)[:size]


def build_raw(path: Path, size: int) -> dict[str, int]:
    """A sparse raw file: first half random, next quarter repeated text, last quarter a hole.

    The MBR boot signature is never left in place, so a guest without an OS does not try to
    boot random bytes. Returns the byte counts of each part.
    """
    if size % (4 * CHUNK):
        raise ValueError(f"size must be a multiple of {4 * CHUNK} bytes")
    random_part, text_part = size // 2, size // 4
    text = text_block(CHUNK)
    with open(path, "wb") as f:
        for offset in range(0, random_part, CHUNK):
            chunk = bytearray(os.urandom(CHUNK))
            if offset == 0 and chunk[510:512] == b"\x55\xaa":
                chunk[510] = 0
            f.write(chunk)
        for _ in range(0, text_part, CHUNK):
            f.write(text)
        f.truncate(size)  # the last quarter stays a hole
    return {"random": random_part, "text": text_part, "hole": size - random_part - text_part}


def run(argv: list[str], timeout: float = 1800) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{argv} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


def run_in(argv: list[str], cwd: Path, env: dict[str, str], timeout: float = 1800) -> str:
    """``run`` in ``cwd`` with exactly ``env`` (a command as a person would type it there)."""
    done = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"{argv} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


def timed(argv: list[str], timeout: float = 1800) -> float:
    """Wall-clock seconds of one command (it must succeed)."""
    start = time.perf_counter()
    run(argv, timeout)
    return time.perf_counter() - start


def sha256_file(path: Path) -> str:
    """SHA-256 of a file the way the product hashes an image (hashlib, 8 MiB reads into one
    buffer), without its page-cache advice or writeback: the bare cost of the hash."""
    digest = hashlib.sha256()
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            digest.update(view[:n])
    return digest.hexdigest()


def cached_fraction(path: Path) -> float | None:
    """Share of `path`'s allocated pages in the page cache (util-linux fincore), or None."""
    if not shutil.which("fincore"):
        return None
    try:
        out = run(["fincore", "--bytes", "--noheadings", "--raw", "-o", "RES", str(path)], 30)
        resident = int(out.split()[0])
    except (RuntimeError, ValueError, IndexError, subprocess.TimeoutExpired):
        return None
    allocated = os.stat(path).st_blocks * 512
    return min(resident / allocated, 1.0) if allocated else None


def read_through(path: Path) -> None:
    """Read a file once so it is in the page cache (nothing is ever dropped)."""
    buf = bytearray(CHUNK)
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass


def foreign_activity(own: tuple[str, ...]) -> dict[str, int]:
    """Other people's QEMU guests and test runs, which share our 2 cores and skew timings."""
    found = {"qemu": 0, "pytest": 0}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "qemu-system" in cmdline.split(" ", 1)[0] and not any(n in cmdline for n in own):
            found["qemu"] += 1
        elif "pytest" in cmdline and str(os.getpid()) != entry.name:
            found["pytest"] += 1
    return found


def cpu_busy(seconds: float = 1.0) -> float:
    """Share of all CPUs busy over `seconds` (from /proc/stat)."""

    def sample() -> tuple[int, int]:
        values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = values[3] + values[4]
        return sum(values), idle

    total0, idle0 = sample()
    time.sleep(seconds)
    total1, idle1 = sample()
    return 1 - (idle1 - idle0) / max(total1 - total0, 1)


def wait_quiet(limit: float) -> None:
    """Wait (up to `limit` s) until no other guest or test run is using the 2 cores."""
    deadline = time.monotonic() + limit
    while True:
        others = foreign_activity(())
        busy = cpu_busy(2.0)
        quiet = not any(others.values()) and busy < 0.15
        if quiet or time.monotonic() >= deadline:
            state = "quiet" if quiet else "NOT quiet (measuring anyway)"
            print(
                f"machine {state}: CPU {100 * busy:.0f}% busy,"
                f" {others['qemu']} other QEMU, {others['pytest']} pytest processes",
                flush=True,
            )
            return
        time.sleep(3)


def settle() -> None:
    """Flush dirty pages left by the previous measurement so it does not slow the next one.
    (sync(2) writes back; it does not evict anything from the page cache.)"""
    os.sync()


def iso(value: str) -> datetime:
    return datetime.fromisoformat(value)


def first_step(journal: list[dict], step: str) -> datetime:
    for entry in journal:
        if entry.get("step") == step:
            return iso(entry["at"])
    raise KeyError(f"journal has no {step!r} step: {[e.get('step') for e in journal]}")


def span(journal: list[dict], start: str, end: str) -> float:
    """Seconds from the first `start` step to the first `end` step of a run's journal."""
    return (first_step(journal, end) - first_step(journal, start)).total_seconds()


def median(values: list[float]) -> float:
    return statistics.median(values)


@contextmanager
def interrupts_as_keyboard() -> Iterator[None]:
    """SIGTERM and SIGHUP unwind like Ctrl-C, so every ``finally`` cleanup runs."""

    def handler(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@contextmanager
def uninterruptible() -> Iterator[None]:
    """Let cleanup finish even when Ctrl-C is pressed again."""
    sigs = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in sigs}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


class JobWatch:
    """Notes when libvirt reports a domain job finished: where QEMU's copy ends and the
    runner's own waiting and bookkeeping begin. Read-only: a second connection's events."""

    def __init__(self, uri: str):
        import libvirt

        from backups import hypervisor

        hypervisor.ensure_event_loop()  # before open(), or this connection gets no events
        self.conn = libvirt.open(uri)
        self.events: dict[str, tuple[datetime, float]] = {}
        self.callback = self.conn.domainEventRegisterAny(
            None, libvirt.VIR_DOMAIN_EVENT_ID_JOB_COMPLETED, self._completed, None
        )

    def _completed(self, _conn, dom, params, _opaque) -> None:
        elapsed = params.get("time_elapsed", 0) / 1000
        self.events[dom.UUIDString()] = (datetime.now(UTC), elapsed)

    def pop(self, uuid: str, wait: float = 2.0) -> tuple[datetime, float] | None:
        deadline = time.monotonic() + wait
        while uuid not in self.events and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.events.pop(uuid, None)

    def close(self) -> None:
        try:
            self.conn.domainEventDeregisterAny(self.callback)
        finally:
            self.conn.close()
