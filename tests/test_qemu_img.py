"""Tests for backups.qemu_img: exact argv, validation, and behaviour against real qemu-img."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from backups import qemu_img
from backups.qemu_img import CheckResult, ImageInfo, Measure, QemuImgError
from tests.helpers import alive, wait_until

MIB = 1024 * 1024
needs_qemu = pytest.mark.skipif(
    not (shutil.which("qemu-img") and shutil.which("qemu-io")),
    reason="qemu-img and qemu-io are required",
)


# ------------------------------------------------------------------------------ helpers


class FakeRun:
    """Stands in for qemu_img._run: records calls and replays a canned result."""

    def __init__(self) -> None:
        self.calls: list[dict] = []
        self.stdout = ""
        self.stderr = ""
        self.returncode = 0

    def __call__(self, argv, timeout, *, ok_returncodes=(0,), on_stdout=None):
        self.calls.append({"argv": list(argv), "timeout": timeout, "ok": tuple(ok_returncodes)})
        if on_stdout is not None and self.stdout:
            on_stdout(self.stdout.encode())
        if self.returncode not in tuple(ok_returncodes):
            raise QemuImgError("fake failure", argv=argv, returncode=self.returncode)
        return subprocess.CompletedProcess(argv, self.returncode, self.stdout, self.stderr)

    @property
    def argv(self) -> list[str]:
        assert len(self.calls) == 1
        return self.calls[0]["argv"]


@pytest.fixture
def fake_run(monkeypatch) -> FakeRun:
    fake = FakeRun()
    monkeypatch.setattr(qemu_img, "_run", fake)
    return fake


def qemu_io(path: Path, fmt: str, command: str) -> None:
    subprocess.run(
        ["qemu-io", "-f", fmt, "-c", command, str(path)], check=True, capture_output=True
    )


def make_raw(path: Path, size: int = 4 * MIB, pattern: int = 0xAB) -> Path:
    qemu_img.create(str(path), "raw", size)
    qemu_io(path, "raw", f"write -P {pattern:#x} 0 1M")
    qemu_io(path, "raw", "write -P 0x5c 2M 512k")
    return path


def write_script(path: Path, body: str) -> Path:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return path


# ------------------------------------------------------------------------ argv: unit


INFO_JSON = {
    "virtual-size": 4 * MIB,
    "filename": "/img/top.qcow2",
    "format": "qcow2",
    "actual-size": 200704,
    "backing-filename": "base.qcow2",
    "backing-filename-format": "qcow2",
    "format-specific": {
        "type": "qcow2",
        "data": {"corrupt": True, "bitmaps": [{"name": "b1"}, {"name": "b2"}]},
    },
    "dirty-flag": True,
}


def test_it_builds_info_argv_and_parses_json(fake_run):
    fake_run.stdout = json.dumps(INFO_JSON)
    result = qemu_img.info("/img/top.qcow2", "qcow2")
    assert fake_run.argv == [
        "qemu-img",
        "info",
        "--output=json",
        "-U",
        "-f",
        "qcow2",
        "/img/top.qcow2",
    ]
    assert fake_run.calls[0]["timeout"] == 60
    assert result == ImageInfo(
        filename="/img/top.qcow2",
        format="qcow2",
        virtual_size=4 * MIB,
        actual_size=200704,
        backing_filename="base.qcow2",
        backing_format="qcow2",
        dirty=True,
        bitmaps=("b1", "b2"),
        corrupt=True,
    )


def test_it_omits_format_and_share_for_info_when_asked(fake_run):
    fake_run.stdout = json.dumps({"virtual-size": 1, "filename": "/x", "format": "raw"})
    result = qemu_img.info("/x", force_share=False, timeout=5)
    assert fake_run.argv == ["qemu-img", "info", "--output=json", "/x"]
    assert fake_run.calls[0]["timeout"] == 5
    assert (result.bitmaps, result.corrupt, result.backing_filename) == ((), False, None)


def test_it_raises_on_invalid_info_json(fake_run):
    fake_run.stdout = "not json"
    with pytest.raises(QemuImgError, match="invalid JSON"):
        qemu_img.info("/x", "raw")


def test_it_builds_create_argv(fake_run):
    qemu_img.create("/img/a.raw", "raw", 4 * MIB)
    assert fake_run.argv == ["qemu-img", "create", "-f", "raw", "/img/a.raw", "4194304"]


def test_it_builds_create_argv_with_backing(fake_run):
    qemu_img.create("/img/o.qcow2", "qcow2", MIB, backing="base.raw", backing_fmt="raw")
    assert fake_run.argv == [
        "qemu-img",
        "create",
        "-f",
        "qcow2",
        "-b",
        "base.raw",
        "-F",
        "raw",
        "/img/o.qcow2",
        "1048576",
    ]


@pytest.mark.parametrize(
    ("compression", "extra"),
    [
        ("none", []),
        ("zlib", ["-c", "-o", "compression_type=zlib", "-W"]),
        ("zstd", ["-c", "-o", "compression_type=zstd", "-W"]),
    ],
)
def test_it_builds_convert_argv(fake_run, compression, extra):
    qemu_img.convert("/s.raw", "raw", "/d.qcow2", "qcow2", compression=compression)
    assert fake_run.argv == [
        "qemu-img",
        "convert",
        "-p",
        "-U",
        "-f",
        "raw",
        "-O",
        "qcow2",
        *extra,
        "/s.raw",
        "/d.qcow2",
    ]
    assert fake_run.calls[0]["timeout"] == qemu_img.DEFAULT_TIMEOUT


def test_it_builds_convert_argv_for_existing_zero_target(fake_run):
    qemu_img.convert(
        "/s.qcow2", "qcow2", "/d.raw", "raw", force_share=False, target_is_zero=True, timeout=9
    )
    assert fake_run.argv == [
        "qemu-img",
        "convert",
        "-p",
        "-f",
        "qcow2",
        "-O",
        "raw",
        "-n",
        "--target-is-zero",
        "/s.qcow2",
        "/d.raw",
    ]
    assert fake_run.calls[0]["timeout"] == 9


def test_it_builds_convert_argv_for_a_compressed_overlay(fake_run):
    qemu_img.convert(
        "/s/.vda.push.qcow2",
        "qcow2",
        "/s/vda.qcow2",
        "qcow2",
        compression="zstd",
        backing="../p/vda.qcow2",
        backing_fmt="qcow2",
        force_share=False,
    )
    assert fake_run.argv == [
        "qemu-img",
        "convert",
        "-p",
        "-f",
        "qcow2",
        "-O",
        "qcow2",
        "-c",
        "-o",
        "compression_type=zstd",
        "-W",
        "-B",
        "../p/vda.qcow2",
        "-F",
        "qcow2",
        "/s/.vda.push.qcow2",
        "/s/vda.qcow2",
    ]


@pytest.mark.parametrize(
    ("compression", "extra"),
    [("none", []), ("zstd", ["-c", "-o", "compression_type=zstd", "-W"])],
)
def test_it_builds_convert_from_nbd_argv(fake_run, compression, extra):
    qemu_img.convert_from_nbd("/run/v/s,1/nbd.sock", "vda", "/d.qcow2", compression=compression)
    source = (
        "driver=raw,file.driver=nbd,file.server.type=unix,"
        "file.server.path=/run/v/s,,1/nbd.sock,file.export=vda"
    )
    assert fake_run.argv == [
        "qemu-img",
        "convert",
        "-p",
        "--image-opts",
        "-O",
        "qcow2",
        *extra,
        source,
        "/d.qcow2",
    ]


def test_it_builds_check_argv_and_parses_result(fake_run):
    fake_run.stdout = json.dumps({"image-end-offset": 262144, "check-errors": 0})
    result = qemu_img.check("/a.qcow2", "qcow2")
    standalone = (
        'json:{"driver":"qcow2","backing":null,"file":{"driver":"file","filename":"/a.qcow2"}}'
    )
    assert fake_run.argv == ["qemu-img", "check", "--output=json", "-U", standalone]
    assert result == CheckResult(True, 0, 0, 0, 262144, fake_run.stdout)


@pytest.mark.parametrize(
    ("rc", "payload", "ok", "corruptions", "leaks"),
    [
        (2, {"corruptions": 3, "leaks": 1, "check-errors": 0}, False, 3, 1),
        (3, {"leaks": 4, "check-errors": 0}, True, 0, 4),
    ],
)
def test_it_maps_check_exit_codes(fake_run, rc, payload, ok, corruptions, leaks):
    fake_run.returncode, fake_run.stdout = rc, json.dumps(payload)
    result = qemu_img.check("/a.raw", "raw", force_share=False)
    assert fake_run.argv == ["qemu-img", "check", "--output=json", "-f", "raw", "/a.raw"]
    assert (result.ok, result.corruptions, result.leaks) == (ok, corruptions, leaks)


def test_it_raises_when_check_could_not_complete(fake_run):
    fake_run.returncode = 1
    with pytest.raises(QemuImgError):
        qemu_img.check("/a.qcow2", "qcow2")


def test_it_builds_compare_argv(fake_run):
    assert qemu_img.compare("/a.raw", "raw", "/b.qcow2", "qcow2") is True
    assert fake_run.argv == [
        "qemu-img",
        "compare",
        "-U",
        "-f",
        "raw",
        "-F",
        "qcow2",
        "/a.raw",
        "/b.qcow2",
    ]


def test_it_builds_strict_compare_argv_and_maps_difference(fake_run):
    fake_run.returncode = 1
    assert qemu_img.compare("/a", "qcow2", "/b", "raw", strict=True, force_share=False) is False
    assert fake_run.argv == ["qemu-img", "compare", "-s", "-f", "qcow2", "-F", "raw", "/a", "/b"]


def test_it_raises_when_compare_errors(fake_run):
    fake_run.returncode = 2
    with pytest.raises(QemuImgError):
        qemu_img.compare("/a", "raw", "/b", "raw")


def test_it_builds_measure_argv(fake_run):
    fake_run.stdout = json.dumps({"required": 393216, "fully-allocated": 4521984})
    assert qemu_img.measure("/a.raw", "raw") == Measure(393216, 4521984)
    assert fake_run.argv == [
        "qemu-img",
        "measure",
        "--output=json",
        "-U",
        "-f",
        "raw",
        "-O",
        "qcow2",
        "/a.raw",
    ]


def test_it_builds_rebase_argv_with_backing(fake_run):
    qemu_img.rebase("/img/o.qcow2", "qcow2", "base.qcow2", "qcow2")
    assert fake_run.argv == [
        "qemu-img",
        "rebase",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        "/img/o.qcow2",
    ]


def test_it_builds_standalone_rebase_argv(fake_run):
    qemu_img.rebase("/img/o.qcow2", "qcow2", None, None)
    assert fake_run.argv == ["qemu-img", "rebase", "-f", "qcow2", "-b", "", "/img/o.qcow2"]


def test_it_builds_unsafe_rebase_argv(fake_run):
    qemu_img.rebase("/o.qcow2", "qcow2", "/b.raw", "raw", unsafe=True)
    assert fake_run.argv == [
        "qemu-img",
        "rebase",
        "-f",
        "qcow2",
        "-u",
        "-b",
        "/b.raw",
        "-F",
        "raw",
        "/o.qcow2",
    ]


def test_it_builds_commit_argv(fake_run):
    qemu_img.commit("/img/o.qcow2", "qcow2")
    assert fake_run.argv == ["qemu-img", "commit", "-f", "qcow2", "/img/o.qcow2"]


# --------------------------------------------------------------------------- validation


BAD_PATHS = ["relative.qcow2", "-x", "json:{}", 'JSON:{"file": "/etc/shadow"}', "/a\x00b", "/a\nb"]


@pytest.mark.parametrize("bad", BAD_PATHS)
def test_it_rejects_bad_paths_before_running(fake_run, bad):
    calls = [
        lambda: qemu_img.info(bad, "qcow2"),
        lambda: qemu_img.create(bad, "qcow2", MIB),
        lambda: qemu_img.convert(bad, "raw", "/d", "qcow2"),
        lambda: qemu_img.convert("/s", "raw", bad, "qcow2"),
        lambda: qemu_img.check(bad, "qcow2"),
        lambda: qemu_img.compare("/a", "raw", bad, "raw"),
        lambda: qemu_img.measure(bad, "raw"),
        lambda: qemu_img.rebase(bad, "qcow2", None, None),
        lambda: qemu_img.commit(bad, "qcow2"),
    ]
    for call in calls:
        with pytest.raises(QemuImgError):
            call()
    with pytest.raises(QemuImgError):
        qemu_img.validate_path(bad)
    assert fake_run.calls == []


def test_it_returns_valid_paths_unchanged():
    assert qemu_img.validate_path("/var/lib/vm disk:1.qcow2") == "/var/lib/vm disk:1.qcow2"


@pytest.mark.parametrize("fmt", ["vmdk", "QCOW2", "", None, "qcow2 "])
def test_it_rejects_formats_outside_the_allow_list(fake_run, fmt):
    for call in [
        lambda: qemu_img.info("/a", fmt or "bogus"),
        lambda: qemu_img.create("/a", fmt, MIB),
        lambda: qemu_img.convert("/a", "raw", "/b", fmt),
        lambda: qemu_img.check("/a", fmt),
        lambda: qemu_img.compare("/a", fmt, "/b", "raw"),
        lambda: qemu_img.measure("/a", "raw", fmt),
        lambda: qemu_img.rebase("/a", "qcow2", "b", fmt),
        lambda: qemu_img.commit("/a", fmt),
    ]:
        with pytest.raises(QemuImgError):
            call()
    assert fake_run.calls == []


@pytest.mark.parametrize(
    "kwargs",
    [
        {"dst_fmt": "raw", "compression": "zstd"},
        {"dst_fmt": "qcow2", "compression": "lz4"},
        {"dst_fmt": "qcow2", "compression": "zstd", "target_is_zero": True},
        {"dst_fmt": "qcow2", "timeout": 0},
        {"dst_fmt": "raw", "backing": "b.qcow2", "backing_fmt": "qcow2"},
        {"dst_fmt": "qcow2", "backing": "b.qcow2"},
        {"dst_fmt": "qcow2", "backing_fmt": "qcow2"},
        {"dst_fmt": "qcow2", "backing": "nbd:h:1", "backing_fmt": "qcow2"},
        {"dst_fmt": "qcow2", "backing": "b.qcow2", "backing_fmt": "qcow2", "target_is_zero": True},
    ],
)
def test_it_rejects_bad_convert_options(fake_run, kwargs):
    with pytest.raises(QemuImgError):
        qemu_img.convert("/s", "raw", "/d", **kwargs)
    assert fake_run.calls == []


def test_it_refuses_to_convert_a_file_onto_itself(fake_run, tmp_path):
    (tmp_path / "a").write_bytes(b"x")
    os.link(tmp_path / "a", tmp_path / "b")
    for dst in [tmp_path / "a", tmp_path / "sub" / ".." / "a", tmp_path / "b"]:
        with pytest.raises(QemuImgError, match="same file"):
            qemu_img.convert(str(tmp_path / "a"), "raw", str(dst), "raw")
    assert fake_run.calls == []


@pytest.mark.parametrize("backing", ["-b", "json:{}", "nbd:host:10809", "a\nb", ""])
def test_it_rejects_bad_backing_names(fake_run, backing):
    with pytest.raises(QemuImgError):
        qemu_img.rebase("/o.qcow2", "qcow2", backing, "qcow2")
    with pytest.raises(QemuImgError):
        qemu_img.create("/o.qcow2", "qcow2", MIB, backing=backing, backing_fmt="qcow2")
    assert fake_run.calls == []


def test_it_requires_backing_format_together_with_backing(fake_run):
    with pytest.raises(QemuImgError):
        qemu_img.create("/o", "qcow2", MIB, backing="b.qcow2")
    with pytest.raises(QemuImgError):
        qemu_img.rebase("/o", "qcow2", "b.qcow2", None)
    with pytest.raises(QemuImgError):
        qemu_img.rebase("/o", "qcow2", None, "qcow2")
    with pytest.raises(QemuImgError):
        qemu_img.create("/o", "raw", MIB, backing="/b", backing_fmt="raw")
    with pytest.raises(QemuImgError):
        qemu_img.create("/o", "raw", -1)
    assert fake_run.calls == []


# ----------------------------------------------------------------- runner and progress


PROGRESS = "".join(f"    ({p}.00/100%%)\\r" for p in range(0, 101, 5))  # printf format


def fake_clock(monkeypatch, step: float) -> None:
    """qemu_img's clock moves ``step`` seconds at each reading, so what the throttle lets
    through depends on the output, not on how fast this machine reads it."""
    now = [1000.0]

    def monotonic() -> float:
        now[0] += step
        return now[0]

    monkeypatch.setattr(qemu_img, "time", SimpleNamespace(monotonic=monotonic))


def progress_script(tmp_path: Path) -> Path:
    """0 % to 100 % twice, as a copy of two disks' worth would print it."""
    return write_script(tmp_path / "fake-qemu-img", f"printf '{PROGRESS}{PROGRESS}\\n'\n")


