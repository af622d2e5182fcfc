"""What restic says, as values: the repository a call is about, the frozen results of its
``--json`` output, and its errors turned into a ``Reason`` an operator can act on (restic
0.14 exits 1 for nearly everything: the reason is read from its stderr). Pure, no process
run here: ``restic`` runs it and re-exports these names.
"""

from __future__ import annotations

import contextlib
import enum
import json
import os
import re
import signal
from dataclasses import dataclass, field
from datetime import datetime
from urllib.parse import urlsplit

SCHEMES = ("local", "sftp", "rest", "s3", "b2", "azure", "gs", "swift")
SSH = "/usr/bin/ssh"
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
# sftp://[user@]host[:port]/path and sftp:[user@]host:path, as restic reads them
_SFTP_URL_RE = re.compile(r"^sftp://(?:([^@/]*)@)?(\[[^\]/]*\]|[^:/@\[\]]*)(?::([^/]*))?/")
_SFTP_SHORT_RE = re.compile(r"^sftp:(?:([^@/:]*)@)?(\[[^\]/]*\]|[^:/@\[\]]*):")
_SSH_USER_RE = re.compile(r"^[A-Za-z0-9_.][A-Za-z0-9_.-]*$")
_SSH_HOST_RE = re.compile(r"^(?:[A-Za-z0-9][A-Za-z0-9.-]*|\[[0-9A-Fa-f:.]+\])$")
_SSH_CONFIG_RE = re.compile(r"^/[A-Za-z0-9._/+-]+$")
_SUBSET_RE = re.compile(r"^(?:(\d+(?:\.\d+)?)%|[1-9]\d*/[1-9]\d*|[1-9]\d*[kKmMgGtT]?)$")
_SNAPSHOT_RE = re.compile(r"^[0-9a-f]{8,64}$")


class Reason(enum.StrEnum):
    """Why a call failed; kept on copies and repositories as data."""

    WRONG_PASSWORD = "wrong-password"
    NO_REPOSITORY = "no-repository"
    EXISTS = "exists"  # init: there is a repository already
    UNREACHABLE = "unreachable"
    LOCKED = "locked"
    TIMEOUT = "timeout"
    PASSWORD_FILE = "password-file"
    INCOMPLETE = "incomplete"  # backup: a snapshot was written without some files
    INVALID = "invalid"  # refused before anything ran
    APPEND_ONLY = "append-only"  # forget/prune: the repository refuses deletions
    STOPPED = "stopped"  # cancelled or interrupted by us
    FAILED = "failed"


class ResticError(Exception):
    """Anything that keeps a restic call from giving a usable answer.

    ``reason`` (a ``Reason``), ``argv`` (None when nothing ran), ``returncode``, ``stderr``
    (masked, bounded) and, for an incomplete backup, the ``snapshot_id`` it wrote anyway."""

    def __init__(
        self,
        message: str,
        *,
        reason: Reason = Reason.FAILED,
        argv=None,
        returncode=None,
        stderr: str = "",
        snapshot_id: str = "",
    ) -> None:
        super().__init__(message)
        self.reason = reason
        self.argv = argv
        self.returncode = returncode
        self.stderr = stderr
        self.snapshot_id = snapshot_id


def url_problem(url: str) -> str | None:
    """Why ``url`` is not a repository URL vmbackup hands to restic (None: it is).

    A local absolute path or one of restic's backends. The sftp backend runs ``ssh`` with
    the host from the URL: a host or user starting with '-' would be an ssh option
    (``-oProxyCommand=…`` runs a program), so it is refused, like any control character."""
    if not isinstance(url, str) or not url or _CONTROL_RE.search(url) or url != url.strip():
        return "the repository URL must be one line without leading or trailing spaces"
    if url.startswith("/"):
        return None
    scheme, _, rest = url.partition(":")
    if scheme not in SCHEMES or not rest:
        return f"the repository must be an absolute path or start with one of {', '.join(SCHEMES)}:"
    if scheme == "local":
        return None if rest.startswith("/") else "local: needs an absolute path"
    if scheme == "sftp":
        target = rest[2:].split("/", 1)[0] if rest.startswith("//") else rest.split(":", 1)[0]
        parts = re.split(r"[@:]", target)
        if not target or any(p.startswith("-") for p in parts) or " " in target:
            return f"sftp: bad user or host in {mask(url)!r}"
    if scheme == "rest" and not rest.startswith(("http://", "https://")):
        return "rest: needs an http:// or https:// URL"
    return None


