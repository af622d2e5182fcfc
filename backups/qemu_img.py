"""The only place in vmbackup that runs qemu-img.

Disk images are guest-controlled data, and qemu-img happily interprets a filename
such as ``json:{...}`` or ``nbd://host/x`` as a recipe for opening something else, and
probes the format of anything it is not told about.  Keeping every invocation in one
module lets us enforce, in one place, the rules that make that safe: argv lists (no
shell), explicit ``-f``/``-F`` formats, validated paths, a timeout on every call, and
errors that carry qemu-img's own stderr so an operator can act on them.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import selectors
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

QEMU_IMG = "qemu-img"
DEFAULT_TIMEOUT = 3600  # seconds

FORMATS = frozenset({"qcow2", "raw"})
COMPRESSIONS = frozenset({"none", "zlib", "zstd"})
PROGRESS_INTERVAL = 0.5  # seconds between progress callbacks

# `qemu-img check` exit codes (see qemu-img(1)).
# 1 (check could not complete) and anything else is an error.
_CHECK_OK, _CHECK_CORRUPT, _CHECK_LEAKS, _CHECK_UNSUPPORTED = 0, 2, 3, 63
_PROGRESS_RE = re.compile(rb"\((\d+(?:\.\d+)?)/100%\)")
_PR_SET_PDEATHSIG = 1
try:  # resolved once here: the child between fork and exec should do as little as possible
    _prctl = ctypes.CDLL(None, use_errno=True).prctl
except (AttributeError, OSError):  # not Linux: children may outlive a killed parent there
    _prctl = None


class QemuImgError(Exception):
    """Raised for anything that keeps a qemu-img call from giving a usable answer.

    Attributes: argv (list[str]|None), returncode (int|None), stderr (str).  A
    validation error has argv None, because nothing was run.
    """

    def __init__(
        self,
        message: str,
        *,
        argv: list[str] | None = None,
        returncode: int | None = None,
        stderr: str = "",
    ) -> None:
        super().__init__(message)
        self.argv = argv
        self.returncode = returncode
        self.stderr = stderr


@dataclass(frozen=True)
class ImageInfo:
    filename: str
    format: str
    virtual_size: int
    actual_size: int
    backing_filename: str | None
    backing_format: str | None
    dirty: bool
    bitmaps: tuple[str, ...]
    corrupt: bool
    data_file: str | None = None  # qcow2 external data file: guest data read from elsewhere


@dataclass(frozen=True)
class CheckResult:
    ok: bool
    corruptions: int
    leaks: int
    check_errors: int
    image_end_offset: int | None
    output: str


@dataclass(frozen=True)
class Measure:
    required: int
    fully_allocated: int


def _check_name(value: object, what: str) -> str:
    """Reject the spellings qemu-img treats as options or as inline block-graph recipes."""
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str) or not value:
        raise QemuImgError(f"{what} must be a non-empty string, got {value!r}")
    if "\x00" in value or "\n" in value or "\r" in value:
        raise QemuImgError(f"{what} contains NUL or newline: {value!r}")
    if value.startswith("-"):
        raise QemuImgError(f"{what} must not start with '-': {value!r}")
    if value.lower().startswith("json:"):
        raise QemuImgError(f"{what} must not be a json: pseudo-filename: {value!r}")
    return value


def validate_path(path: str) -> str:
    """Make sure qemu-img will see `path` as a plain local file and nothing else.

    Absolute paths also rule out protocol prefixes (``nbd:``, ``http:``...), which
    qemu only recognises when the colon comes before any slash.
    """
    path = _check_name(path, "path")
    if not os.path.isabs(path):
        raise QemuImgError(f"path must be absolute: {path!r}")
    return path


def _validate_backing(backing: str) -> str:
    """Backing names are stored verbatim in the overlay and resolved against its directory,
    so relative names are legitimate; a colon before the first slash would make qemu parse
    the name as a protocol, so it is refused."""
    backing = _check_name(backing, "backing file")
    if not os.path.isabs(backing) and ":" in backing.split("/", 1)[0]:
        raise QemuImgError(f"backing file looks like a protocol URL: {backing!r}")
    return backing


def _validate_format(fmt: object) -> str:
    """An explicit, known format is what stops qemu-img from probing guest-written data."""
    if not isinstance(fmt, str) or fmt not in FORMATS:
        raise QemuImgError(f"unsupported image format {fmt!r}; expected one of {sorted(FORMATS)}")
    return fmt  # type: ignore[return-value]


def _validate_timeout(timeout: float) -> float:
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout > 0:
        raise QemuImgError(f"timeout must be a positive number of seconds, got {timeout!r}")
    return timeout


def _share(force_share: bool) -> list[str]:
    return ["-U"] if force_share else []


def _die_with_parent(parent: int) -> Callable[[], None]:
    """qemu-img runs in its own session (a Ctrl-C meant for a command must not tear an image
    half-written), so nothing would stop it when the command or worker that started it is
    killed: it would go on rewriting a backup nobody journals any more, or hold a file open
    forever.  The kernel kills it instead when its parent dies (``PR_SET_PDEATHSIG``).

    The kernel's "parent" is the thread that forked, so qemu-img is only ever run from the
    thread that runs the job (a command's or a django-q2 worker's main thread), never from
    a short-lived one such as the hashing pool or the heartbeat."""

    def child() -> None:
        if _prctl is not None:
            _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before the line above took effect
            os._exit(1)

    return child


def _kill(proc: subprocess.Popen) -> None:
    """qemu-img runs in its own session, so killing the group also takes any wrapper's
    children and guarantees nobody is left holding our pipes open."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _collect(
    proc: subprocess.Popen, deadline: float, on_stdout: Callable[[bytes], None] | None
) -> tuple[bytes, bytes]:
    """Drain both pipes together (so neither can fill up and stall qemu-img) while
    honouring the deadline, which a blocking read could not."""
    chunks: dict[int, list[bytes]] = {proc.stdout.fileno(): [], proc.stderr.fileno(): []}
    with selectors.DefaultSelector() as sel:
        for pipe in (proc.stdout, proc.stderr):
            sel.register(pipe, selectors.EVENT_READ)
        while sel.get_map():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise subprocess.TimeoutExpired(proc.args, 0)
            for key, _ in sel.select(remaining):
                data = os.read(key.fd, 65536)
                if not data:
                    sel.unregister(key.fileobj)
                    continue
                chunks[key.fd].append(data)
                if on_stdout is not None and key.fileobj is proc.stdout:
                    on_stdout(data)
    proc.wait(max(deadline - time.monotonic(), 0.001))
    return b"".join(chunks[proc.stdout.fileno()]), b"".join(chunks[proc.stderr.fileno()])