def test_it_reports_progress_throttled_and_finishes_at_one(monkeypatch, tmp_path):
    monkeypatch.setattr(qemu_img, "QEMU_IMG", str(progress_script(tmp_path)))
    fake_clock(monkeypatch, step=0)  # all 42 lines within one throttle interval
    seen: list[float] = []
    qemu_img.convert("/s.raw", "raw", "/d.qcow2", "qcow2", progress=seen.append)
    assert seen == [0.0, 1.0]  # the first line, then "done" once (100 % lines are not)


def test_it_reports_progress_again_once_the_interval_has_passed(monkeypatch, tmp_path):
    monkeypatch.setattr(qemu_img, "QEMU_IMG", str(progress_script(tmp_path)))
    fake_clock(monkeypatch, step=qemu_img.PROGRESS_INTERVAL)  # each line an interval later
    seen: list[float] = []
    qemu_img.convert("/s.raw", "raw", "/d.qcow2", "qcow2", progress=seen.append)
    assert seen == [p / 100 for p in range(0, 100, 5)] * 2 + [1.0]


def test_it_kills_the_process_group_on_timeout(monkeypatch, tmp_path):
    pidfile = tmp_path / "pid"
    script = write_script(tmp_path / "slow-qemu-img", f"echo $$ > {pidfile}\nsleep 30\n")
    monkeypatch.setattr(qemu_img, "QEMU_IMG", str(script))
    start = time.monotonic()
    with pytest.raises(QemuImgError, match="timed out") as excinfo:
        qemu_img.convert("/s.raw", "raw", "/d.qcow2", "qcow2", timeout=0.5)
    assert time.monotonic() - start < 5
    assert excinfo.value.argv[:2] == [str(script), "convert"]
    assert_group_gone(int(pidfile.read_text()))