def sftp_command(url: str, ssh_config: str) -> str:
    """restic's ``sftp.command`` for an sftp URL: ssh with the admin's configuration file
    (``VMBACKUP_SSH_CONFIG``: keys, known hosts, options — never from the database, since
    the command runs a program) and the user, host and port of the URL, nothing else.
    restic splits the value like a shell, so every piece is plain: no space, no quote."""
    match = _SFTP_URL_RE.match(url) or _SFTP_SHORT_RE.match(url)
    if match is None:
        raise ResticError(f"not an sftp repository URL: {mask(url)!r}", reason=Reason.INVALID)
    user, host = match.group(1), match.group(2)
    port = match.group(3) if match.re.groups == 3 else None
    if user is not None and not _SSH_USER_RE.match(user):
        raise ResticError(f"sftp: bad user in {mask(url)!r}", reason=Reason.INVALID)
    if not _SSH_HOST_RE.match(host or ""):
        raise ResticError(f"sftp: bad host in {mask(url)!r}", reason=Reason.INVALID)
    if port is not None and not (port.isdigit() and 0 < int(port) < 65536):
        raise ResticError(f"sftp: bad port in {mask(url)!r}", reason=Reason.INVALID)
    if not _SSH_CONFIG_RE.match(ssh_config) or "/../" in ssh_config + "/":
        raise ResticError(
            f"the ssh configuration must be an absolute path of letters, digits and ._/+-: "
            f"{ssh_config!r}",
            reason=Reason.INVALID,
        )
    target = f"{user}@{host.strip('[]')}" if user else host.strip("[]")
    return " ".join([SSH, "-F", ssh_config, *(["-p", port] if port else []), target, "-s", "sftp"])


def mask(text: str, url: str | None = None) -> str:
    """``text`` with the password of any ``scheme://user:password@`` (and of ``url``) hidden."""
    secret = _url_secret(url) if url else ""
    if secret:
        text = text.replace(secret, "***")
    return re.sub(r"(://[^/@\s:]*:)[^/@\s]*@", r"\1***@", text)


def _url_secret(url: str) -> str:
    with contextlib.suppress(ValueError):
        return urlsplit(url.partition(":")[2] if url.startswith("rest:") else url).password or ""
    return ""


@dataclass(frozen=True)
class Repository:
    """Where a repository is and how it is opened; what every function here takes.

    ``password_file`` is a path on the machine that runs restic (the worker host): the
    password never passes through vmbackup. ``cache_dir`` is restic's local cache (a
    private directory of ours; None: ``--no-cache``). ``ssh_config``: the ssh client
    configuration an sftp repository is reached with (None: restic's own ssh call)."""

    url: str
    password_file: str
    cache_dir: str | None = None
    ssh_config: str | None = None

    def __post_init__(self) -> None:
        problem = url_problem(self.url)
        if problem:
            raise ResticError(problem, reason=Reason.INVALID)
        for path in (self.password_file, self.cache_dir, self.ssh_config):
            if path is not None and not (isinstance(path, str) and os.path.isabs(path)):
                raise ResticError(f"not an absolute path: {path!r}", reason=Reason.INVALID)
        if self.ssh_config and self.url.startswith("sftp:"):
            sftp_command(self.url, self.ssh_config)  # refused here, before anything runs

    @property
    def options(self) -> list[str]:
        """Extended options (``-o``) restic gets for this repository."""
        if self.ssh_config and self.url.startswith("sftp:"):
            return ["-o", f"sftp.command={sftp_command(self.url, self.ssh_config)}"]
        return []

    @property
    def display(self) -> str:
        """The URL as messages show it (a password in it masked)."""
        return mask(self.url, self.url)


@dataclass(frozen=True)
class Probe:
    """What ``probe`` found: ``ok`` (the password opens it), ``no-repository`` or
    ``wrong-password``; ``repository_id`` and ``version`` when ok."""

    state: str
    message: str
    repository_id: str = ""
    version: int = 0

    @property
    def ok(self) -> bool:
        return self.state == "ok"


@dataclass(frozen=True)
class Progress:
    """One status line of ``restic backup --json``."""

    fraction: float
    bytes_done: int
    total_bytes: int
    files_done: int
    total_files: int