def _execute(
    argv: list[str], timeout: float, on_stdout: Callable[[bytes], None] | None
) -> subprocess.CompletedProcess:
    executable = shutil.which(QEMU_IMG)
    if executable is None:
        raise QemuImgError(f"{QEMU_IMG} not found on PATH", argv=argv)
    deadline = time.monotonic() + timeout
    try:
        proc = subprocess.Popen(
            [executable, *argv[1:]],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
            preexec_fn=_die_with_parent(os.getpid()),
        )
    except OSError as exc:
        raise QemuImgError(f"cannot run {executable}: {exc}", argv=argv) from exc
    with proc:
        try:
            out, err = _collect(proc, deadline, on_stdout)
        except subprocess.TimeoutExpired as exc:
            _kill(proc)
            raise QemuImgError(
                f"qemu-img {argv[1]} timed out after {timeout:g} s (killed)", argv=argv
            ) from exc
        except BaseException:
            _kill(proc)
            raise
    return subprocess.CompletedProcess(
        argv, proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")
    )


def _run(
    argv: list[str],
    timeout: float,
    *,
    ok_returncodes: Iterable[int] = (0,),
    on_stdout: Callable[[bytes], None] | None = None,
) -> subprocess.CompletedProcess:
    """Every qemu-img invocation funnels through here, so tests can replace this one
    function and the house rules (timeout, rc check, stderr in errors) hold everywhere.

    `argv[0]` is nominal; the binary actually run is `QEMU_IMG` resolved on PATH.
    """
    proc = _execute(argv, timeout, on_stdout)
    if proc.returncode not in tuple(ok_returncodes):
        stderr = proc.stderr.strip()
        raise QemuImgError(
            f"qemu-img {argv[1]} failed (exit {proc.returncode}): {stderr or '(no stderr)'}",
            argv=argv,
            returncode=proc.returncode,
            stderr=proc.stderr,
        )
    return proc


def _json(proc: subprocess.CompletedProcess) -> dict:
    try:
        data = json.loads(proc.stdout)
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
    except ValueError as exc:
        message = f"qemu-img {proc.args[1]} printed invalid JSON: {exc}"
        raise QemuImgError(message, argv=proc.args, stderr=proc.stderr) from exc
    return data