def test_it_kills_qemu_img_when_the_progress_callback_raises(monkeypatch, tmp_path):
    pidfile = tmp_path / "pid"
    script = write_script(
        tmp_path / "fake-qemu-img", f"echo $$ > {pidfile}\nprintf '(1.00/100%%)\\r'\nsleep 30\n"
    )
    monkeypatch.setattr(qemu_img, "QEMU_IMG", str(script))

    def explode(fraction):
        raise RuntimeError("job cancelled")

    with pytest.raises(RuntimeError, match="job cancelled"):
        qemu_img.convert("/s.raw", "raw", "/d.qcow2", "qcow2", progress=explode, timeout=10)
    assert_group_gone(int(pidfile.read_text()))


def test_it_times_out_plain_calls_too(monkeypatch, tmp_path):
    script = write_script(tmp_path / "slow-qemu-img", "exec sleep 30\n")
    monkeypatch.setattr(qemu_img, "QEMU_IMG", str(script))
    with pytest.raises(QemuImgError, match="timed out"):
        qemu_img.info("/a.raw", "raw", timeout=0.2)


def assert_group_gone(pgid: int) -> None:
    """No process of the group is left once SIGKILL has had a moment to land."""
    wait_until(lambda: not _live_members(pgid), 2, lambda: f"alive: {_live_members(pgid)}")


