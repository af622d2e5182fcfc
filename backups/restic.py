"""The only place in vmbackup that runs restic (offsite copies).

One door, as for qemu-img: argv lists (no shell), an absolute binary, a timeout on every
call, JSON parsed into frozen dataclasses, and one exception, ``ResticError``, whose
``reason`` says what went wrong in words an operator can act on (restic 0.14 exits 1 for
nearly everything, so the reason is read from its stderr).

Secrets stay out of argv, logs and the database: the repository and its password file
reach restic only through the child's environment (``RESTIC_REPOSITORY``,
``RESTIC_PASSWORD_FILE``), the password itself is never read here, and a password inside a
repository URL (``rest:https://user:secret@host/``) is masked in every message. The child
gets a clean environment: our own settings (database URL, secret key, mail password) are
not passed on; the variables restic's backends take their credentials from are.

restic is stopped with SIGINT (it then removes its lock and exits), then its whole process
group killed, when a call times out, when the progress callback or ``watch`` raises (a
cancel: ``watch`` is called about once a second whatever restic prints), or when the
process that started it dies (``PR_SET_PDEATHSIG``); a snapshot is written last, so a
stopped backup leaves none (``restic_process``: the pipes, the deadline, the stop). No
Django here: the engines pass in what they know (``Repository``, a ``watch`` that asks
their database).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

from .restic_parse import (
    BackupResult,
    CheckResult,
    Node,
    Probe,
    Progress,
    Reason,
    Repository,
    ResticError,
    Snapshot,
    error_for,
    error_lines,
    line_of,
    loads,
    mask,
    progress_of,
    refusals,
    refused_removal,
    result_of,
    sftp_command,
    snapshots_of,
    subset,
    url_problem,
)
from .restic_parse import relative as _relative
from .restic_parse import relative_pattern as _relative_pattern
from .restic_parse import snapshot_id as _snapshot
from .restic_parse import tag as _tag
from .restic_process import MAX_STDERR, Hooks, collect, die_with_parent, stop

RESTIC = shutil.which("restic", path="/usr/local/bin:/usr/bin:/bin") or "/usr/bin/restic"
DEFAULT_TIMEOUT = 600.0  # seconds; a backup, check or restore is given its own
PROBE_TIMEOUT = 120.0
MAX_DUMP = 4 * 1024 * 1024
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# what restic's backends read credentials from (S3, B2, Azure, GCS, Swift; ssh's agent)
PASSED_ON = ("AWS_", "B2_", "AZURE_", "GOOGLE_", "OS_", "ST_", "SSH_AUTH_SOCK", "TMPDIR")
PASSED_ON += ("http_proxy", "https_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY")


# ----------------------------------------------------------------------------- commands


def init(repo: Repository, *, timeout: float = PROBE_TIMEOUT) -> str:
    """Create a repository at ``repo.url``; returns its id. Raises ``ResticError`` with
    reason ``exists`` when there is one already (whatever its password)."""
    done = _run(repo, ["init"], timeout=timeout)
    match = re.search(r"created restic repository ([0-9a-f]+)", done.stdout)
    return match.group(1) if match else ""


def probe(repo: Repository, *, timeout: float = PROBE_TIMEOUT) -> Probe:
    """Is there a repository, and does the password open it? Unreachable, locked, timed
    out and the like raise ``ResticError``: they answer neither question."""
    try:
        done = _run(repo, ["cat", "config"], timeout=timeout)
    except ResticError as exc:
        if exc.reason in (Reason.NO_REPOSITORY, Reason.WRONG_PASSWORD):
            return Probe(str(exc.reason), str(exc))
        raise
    config = loads(done.stdout, "cat config")
    return Probe(
        "ok",
        f"repository {config.get('id', '')[:10]} opens",
        config.get("id", ""),
        int(config.get("version", 0)),
    )


def backup(
    repo: Repository,
    directory: str,
    files: Iterable[str],
    tags: Iterable[str],
    progress: Callable[[Progress], None] | None = None,
    *,
    host: str | None = None,
    when: datetime | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    watch: Callable[[], None] | None = None,
    resolve: bool = True,
) -> BackupResult:
    """Back up exactly ``files`` (paths relative to ``directory``, no '..', no newline),
    run from inside ``directory``: the snapshot stores them under those relative names
    (``/<name>``), whatever ``directory`` is. ``progress`` gets each status line; an
    exception it raises stops restic (no snapshot is written) and is raised here.
    restic 0.14 names the new snapshot by its short id: ``resolve`` asks for the full one
    (a second call; ``listing`` gives it with the files instead)."""
    names = [_relative(name) for name in files]
    if not names:
        raise ResticError("nothing to back up", reason=Reason.INVALID)
    if not os.path.isabs(directory) or not os.path.isdir(directory):
        raise ResticError(f"not a directory: {directory!r}", reason=Reason.INVALID)
    args = ["backup", "--json", "--files-from-verbatim", "LIST"]
    args += [arg for tag in tags for arg in ("--tag", _tag(tag))]
    args += ["--host", host] if host else []
    args += ["--time", when.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")] if when else []
    summary: dict = {}

    def on_line(line: str) -> bool:
        message = line_of(line)
        kind = message.get("message_type")
        if kind == "summary":
            summary.update(message)
        elif kind == "status" and progress is not None:
            progress(progress_of(message))
        return kind in ("status", "summary")

    with tempfile.NamedTemporaryFile("w", prefix="vmbackup-restic-", suffix=".list") as listing:
        listing.write("".join(f"{name}\n" for name in names))
        listing.flush()
        args[args.index("LIST")] = listing.name
        try:
            _run(repo, args, timeout=timeout, cwd=directory, on_line=on_line, watch=watch)
        except ResticError as exc:
            if exc.returncode == 3 and summary.get("snapshot_id"):
                exc.reason, exc.snapshot_id = Reason.INCOMPLETE, summary["snapshot_id"]
            raise
    if not summary.get("snapshot_id"):
        raise ResticError("restic backup ended without a summary", argv=[RESTIC, *args])
    short = summary["snapshot_id"]
    return result_of(summary, _full_id(repo, short, timeout) if resolve else short)


def snapshots(
    repo: Repository, tags: Iterable[str] = (), *, timeout: float = DEFAULT_TIMEOUT
) -> list[Snapshot]:
    """The snapshots carrying every one of ``tags``, oldest first."""
    wanted = [_tag(tag) for tag in tags]
    args = ["snapshots", "--json"] + (["--tag", ",".join(wanted)] if wanted else [])
    return snapshots_of(loads(_run(repo, args, timeout=timeout).stdout, "snapshots") or [])


def ls(
    repo: Repository,
    snapshot: str,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    watch: Callable[[], None] | None = None,
) -> list[Node]:
    """Every file and directory in ``snapshot`` (the snapshot line itself left out)."""
    return listing(repo, snapshot, timeout=timeout, watch=watch)[1]


def listing(
    repo: Repository,
    snapshot: str,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    watch: Callable[[], None] | None = None,
) -> tuple[str, list[Node]]:
    """``ls``, and the snapshot's full id (its first line names it; "" if it did not)."""
    done = _run(repo, ["ls", "--json", _snapshot(snapshot)], timeout=timeout, watch=watch)
    full, nodes = "", []
    for line in done.stdout.splitlines():
        item = line_of(line)
        if item.get("struct_type") == "snapshot":
            full = str(item.get("id", ""))
        elif item.get("struct_type") == "node":
            size, mode = item.get("size", 0), item.get("mode", 0)
            nodes.append(Node(str(item.get("path", "")), str(item.get("type", "")), size, mode))
    return full, nodes