def info(
    path: str, fmt: str | None = None, *, force_share: bool = True, timeout: float = 60
) -> ImageInfo:
    """Describe an image.

    `fmt=None` lets qemu-img probe the format.  Only do that for files vmbackup wrote
    itself: probing a guest's raw disk lets the guest choose how the host reads it
    (a raw disk whose data starts with a qcow2 header would be trusted as qcow2).
    `force_share` (-U) is what allows inspecting a disk a running VM holds locked.
    """
    path = validate_path(path)
    fmt_args = [] if fmt is None else ["-f", _validate_format(fmt)]
    argv = [QEMU_IMG, "info", "--output=json", *_share(force_share), *fmt_args, path]
    data = _json(_run(argv, _validate_timeout(timeout)))
    specific = (data.get("format-specific") or {}).get("data") or {}
    return ImageInfo(
        filename=data.get("filename", path),
        format=data["format"],
        virtual_size=int(data["virtual-size"]),
        actual_size=int(data.get("actual-size", 0)),
        backing_filename=data.get("backing-filename"),
        backing_format=data.get("backing-filename-format"),
        dirty=bool(data.get("dirty-flag", False)),
        bitmaps=tuple(b["name"] for b in specific.get("bitmaps", ())),
        corrupt=bool(specific.get("corrupt", False)),
        data_file=specific.get("data-file"),
    )


def _backing_args(backing: str | None, backing_fmt: str | None) -> list[str]:
    """A backing file without its format would make qemu probe it, hence both or neither."""
    if backing is None:
        if backing_fmt is not None:
            raise QemuImgError("backing_fmt given without backing")
        return []
    if backing_fmt is None:
        raise QemuImgError("backing_fmt is required when backing is given")
    return ["-b", _validate_backing(backing), "-F", _validate_format(backing_fmt)]


def create(
    path: str,
    fmt: str,
    size: int,
    *,
    backing: str | None = None,
    backing_fmt: str | None = None,
    timeout: float = 60,
) -> None:
    """Create an empty image, or a qcow2 overlay when `backing` is given.

    `backing` is stored as written, so a relative name stays relative to the
    overlay's directory and the chain survives being moved as a whole.
    """
    path, fmt = validate_path(path), _validate_format(fmt)
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise QemuImgError(f"size must be a non-negative int, got {size!r}")
    if backing is not None and fmt != "qcow2":
        raise QemuImgError(f"format {fmt} cannot have a backing file")
    backing_args = _backing_args(backing, backing_fmt)
    argv = [QEMU_IMG, "create", "-f", fmt, *backing_args, path, str(size)]
    _run(argv, _validate_timeout(timeout))


class _Progress:
    """Turns qemu-img's ``(12.34/100%)\\r`` stream into throttled fraction callbacks, so a
    caller updating a database row is not called thousands of times."""

    def __init__(self, callback: Callable[[float], None] | None) -> None:
        self.callback = callback
        self.pending = b""
        self.last_call = float("-inf")

    def feed(self, data: bytes) -> None:
        *lines, self.pending = re.split(rb"[\r\n]", self.pending + data)
        for line in lines:
            match = _PROGRESS_RE.search(line)
            if not match or time.monotonic() - self.last_call < PROGRESS_INTERVAL:
                continue
            fraction = max(float(match.group(1)) / 100.0, 0.0)
            if fraction < 1.0:  # 1.0 is left to finish(): it means "done and succeeded"
                self._emit(fraction)

    def _emit(self, fraction: float) -> None:
        self.last_call = time.monotonic()
        if self.callback is not None:
            self.callback(fraction)

    def finish(self) -> None:
        self._emit(1.0)


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)  # also catches hard links
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def _convert_options(dst_fmt: str, compression: str, target_is_zero: bool) -> list[str]:
    """Compression always comes with ``-W``: qcow2 compresses each cluster on a worker
    thread, but with writes kept in order only one cluster is ever being compressed."""
    if compression not in COMPRESSIONS:
        raise QemuImgError(f"unknown compression {compression!r}; use {sorted(COMPRESSIONS)}")
    options = []
    if compression != "none":
        if dst_fmt != "qcow2":
            raise QemuImgError(f"compression needs qcow2 output, not {dst_fmt}")
        if target_is_zero:
            # With -n qemu-img ignores -o, so the requested algorithm would silently be lost.
            raise QemuImgError("compression cannot be combined with target_is_zero")
        options += ["-c", "-o", f"compression_type={compression}", "-W"]
    if target_is_zero:
        options += ["-n", "--target-is-zero"]
    return options


def _convert_backing(dst_fmt: str, backing: str | None, backing_fmt: str | None) -> list[str]:
    if backing is None and backing_fmt is None:
        return []
    if dst_fmt != "qcow2":
        raise QemuImgError(f"format {dst_fmt} cannot have a backing file")
    return ["-B", *_backing_args(backing, backing_fmt)[1:]]