def _live_members(pgid: int) -> list[int]:
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(entry.name))
    return members


def test_it_reports_a_missing_binary(monkeypatch, tmp_path):
    monkeypatch.setattr(qemu_img, "QEMU_IMG", str(tmp_path / "nope"))
    with pytest.raises(QemuImgError, match="not found"):
        qemu_img.commit("/a", "qcow2")


def test_it_carries_stderr_and_returncode_of_a_failing_command(monkeypatch, tmp_path):
    script = write_script(tmp_path / "bad", "echo 'boom: on fire' >&2\nexit 5\n")
    monkeypatch.setattr(qemu_img, "QEMU_IMG", str(script))
    with pytest.raises(QemuImgError) as excinfo:
        qemu_img.commit("/a", "qcow2")
    err = excinfo.value
    assert "boom: on fire" in str(err)
    assert (err.returncode, err.stderr.strip()) == (5, "boom: on fire")
    assert err.argv == [str(script), "commit", "-f", "qcow2", "/a"]


# ------------------------------------------------------------------- real qemu-img


@needs_qemu
def test_it_creates_and_inspects_real_images(tmp_path):
    raw = make_raw(tmp_path / "a.raw")
    qcow = tmp_path / "a.qcow2"
    qemu_img.create(str(qcow), "qcow2", 4 * MIB)
    subprocess.run(["qemu-img", "bitmap", "--add", "-f", "qcow2", str(qcow), "bm0"], check=True)

    raw_info = qemu_img.info(str(raw), "raw")
    assert (raw_info.format, raw_info.virtual_size) == ("raw", 4 * MIB)
    assert (raw_info.bitmaps, raw_info.corrupt, raw_info.backing_filename) == ((), False, None)
    qcow_info = qemu_img.info(str(qcow), "qcow2")
    assert (qcow_info.format, qcow_info.virtual_size) == ("qcow2", 4 * MIB)
    assert (qcow_info.dirty, qcow_info.corrupt, qcow_info.bitmaps) == (False, False, ("bm0",))
    assert qcow_info.actual_size > 0
    assert qemu_img.info(str(qcow)).format == "qcow2"  # probing, for our own outputs