@dataclass(frozen=True)
class BackupResult:
    snapshot_id: str  # the full id
    bytes_added: int  # new data after deduplication, before compression
    files_new: int
    files_changed: int
    files_unmodified: int
    total_files: int
    total_bytes: int
    duration: float


@dataclass(frozen=True)
class Snapshot:
    id: str
    short_id: str
    time: datetime
    hostname: str
    paths: tuple[str, ...]
    tags: tuple[str, ...]

    def tag(self, key: str) -> str | None:
        """The value of a ``key=value`` tag, if the snapshot has one."""
        prefix = key + "="
        return next((t[len(prefix) :] for t in self.tags if t.startswith(prefix)), None)


@dataclass(frozen=True)
class Node:
    """One entry of ``restic ls``: ``path`` as stored (``/dir/file``), ``type`` file, dir,
    symlink, …"""

    path: str
    type: str
    size: int
    mode: int


@dataclass(frozen=True)
class CheckResult:
    ok: bool
    errors: tuple[str, ...]
    output: str = field(repr=False, default="")


def line_of(line: str) -> dict:
    try:
        value = json.loads(line)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def loads(text: str, what: str):
    try:
        return json.loads(text)
    except ValueError as exc:
        raise ResticError(f"restic {what} did not answer JSON: {text[:200]!r}") from exc


def progress_of(message: dict) -> Progress:
    return Progress(
        float(message.get("percent_done", 0.0)),
        int(message.get("bytes_done", 0)),
        int(message.get("total_bytes", 0)),
        int(message.get("files_done", 0)),
        int(message.get("total_files", 0)),
    )


def result_of(summary: dict, full_id: str) -> BackupResult:
    number = lambda key: int(summary.get(key, 0))  # noqa: E731
    return BackupResult(
        snapshot_id=full_id,
        bytes_added=number("data_added"),
        files_new=number("files_new"),
        files_changed=number("files_changed"),
        files_unmodified=number("files_unmodified"),
        total_files=number("total_files_processed"),
        total_bytes=number("total_bytes_processed"),
        duration=float(summary.get("total_duration", 0.0)),
    )


def snapshots_of(items: list) -> list[Snapshot]:
    found = []
    for item in items if isinstance(items, list) else []:
        when = datetime.fromisoformat(str(item.get("time", "")))
        found.append(
            Snapshot(
                str(item.get("id", "")),
                str(item.get("short_id", "")),
                when,
                str(item.get("hostname", "")),
                tuple(item.get("paths") or ()),
                tuple(item.get("tags") or ()),
            )
        )
    return sorted(found, key=lambda s: s.time)


_UNREACHABLE = (
    "connection refused",
    "no route to host",
    "no such host",
    "network is unreachable",
    "i/o timeout",
    "connection reset",
    "connection timed out",
    "unable to start the sftp",
    "host key verification failed",
    "permission denied (publickey",
    "could not resolve",
    "tls handshake",
    "x509:",
    "server response unexpected",
)


def error_for(repo: Repository, command: str, argv, returncode: int, stderr: str) -> ResticError:
    """restic 0.14 exits 1 for almost everything: the reason is read from stderr."""
    text = stderr.lower()
    where = repo.display
    if "wrong password or no key found" in text:
        reason, message = (
            Reason.WRONG_PASSWORD,
            (
                f"wrong password: the password in {repo.password_file} does not open the "
                f"repository at {where}"
            ),
        )
    elif "config file already exists" in text:
        reason, message = Reason.EXISTS, f"there is already a repository at {where}"
    elif "already locked" in text:
        reason, message = (
            Reason.LOCKED,
            (
                f"the repository at {where} is locked by another restic process ("
                + _first(stderr, "locked")
                + "); if that process is gone, it is a stale lock "
                "(a killed copy) that reconcile or `restic unlock` removes"
            ),
        )
    elif any(pattern in text for pattern in _UNREACHABLE):
        reason, message = (
            Reason.UNREACHABLE,
            (f"repository at {where} is unreachable: " + _first(stderr)),
        )
    elif "is there a repository at the following location" in text or (
        "unable to open config file" in text and "no such file" in text
    ):
        reason, message = Reason.NO_REPOSITORY, f"there is no restic repository at {where}"
    elif "resolving password failed" in text or "empty password" in text:
        reason, message = (
            Reason.PASSWORD_FILE,
            (f"restic could not read the password from {repo.password_file}: " + _first(stderr)),
        )
    elif returncode in (130, -signal.SIGINT, -signal.SIGKILL):
        reason, message = Reason.STOPPED, f"restic {command} was stopped"
    else:
        reason, message = Reason.FAILED, f"restic {command} failed: " + _first(stderr)
    return ResticError(message, reason=reason, argv=argv, returncode=returncode, stderr=stderr)