def convert(
    src: str,
    src_fmt: str,
    dst: str,
    dst_fmt: str,
    *,
    compression: str = "none",
    progress: Callable[[float], None] | None = None,
    force_share: bool = True,
    timeout: float = DEFAULT_TIMEOUT,
    target_is_zero: bool = False,
    backing: str | None = None,
    backing_fmt: str | None = None,
    direct: bool = False,
) -> None:
    """Copy an image into a new file, optionally qcow2-compressed.

    Uncompressed, writes stay ordered (no ``-W``) and the default 8 coroutines are kept:
    that keeps the output layout sequential and the benefit of more parallelism on local
    disks is small.  `target_is_zero` means DST already exists (made by `create`) and is
    known to read as zeros, so qemu-img writes into it (``-n``) and skips zeroing.

    `backing` (``-B``, with its format) makes DST an overlay of it, stored as written
    (relative to DST's directory), and copies only what SRC's own top layer holds: data
    and explicit zeros, never what SRC leaves to its backing file.  That re-writes an
    incremental image compressed as an incremental.  qemu-img opens SRC's backing chain
    and BACKING's: the caller checks their headers first.

    `direct` writes DST around the page cache (``-t none``: O_DIRECT), for an output
    nobody reads back soon (a restored disk): no page cache to fill — on a guest whose
    freed memory the host takes back, filling it cost several times the copy in system
    time — and nothing left dirty for the fsync after. The filesystem must support
    O_DIRECT (tmpfs does not): ask ``direct_io`` first.

    On failure a partially written DST is left in place on purpose: callers write into
    a staging directory and own its cleanup, and deleting here could race with them.
    """
    src, dst = validate_path(src), validate_path(dst)
    src_fmt, dst_fmt = _validate_format(src_fmt), _validate_format(dst_fmt)
    options = _convert_options(dst_fmt, compression, target_is_zero)
    options += _convert_backing(dst_fmt, backing, backing_fmt)
    if backing is not None and target_is_zero:
        raise QemuImgError("a backing file cannot be combined with target_is_zero")
    if _same_file(src, dst):
        # qemu-img would truncate DST before reading SRC, and -U defeats its lock.
        raise QemuImgError(f"convert source and destination are the same file: {src}")
    argv = [QEMU_IMG, "convert", "-p", *_share(force_share), "-f", src_fmt, "-O", dst_fmt]
    argv += [*(["-t", "none"] if direct else []), *options, src, dst]
    tracker = _Progress(progress)
    _run(argv, _validate_timeout(timeout), on_stdout=tracker.feed)
    tracker.finish()


def direct_io(path: str) -> bool:
    """Can ``path`` (an existing regular file, ours) be written with O_DIRECT?"""
    flags = os.O_WRONLY | os.O_DIRECT | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        os.close(os.open(validate_path(path), flags))
    except OSError:  # EINVAL: the filesystem has no O_DIRECT (tmpfs)
        return False
    return True