@needs_qemu
def test_it_converts_with_zstd_and_compares(tmp_path):
    raw = make_raw(tmp_path / "a.raw")
    out = tmp_path / "a.qcow2"
    seen: list[float] = []
    qemu_img.convert(str(raw), "raw", str(out), "qcow2", compression="zstd", progress=seen.append)
    assert seen[-1] == 1.0
    assert qemu_img.info(str(out), "qcow2").virtual_size == 4 * MIB
    assert qemu_img.compare(str(raw), "raw", str(out), "qcow2") is True

    copy = tmp_path / "copy.raw"
    shutil.copyfile(raw, copy)
    with open(copy, "r+b") as f:
        f.seek(12345)
        f.write(b"\x00")
    assert qemu_img.compare(str(copy), "raw", str(out), "qcow2") is False
    assert qemu_img.compare(str(copy), "raw", str(copy), "raw", strict=True) is True


def test_it_builds_convert_argv_for_a_direct_write(fake_run):
    qemu_img.convert("/b/x.qcow2", "qcow2", "/r/x.qcow2", "qcow2", direct=True)
    argv = fake_run.calls[-1]["argv"]
    assert argv[argv.index("-t") + 1] == "none" and argv[-2:] == ["/b/x.qcow2", "/r/x.qcow2"]
    qemu_img.convert("/b/x.qcow2", "qcow2", "/r/x.qcow2", "qcow2")
    assert "-t" not in fake_run.calls[-1]["argv"]