def check(
    repo: Repository, read_data_subset: str | None = None, *, timeout: float = DEFAULT_TIMEOUT
) -> CheckResult:
    """``restic check`` (structure; with ``read_data_subset`` — ``"10%"``, ``"1/5"``,
    ``"2G"`` — that share of the data packs read and verified too). Errors found in the
    repository are the result (``ok`` false); a check that could not run raises."""
    args = ["check"]
    if read_data_subset is not None:
        args += ["--read-data-subset", subset(read_data_subset)]
    try:
        done = _run(repo, args, timeout=timeout)
    except ResticError as exc:
        if "repository contains errors" not in exc.stderr:
            raise
        return CheckResult(False, tuple(error_lines(exc.stderr)), exc.stderr)
    return CheckResult(True, (), done.stdout)


def restore(
    repo: Repository,
    snapshot: str,
    target: str,
    *,
    include: Iterable[str] = (),
    watch: Callable[[], None] | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> None:
    """Restore ``snapshot`` (or the paths matching ``include``) below ``target``, every
    file's content verified after writing (``--verify``). A damaged pack fails the call;
    restic may still have written the other files (and a damaged one): callers restore
    into a staging directory and check SHA256SUMS before using anything. restic 0.14's
    restore reports no progress: ``watch`` is called about once a second while it runs (to
    measure what it wrote, to check for a cancel); an exception it raises stops restic."""
    if not os.path.isabs(target):
        raise ResticError(f"restore target must be absolute: {target!r}", reason=Reason.INVALID)
    args = ["restore", _snapshot(snapshot), "--target", target, "--verify"]
    args += [arg for pattern in include for arg in ("--include", _relative_pattern(pattern))]
    _run(repo, args, timeout=timeout, watch=watch)


def dump(
    repo: Repository,
    snapshot: str,
    path: str,
    *,
    max_bytes: int = MAX_DUMP,
    timeout: float = DEFAULT_TIMEOUT,
) -> bytes:
    """One small file of a snapshot (a manifest, SHA256SUMS), at most ``max_bytes``."""
    if not path.startswith("/") or "\n" in path:
        raise ResticError(f"dump needs a path as stored, '/…': {path!r}", reason=Reason.INVALID)
    done = _run(repo, ["dump", _snapshot(snapshot), path], timeout=timeout, binary=True)
    if len(done.stdout) > max_bytes:
        raise ResticError(f"{path} is larger than {max_bytes} bytes", reason=Reason.INVALID)
    return done.stdout


def forget(
    repo: Repository,
    ids: Iterable[str],
    prune: bool = False,
    *,
    timeout: float = DEFAULT_TIMEOUT,
) -> None:
    """Remove the named snapshots (``prune``: and the data only they used). A backend that
    refuses deletions (append-only) raises ``ResticError`` with reason ``append-only`` at
    its first refusal, rather than after restic's minute of retries per file."""
    chosen = [_snapshot(i) for i in ids]
    if not chosen:
        return
    args = ["forget", *(["--prune"] if prune else []), *chosen]
    _run(repo, args, timeout=timeout, on_error=refusals(repo, "forget"))


def prune(repo: Repository, *, timeout: float = DEFAULT_TIMEOUT) -> str:
    """``restic prune``: the data no snapshot uses any more removed (packs repacked when
    more than restic's default share is unused). Returns restic's summary lines.
    Refused deletions raise as for ``forget``."""
    done = _run(repo, ["prune"], timeout=timeout, on_error=refusals(repo, "prune"))
    return "\n".join(line for line in done.stdout.splitlines() if line.strip())[-4000:]


def unlock(repo: Repository, *, timeout: float = PROBE_TIMEOUT) -> None:
    """Remove stale locks only (a restic killed on this host, or older than 30 min):
    restic 0.14 does not ignore them, and a killed copy's lock blocks ``check``."""
    _run(repo, ["unlock"], timeout=timeout)


# ------------------------------------------------------------------------------ helpers


def _full_id(repo: Repository, short: str, timeout: float) -> str:
    """restic 0.14's summary names the snapshot by its short id; we keep the full one."""
    done = _run(repo, ["snapshots", "--json", _snapshot(short)], timeout=min(timeout, 600))
    found = snapshots_of(loads(done.stdout, "snapshots") or [])
    if len(found) != 1:
        raise ResticError(f"snapshot {short} written but not found again")
    return found[0].id


# ------------------------------------------------------------------------------- runner


@dataclass(frozen=True)
class _Done:
    stdout: str | bytes
    stderr: str


def _env(repo: Repository) -> dict[str, str]:
    """The child's whole environment: the repository, its password file, the cache, a
    fixed PATH, UTC (``--time``), and the backends' credentials — nothing else of ours."""
    try:
        st = os.stat(repo.password_file)
    except OSError as exc:
        raise ResticError(
            f"password file {repo.password_file} is not readable on this worker: {exc.strerror}",
            reason=Reason.PASSWORD_FILE,
        ) from exc
    if not os.path.isfile(repo.password_file) or st.st_size == 0:
        raise ResticError(
            f"password file {repo.password_file} is empty or not a file",
            reason=Reason.PASSWORD_FILE,
        )
    if st.st_mode & 0o007:
        raise ResticError(
            f"password file {repo.password_file} is readable by every user; chmod 600 it",
            reason=Reason.PASSWORD_FILE,
        )
    env = {k: v for k, v in os.environ.items() if k.startswith(PASSED_ON)}
    env.update(PATH=PATH, HOME=os.environ.get("HOME", "/root"), TZ="UTC", LC_ALL="C.UTF-8")
    env.update(
        RESTIC_REPOSITORY=repo.url, RESTIC_PASSWORD_FILE=repo.password_file, RESTIC_PROGRESS_FPS="2"
    )
    if repo.cache_dir:
        os.makedirs(repo.cache_dir, mode=0o700, exist_ok=True)
        env["RESTIC_CACHE_DIR"] = repo.cache_dir
    return env


def _argv(repo: Repository, args: list[str]) -> list[str]:
    return [RESTIC, *args, *repo.options] + ([] if repo.cache_dir else ["--no-cache"])


def _run(
    repo: Repository,
    args: list[str],
    *,
    timeout: float,
    cwd: str | None = None,
    on_line: Callable[[str], bool] | None = None,
    binary: bool = False,
    watch: Callable[[], None] | None = None,
    on_error: Callable[[str], None] | None = None,
) -> _Done:
    """Run restic to its end and return its output, or raise ``ResticError``. ``on_line``
    sees each stdout line as it comes and returns True for lines it consumed (not kept);
    ``on_error`` sees each stderr line; ``watch`` is called about once a second. Whatever
    one of them raises stops restic and is raised here."""
    if not (isinstance(timeout, int | float) and timeout > 0):
        raise ResticError(f"timeout must be positive, got {timeout!r}", reason=Reason.INVALID)
    argv = _argv(repo, args)
    env = _env(repo)
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        cwd=cwd,
        close_fds=True,
        start_new_session=True,
        preexec_fn=die_with_parent(os.getpid()),
    )
    try:
        out, err = collect(proc, time.monotonic() + timeout, Hooks(on_line, watch, on_error))
    except subprocess.TimeoutExpired:
        stop(proc)
        raise ResticError(
            f"restic {args[0]} on {repo.display} did not finish within "
            f"{timeout:g} s (unreachable or too slow?)",
            reason=Reason.TIMEOUT,
            argv=argv,
        ) from None
    except ResticError as exc:  # from on_error: restic said enough to stop it
        exc.argv = exc.argv or argv
        raise
    finally:
        stop(proc)
    stderr = mask(err.decode(errors="replace")[-MAX_STDERR:], repo.url)
    if proc.returncode != 0:
        raise error_for(repo, args[0], argv, proc.returncode, stderr)
    return _Done(out if binary else out.decode(errors="replace"), stderr)


__all__ = [
    "BackupResult",
    "CheckResult",
    "Node",
    "Probe",
    "Progress",
    "Reason",
    "Repository",
    "ResticError",
    "Snapshot",
    "backup",
    "check",
    "dump",
    "forget",
    "init",
    "listing",
    "ls",
    "mask",
    "probe",
    "prune",
    "refused_removal",
    "restore",
    "snapshots",
    "sftp_command",
    "subset",
    "unlock",
    "url_problem",
]