def convert_from_nbd(
    socket: str,
    export: str,
    dst: str,
    *,
    compression: str = "none",
    progress: Callable[[float], None] | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> None:
    """Copy a disk that QEMU exports over NBD on a unix socket (libvirt's pull-mode backup).

    The source is given as ``--image-opts`` rather than an ``nbd+unix://`` URL: the
    socket path contains the VM's name, and option values only need commas doubled.
    Compressed, writes may land out of order (``-W``, see ``_convert_options``);
    uncompressed they stay ordered: ``-W`` measured no faster here (bench/README.md,
    "push or pull").
    """
    socket = validate_path(socket)
    if not export or any(c in export for c in "\0\n\r"):
        raise QemuImgError(f"bad NBD export name: {export!r}")
    options = _convert_options("qcow2", compression, False)
    source = "driver=raw,file.driver=nbd,file.server.type=unix,file.server.path={},file.export={}"
    source = source.format(socket.replace(",", ",,"), export.replace(",", ",,"))
    argv = [QEMU_IMG, "convert", "-p", "--image-opts", "-O", "qcow2", *options, source]
    argv.append(validate_path(dst))
    tracker = _Progress(progress)
    _run(argv, _validate_timeout(timeout), on_stdout=tracker.feed)
    tracker.finish()


def check(
    path: str, fmt: str, *, force_share: bool = True, timeout: float = DEFAULT_TIMEOUT
) -> CheckResult:
    """Verify the metadata of this one image.

    The backing chain is never opened (``"backing": null``): a check is about this file,
    and the backing name in its header is guest-reachable data that might name a FIFO, a
    device or a host file; callers compare it with what they expect (``info``) instead.
    Leaks are wasted space, not lost data, so they leave `ok` True.  Raw images have no
    metadata to check; qemu-img refuses (exit 63) and we report that as ok rather than
    making every caller special-case raw.  `output` holds stdout and stderr, since the
    per-cluster ERROR lines a human needs go to stderr.
    """
    path, fmt = validate_path(path), _validate_format(fmt)
    if fmt == "qcow2":
        spec = {"driver": fmt, "backing": None, "file": {"driver": "file", "filename": path}}
        target = ["json:" + json.dumps(spec, separators=(",", ":"))]
    else:
        target = ["-f", fmt, path]
    argv = [QEMU_IMG, "check", "--output=json", *_share(force_share), *target]
    ok_codes = (_CHECK_OK, _CHECK_CORRUPT, _CHECK_LEAKS, _CHECK_UNSUPPORTED)
    proc = _run(argv, _validate_timeout(timeout), ok_returncodes=ok_codes)
    output = "\n".join(s for s in (proc.stdout.strip(), proc.stderr.strip()) if s)
    if proc.returncode == _CHECK_UNSUPPORTED:
        return CheckResult(True, 0, 0, 0, None, output)
    data = _json(proc)
    corruptions = int(data.get("corruptions", 0))
    check_errors = int(data.get("check-errors", 0))
    return CheckResult(
        ok=corruptions == 0 and check_errors == 0,
        corruptions=corruptions,
        leaks=int(data.get("leaks", 0)),
        check_errors=check_errors,
        image_end_offset=data.get("image-end-offset"),
        output=output,
    )


def compare(
    a: str,
    a_fmt: str,
    b: str,
    b_fmt: str,
    *,
    strict: bool = False,
    force_share: bool = True,
    timeout: float = DEFAULT_TIMEOUT,
) -> bool:
    """Compare guest-visible contents, which is what a restore has to reproduce.

    Non-strict mode treats unallocated and zeroed areas as equal and ignores a size
    difference if the extra tail is zero; `strict` makes both count as differences.
    """
    a, b = validate_path(a), validate_path(b)
    a_fmt, b_fmt = _validate_format(a_fmt), _validate_format(b_fmt)
    argv = [QEMU_IMG, "compare", *_share(force_share), *(["-s"] if strict else [])]
    argv += ["-f", a_fmt, "-F", b_fmt, a, b]
    proc = _run(argv, _validate_timeout(timeout), ok_returncodes=(0, 1))
    return proc.returncode == 0


def measure(
    src: str, src_fmt: str, out_fmt: str = "qcow2", *, force_share: bool = True, timeout: float = 60
) -> Measure:
    """Estimate the space a converted copy needs, so free space can be checked first."""
    src, src_fmt, out_fmt = validate_path(src), _validate_format(src_fmt), _validate_format(out_fmt)
    argv = [QEMU_IMG, "measure", "--output=json", *_share(force_share)]
    argv += ["-f", src_fmt, "-O", out_fmt, src]
    data = _json(_run(argv, _validate_timeout(timeout)))
    return Measure(required=int(data["required"]), fully_allocated=int(data["fully-allocated"]))


def rebase(
    path: str,
    fmt: str,
    backing: str | None,
    backing_fmt: str | None,
    *,
    unsafe: bool = False,
    timeout: float = DEFAULT_TIMEOUT,
) -> None:
    """Point an image at a different backing file, or with `backing=None` copy in all
    data from the old chain so the image stands alone.

    Safe mode (the default) copies whatever differs between old and new backing, so
    the guest-visible content is unchanged.  `unsafe` (-u) only rewrites the header,
    which is right when the backing file was merely renamed or moved.  A relative
    `backing` is resolved by qemu against PATH's directory.
    """
    path, fmt = validate_path(path), _validate_format(fmt)
    standalone = backing is None and backing_fmt is None
    backing_args = ["-b", ""] if standalone else _backing_args(backing, backing_fmt)
    argv = [QEMU_IMG, "rebase", "-f", fmt, *(["-u"] if unsafe else []), *backing_args, path]
    _run(argv, _validate_timeout(timeout))


def commit(path: str, fmt: str, *, timeout: float = DEFAULT_TIMEOUT) -> None:
    """Merge an overlay into its backing file (the backing format comes from the
    overlay's header, which vmbackup always writes with -F)."""
    path, fmt = validate_path(path), _validate_format(fmt)
    _run([QEMU_IMG, "commit", "-f", fmt, path], _validate_timeout(timeout))