@needs_qemu
def test_a_direct_write_copies_what_a_cached_one_does(tmp_path):
    """Where the filesystem has O_DIRECT (``direct_io``: tmpfs only since Linux 6.6)."""
    raw = make_raw(tmp_path / "a.raw")
    out = tmp_path / "a.qcow2"
    out.touch()
    assert qemu_img.direct_io(str(out)) is True  # the test disk's filesystem
    qemu_img.convert(str(raw), "raw", str(out), "qcow2", direct=True)
    assert qemu_img.compare(str(raw), "raw", str(out), "qcow2") is True
    assert qemu_img.direct_io(str(tmp_path / "missing")) is False


@needs_qemu
def test_it_converts_only_the_top_layer_onto_a_backing_file(tmp_path):
    """-B: data and explicit zeros of the overlay, nothing of its backing, compressed."""
    (tmp_path / "p").mkdir()
    (tmp_path / "s").mkdir()
    base = tmp_path / "p" / "vda.qcow2"
    qemu_img.create(str(base), "qcow2", 8 * MIB)
    qemu_io(base, "qcow2", "write -P 0x11 0 4M")
    top = tmp_path / "s" / ".vda.push.qcow2"
    qemu_img.create(str(top), "qcow2", 8 * MIB, backing="../p/vda.qcow2", backing_fmt="qcow2")
    for command in ("write -P 0x22 1M 512k", "write -z 2M 256k", "write -P 0x33 6M 64k"):
        qemu_io(top, "qcow2", command)
    out = tmp_path / "s" / "vda.qcow2"
    qemu_img.convert(
        str(top),
        "qcow2",
        str(out),
        "qcow2",
        compression="zstd",
        backing="../p/vda.qcow2",
        backing_fmt="qcow2",
        force_share=False,
    )
    info = qemu_img.info(str(out), "qcow2")
    assert (info.backing_filename, info.backing_format) == ("../p/vda.qcow2", "qcow2")
    assert qemu_img.compare(str(top), "qcow2", str(out), "qcow2") is True
    assert out.stat().st_size < MIB  # the base's 4 MiB were not copied
    mapped = subprocess.run(
        ["qemu-img", "map", "--output=json", "-f", "qcow2", str(out)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    own = [(e["start"], e["length"], e["zero"]) for e in json.loads(mapped) if e["depth"] == 0]
    assert own == [(MIB, MIB // 2, False), (2 * MIB, MIB // 4, True), (6 * MIB, 65536, False)]


@needs_qemu
def test_it_converts_into_an_existing_zero_target(tmp_path):
    raw = make_raw(tmp_path / "a.raw")
    dst = tmp_path / "b.qcow2"
    qemu_img.create(str(dst), "qcow2", 4 * MIB)
    qemu_img.convert(str(raw), "raw", str(dst), "qcow2", target_is_zero=True)
    assert qemu_img.compare(str(raw), "raw", str(dst), "qcow2") is True


@needs_qemu
def test_it_includes_qemu_stderr_when_the_source_is_missing(tmp_path):
    missing = str(tmp_path / "missing.raw")
    with pytest.raises(QemuImgError, match="No such file or directory") as excinfo:
        qemu_img.convert(missing, "raw", str(tmp_path / "out.qcow2"), "qcow2")
    assert excinfo.value.returncode == 1
    assert "missing.raw" in excinfo.value.stderr
    with pytest.raises(QemuImgError, match="No such file or directory"):
        qemu_img.info(missing, "raw")


@needs_qemu
def test_it_checks_real_images(tmp_path):
    qcow = tmp_path / "a.qcow2"
    qemu_img.create(str(qcow), "qcow2", 4 * MIB)
    qemu_io(qcow, "qcow2", "write -P 0xab 0 1M")
    result = qemu_img.check(str(qcow), "qcow2")
    assert (result.ok, result.corruptions, result.leaks, result.check_errors) == (True, 0, 0, 0)
    assert result.image_end_offset and result.image_end_offset > MIB

    raw_result = qemu_img.check(str(make_raw(tmp_path / "a.raw")), "raw")
    assert raw_result.ok and raw_result.image_end_offset is None
    assert "does not support checks" in raw_result.output


@needs_qemu
def test_it_detects_corruption_and_leaks(tmp_path):
    corrupt = tmp_path / "corrupt.qcow2"
    qemu_img.create(str(corrupt), "qcow2", 4 * MIB)
    qemu_io(corrupt, "qcow2", "write -P 0xab 0 1M")
    refcount_block = _refcount_block_offset(corrupt)
    with open(corrupt, "r+b") as f:  # every in-use cluster now claims refcount 0
        f.seek(refcount_block)
        f.write(b"\x00" * 512)
    result = qemu_img.check(str(corrupt), "qcow2")
    assert not result.ok and result.corruptions > 0
    assert "refcount=0" in result.output

    leaky = tmp_path / "leaky.qcow2"
    qemu_img.create(str(leaky), "qcow2", 4 * MIB)
    refcount_block = _refcount_block_offset(leaky)
    with open(leaky, "r+b") as f:  # claim cluster 10 is used although nothing points at it
        f.seek(refcount_block + 2 * 10)
        f.write(struct.pack(">H", 1))
        f.truncate(11 * 65536)
    result = qemu_img.check(str(leaky), "qcow2")
    assert (result.ok, result.corruptions, result.leaks) == (True, 0, 1)


def _refcount_block_offset(path: Path) -> int:
    with open(path, "rb") as f:
        header = f.read(104)
        (table_offset,) = struct.unpack(">Q", header[48:56])
        f.seek(table_offset)
        (block_offset,) = struct.unpack(">Q", f.read(8))
    return block_offset


@needs_qemu
def test_it_measures_real_images(tmp_path):
    raw = make_raw(tmp_path / "a.raw")
    result = qemu_img.measure(str(raw), "raw")
    assert 1 * MIB < result.required < result.fully_allocated
    assert result.fully_allocated >= 4 * MIB
    assert qemu_img.measure(str(raw), "raw", "raw").required == 4 * MIB


@needs_qemu
def test_it_rebases_an_overlay_to_standalone(tmp_path):
    base = make_raw(tmp_path / "base.raw")
    overlay = tmp_path / "overlay.qcow2"
    qemu_img.create(str(overlay), "qcow2", 4 * MIB, backing=str(base), backing_fmt="raw")
    qemu_io(overlay, "qcow2", "write -P 0x11 512k 1M")
    chain = tmp_path / "chain.raw"  # flattened reference of base+overlay
    qemu_img.convert(str(overlay), "qcow2", str(chain), "raw")
    info = qemu_img.info(str(overlay), "qcow2")
    assert (info.backing_filename, info.backing_format) == (str(base), "raw")

    qemu_img.rebase(str(overlay), "qcow2", None, None)
    info = qemu_img.info(str(overlay), "qcow2")
    assert (info.backing_filename, info.backing_format) == (None, None)
    base.unlink()
    assert qemu_img.compare(str(chain), "raw", str(overlay), "qcow2") is True


@needs_qemu
def test_it_rebases_onto_a_relative_backing_name(tmp_path):
    base = make_raw(tmp_path / "base.raw")
    overlay = tmp_path / "overlay.qcow2"
    qemu_img.create(str(overlay), "qcow2", 4 * MIB, backing="base.raw", backing_fmt="raw")
    assert qemu_img.info(str(overlay), "qcow2").backing_filename == "base.raw"
    shutil.copyfile(base, tmp_path / "renamed.raw")
    base.unlink()

    qemu_img.rebase(str(overlay), "qcow2", "renamed.raw", "raw", unsafe=True)
    info = qemu_img.info(str(overlay), "qcow2")
    assert (info.backing_filename, info.backing_format) == ("renamed.raw", "raw")
    assert qemu_img.compare(str(tmp_path / "renamed.raw"), "raw", str(overlay), "qcow2")

    other = make_raw(tmp_path / "other.raw", pattern=0xCD)
    qemu_img.rebase(str(overlay), "qcow2", "other.raw", "raw")  # safe: content preserved
    assert qemu_img.info(str(overlay), "qcow2").backing_filename == "other.raw"
    assert qemu_img.compare(str(tmp_path / "renamed.raw"), "raw", str(overlay), "qcow2")
    assert not qemu_img.compare(str(other), "raw", str(overlay), "qcow2")


@needs_qemu
def test_it_commits_an_overlay_into_its_base(tmp_path):
    base = tmp_path / "base.qcow2"
    qemu_img.create(str(base), "qcow2", 4 * MIB)
    qemu_io(base, "qcow2", "write -P 0xab 0 1M")
    overlay = tmp_path / "overlay.qcow2"
    qemu_img.create(str(overlay), "qcow2", 4 * MIB, backing="base.qcow2", backing_fmt="qcow2")
    qemu_io(overlay, "qcow2", "write -P 0x22 1M 1M")
    assert not qemu_img.compare(str(base), "qcow2", str(overlay), "qcow2")

    qemu_img.commit(str(overlay), "qcow2")
    assert qemu_img.compare(str(base), "qcow2", str(overlay), "qcow2")
    qemu_io(base, "qcow2", "read -P 0x22 1M 1M")  # raises if the data did not land in base


@needs_qemu
def test_it_checks_an_image_without_opening_a_hostile_backing_file(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    top = tmp_path / "top.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-f", "qcow2", "-u", "-b", str(fifo), "-F", "raw", str(top), "1M"],
        check=True,
        capture_output=True,
    )
    started = time.monotonic()
    assert qemu_img.check(str(top), "qcow2", timeout=20).ok
    info = qemu_img.info(str(top), "qcow2", timeout=20)
    assert info.backing_filename == str(fifo) and info.data_file is None
    assert time.monotonic() - started < 10  # a FIFO opened for reading would block forever


@needs_qemu
def test_it_kills_qemu_img_when_the_process_that_started_it_dies(tmp_path):
    """A command killed mid-copy (TERM, KILL, OOM) must not leave qemu-img rewriting a
    backup on its own; the child is started by a Python process that is then killed."""
    script = tmp_path / "parent.py"
    pidfile = tmp_path / "qemu-img.pid"
    fake = tmp_path / "bin" / "qemu-img"
    fake.parent.mkdir()
    fake.write_text(f"#!/bin/sh\necho $$ > {pidfile}\nexec sleep 300\n")
    fake.chmod(0o755)
    script.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(Path(__file__).resolve().parent.parent)!r})\n"
        "from backups import qemu_img\n"
        f"qemu_img.QEMU_IMG = {str(fake)!r}\n"
        "qemu_img.info('/nonexistent.qcow2', 'qcow2', timeout=300)\n"
    )
    parent = subprocess.Popen([sys.executable, str(script)])
    child = int(wait_until(lambda: pidfile.exists() and pidfile.read_text().strip(), 20))
    parent.kill()
    parent.wait()
    wait_until(lambda: not alive(child), 10, "qemu-img outlived the process that started it")