def _lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]


def _first(stderr: str, containing: str = "") -> str:
    """The line that says what happened: restic's ``Fatal:`` line, else the last one."""
    lines = _lines(stderr)
    chosen = [ln for ln in lines if containing and containing in ln]
    chosen = chosen or [ln for ln in lines if ln.startswith("Fatal:")] or lines[-1:]
    return (chosen[0].removeprefix("Fatal: ") if chosen else "(no message)")[:500]


def error_lines(stderr: str) -> list[str]:
    noise = ("using temporary cache", "create exclusive lock", "load indexes", "check ")
    return [ln for ln in _lines(stderr) if not ln.startswith(noise)][:50]


# ---------------------------------------------------------------- arguments, checked first


def subset(value: str) -> str:
    """A ``--read-data-subset`` value restic accepts (``x%`` with 0 < x <= 100, ``n/t``,
    a size): checked here so a typo fails before a long check starts."""
    match = _SUBSET_RE.match(str(value))
    percent = match and match.group(1)
    if not match or (percent is not None and not 0 < float(percent) <= 100):
        raise ResticError(
            f"bad --read-data-subset {value!r}: use e.g. 10%, 1/5 or 2G", reason=Reason.INVALID
        )
    return str(value)


def relative(name: str) -> str:
    parts = name.split("/") if isinstance(name, str) else [""]
    bad = not name or name.startswith("/") or "\n" in name or "\r" in name
    if bad or any(p in ("", ".", "..") for p in parts):
        raise ResticError(f"not a plain relative file name: {name!r}", reason=Reason.INVALID)
    return name


def relative_pattern(pattern: str) -> str:
    if not pattern.startswith("/") or _CONTROL_RE.search(pattern) or "/../" in pattern + "/":
        raise ResticError(f"include pattern must be '/…': {pattern!r}", reason=Reason.INVALID)
    return pattern


def tag(value: str) -> str:
    if not isinstance(value, str) or not value or "," in value or _CONTROL_RE.search(value):
        raise ResticError(f"a tag must be non-empty, without ',': {value!r}", reason=Reason.INVALID)
    return value


def snapshot_id(value: str) -> str:
    if not isinstance(value, str) or not _SNAPSHOT_RE.match(value):
        raise ResticError(f"not a snapshot id: {value!r}", reason=Reason.INVALID)
    return value


# ------------------------------------------------------------ deletions a backend refuses

# restic retries a failed Remove ten times (about 45 s) per file: ``Remove(<snapshot/…>)
# returned error, retrying after …: <cause>``. These causes will not change on a retry: the
# backend does not allow deleting — rest-server --append-only answers 403, an S3 bucket
# with object lock or a write-only key denies access, a local path is immutable
# (chattr +i) or read-only.
_REFUSED = (
    "server response: 403",
    "forbidden",
    "accessdenied",
    "access denied",
    "operation not permitted",
    "permission denied",
    "read-only file system",
)
_REMOVE_RE = re.compile(r"^Remove\(<(\w+)/[0-9a-f]*>\) returned error, retrying after [^:]+: (.*)$")


def refused_removal(line: str) -> str | None:
    """The cause, when ``line`` (of restic's stderr) says a deletion was refused by the
    backend itself (not a passing network error); None otherwise. Lock files do not count:
    an append-only rest-server lets restic remove its own locks."""
    match = _REMOVE_RE.match(line.strip())
    if not match or match.group(1) == "lock":
        return None
    cause = match.group(2)
    return cause if any(word in cause.lower() for word in _REFUSED) else None


def refusals(repo: Repository, command: str):
    """An ``on_error`` for ``forget``/``prune``: the first refused deletion raises (reason
    ``append-only``), which stops restic before its retries."""

    def on_error(line: str) -> None:
        cause = refused_removal(line)
        if cause is not None:
            raise ResticError(
                f"the repository at {repo.display} refuses deletions ({mask(cause, repo.url)}): "
                "it is append-only (e.g. rest-server --append-only) or its files are "
                f"immutable; restic {command} is left to its owner",
                reason=Reason.APPEND_ONLY,
            )

    return on_error
