"""Tests for backups.archive.instructions: RESTORE.md text, and restore.sh run for real with sh
and qemu-img."""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import subprocess
from datetime import timedelta
from pathlib import Path

import pytest

from backups import qemu_img
from backups.archive import instructions
from tests.helpers import (
    WHEN,
    disk,
    flip_byte,
    full_filler,
    incremental_filler,
    manifest,
    needs_tools,
    publish_backup,
    qemu_io,
    raw_source,
    wait_until,
)

HOSTILE_VM = 'it\'s a "vm" $(touch pwned)'
HOSTILE_TARGET = "vd'a\"`touch pwned`$(touch pwned);x"


def run_restore(backup: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    argv = ["sh", str(backup / "restore.sh"), *args]
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=60)


def nvram_filler(source: Path, **kwargs):
    """A full backup that also carries an NVRAM file."""
    convert = full_filler(source, **kwargs)

    def fill(staging: Path) -> list[dict]:
        (staging / "nvram.fd").write_bytes(b"\x01UEFI vars" * 100)
        return convert(staging)

    return fill


@pytest.fixture
def source(tmp_path: Path) -> Path:
    return raw_source(tmp_path / "source.raw")


@pytest.fixture
def full(root: Path, source: Path) -> Path:
    return publish_backup(root, "web", 4, nvram_filler(source), nvram="nvram.fd")


@pytest.fixture
def incremental(root: Path, full: Path) -> Path:
    return publish_backup(
        root,
        "web",
        5,
        incremental_filler(full),
        when=WHEN + timedelta(hours=1),
        kind="incremental",
        parent=full.name,
        method="push",
    )


@pytest.fixture
def dest(tmp_path: Path) -> Path:
    path = tmp_path / "dest"
    path.mkdir()
    return path


# ---------------------------------------------------------------------- restore.sh, real


@needs_tools
def test_it_restores_a_full_backup_into_the_given_directory(full, source, tmp_path):
    dest = tmp_path / "new" / "dir"

    result = run_restore(full, str(dest), cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    assert qemu_img.compare(str(dest / "vda.raw"), "raw", str(source), "raw")
    assert (dest / "vda.raw").stat().st_size == source.stat().st_size
    assert (dest / "nvram.fd").read_bytes() == (full / "nvram.fd").read_bytes()
    assert sorted(p.name for p in dest.iterdir()) == ["nvram.fd", "vda.raw"]
    assert "virsh define" in result.stdout


@needs_tools
def test_it_restores_into_the_current_directory_by_default(full, source, dest):
    result = run_restore(full, cwd=dest)

    assert result.returncode == 0, result.stderr
    assert qemu_img.compare(str(dest / "vda.raw"), "raw", str(source), "raw")


@needs_tools
def test_it_flattens_an_incremental_chain(incremental, source, dest, tmp_path):
    expected = tmp_path / "expected.raw"
    shutil.copyfile(source, expected)
    qemu_io(expected, "raw", "write -P 0xcd 128k 64k")  # what incremental_filler changed

    result = run_restore(incremental, str(dest), cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    restored = str(dest / "vda.raw")
    assert qemu_img.info(restored, "raw").backing_filename is None
    assert qemu_img.compare(restored, "raw", str(expected), "raw")
    assert Path(restored).stat().st_size == expected.stat().st_size
    assert not qemu_img.compare(restored, "raw", str(source), "raw")


@needs_tools
def test_it_checks_the_whole_chain(incremental, full, tmp_path):
    result = run_restore(incremental, "--check", cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    assert f"Checking {incremental}" in result.stdout
    assert f"Checking {full}" in result.stdout


@needs_tools
def test_it_quotes_hostile_names(root, source, dest, tmp_path):
    target = HOSTILE_TARGET
    backup = publish_backup(
        root,
        HOSTILE_VM,
        4,
        nvram_filler(source, target=target),
        nvram="nvram.fd",
        vm_uuid="$(touch pwned)",
    )

    result = run_restore(backup, str(dest), cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    assert qemu_img.compare(str(dest / f"{target}.raw"), "raw", str(source), "raw")
    assert HOSTILE_VM in result.stdout
    assert list(tmp_path.rglob("pwned")) == []
    assert not (Path.cwd() / "pwned").exists()


@needs_tools
def test_it_refuses_to_overwrite_an_existing_file(full, dest):
    (dest / "vda.raw").write_text("keep me")

    result = run_restore(full, str(dest), cwd=dest)

    assert result.returncode != 0
    assert "refusing to overwrite" in result.stderr
    assert (dest / "vda.raw").read_text() == "keep me"
    assert sorted(p.name for p in dest.iterdir()) == ["vda.raw"]


@needs_tools
def test_it_refuses_to_overwrite_copied_files_too(full, dest):
    (dest / "nvram.fd").write_text("keep me")

    result = run_restore(full, str(dest), cwd=dest)

    assert result.returncode != 0
    assert (dest / "nvram.fd").read_text() == "keep me"
    assert not (dest / "vda.raw").exists()


@needs_tools
def test_it_aborts_on_a_checksum_mismatch(full, dest):
    flip_byte(full / "vda.qcow2")

    result = run_restore(full, str(dest), cwd=dest)

    assert result.returncode != 0
    assert "checksum mismatch" in result.stderr
    assert list(dest.iterdir()) == []


@needs_tools
def test_it_aborts_when_the_parent_backup_is_corrupt_or_gone(incremental, full, dest):
    flip_byte(full / "vda.qcow2")
    corrupt = run_restore(incremental, str(dest), cwd=dest)
    shutil.rmtree(full)
    gone = run_restore(incremental, str(dest), cwd=dest)

    assert corrupt.returncode != 0 and "failed its check" in corrupt.stderr
    assert gone.returncode != 0 and "is missing" in gone.stderr
    assert list(dest.iterdir()) == []


def fake_qemu_img(tmp_path: Path, body: str) -> dict:
    """An environment whose PATH finds a qemu-img shim first: it logs the argv of
    ``convert`` and runs ``body`` for it; the header checks before (``info``) run for real."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shim = bin_dir / "qemu-img"
    log = tmp_path / "argv.log"
    real = shlex.quote(shutil.which("qemu-img"))
    shim.write_text(
        f'#!/bin/sh\n[ "$1" = convert ] || exec {real} "$@"\n'
        f'printf "%s\\n" "$@" > {shlex.quote(str(log))}\n{body}\n'
    )
    shim.chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}


@needs_tools
def test_it_runs_qemu_img_with_explicit_formats(full, dest, tmp_path):
    real = shutil.which("qemu-img")
    env = fake_qemu_img(tmp_path, f'exec {real} "$@"')

    argv = ["sh", str(full / "restore.sh"), str(dest)]
    result = subprocess.run(argv, cwd=dest, env=env, capture_output=True, text=True, timeout=60)

    assert result.returncode == 0, result.stderr
    logged = (tmp_path / "argv.log").read_text().splitlines()
    # -t none: the test disk's filesystem has O_DIRECT (restore.sh asks dd first)
    expected = "convert -p -t none -f qcow2 -O raw ./vda.qcow2".split()
    assert logged == [*expected, f"{dest}/vda.raw.partial"]
    assert (dest / "vda.raw").exists() and not (dest / "vda.raw.partial").exists()


@needs_tools
def test_it_removes_a_half_written_disk_when_qemu_img_fails(full, dest, tmp_path):
    env = fake_qemu_img(tmp_path, 'for last; do :; done\necho junk > "$last"\nexit 1')

    argv = ["sh", str(full / "restore.sh"), str(dest)]
    result = subprocess.run(argv, cwd=dest, env=env, capture_output=True, text=True, timeout=60)

    assert result.returncode != 0
    assert list(dest.iterdir()) == []


def overlapping_tools(tmp_path: Path) -> dict:
    """qemu-img and hasher shims (openssl and sha256sum, whichever the script uses):
    qemu-img leaves a mark and runs the real one; a hasher runs the real one only once the
    mark is there (a script checking first and converting after would wait here in vain
    and say so)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    mark = shlex.quote(str(tmp_path / "converting"))
    real_img = shutil.which("qemu-img")
    (bin_dir / "qemu-img").write_text(f'#!/bin/sh\ntouch {mark}\nexec {real_img} "$@"\n')
    for hasher in ("openssl", "sha256sum"):
        (bin_dir / hasher).write_text(
            "#!/bin/sh\n"
            f"i=0; while [ ! -e {mark} ]; do i=$((i + 1)); "
            "[ $i -lt 100 ] || { echo NO OVERLAP >&2; exit 1; }; sleep 0.1; done\n"
            f'exec {shutil.which(hasher)} "$@"\n'
        )
    for shim in bin_dir.iterdir():
        shim.chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}


def path_without_openssl(tmp_path: Path) -> dict:
    """An environment whose PATH offers every tool restore.sh uses but openssl."""
    bin_dir = tmp_path / "no-openssl"
    bin_dir.mkdir()
    tools = "sh dirname find head sed mkdir mv rm cp sleep sha256sum qemu-img".split()
    for tool in tools:
        (bin_dir / tool).symlink_to(shutil.which(tool))
    return {**os.environ, "PATH": str(bin_dir)}


def logging_openssl(tmp_path: Path) -> tuple[dict, Path]:
    """An openssl shim that logs its arguments and runs the real one."""
    bin_dir = tmp_path / "log-openssl"
    bin_dir.mkdir()
    log = tmp_path / "openssl.log"
    shim = bin_dir / "openssl"
    real = shlex.quote(shutil.which("openssl"))
    shim.write_text(f'#!/bin/sh\necho "$*" >> {shlex.quote(str(log))}\nexec {real} "$@"\n')
    shim.chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}, log


needs_openssl = pytest.mark.skipif(not shutil.which("openssl"), reason="openssl is required")


@needs_tools
@needs_openssl
def test_it_checks_with_openssl_when_it_is_installed(incremental, full, dest, tmp_path):
    env, log = logging_openssl(tmp_path)

    argv = ["sh", str(incremental / "restore.sh"), str(dest)]
    result = subprocess.run(argv, cwd=dest, env=env, capture_output=True, text=True, timeout=60)

    assert result.returncode == 0, result.stderr
    hashed = log.read_text().splitlines()
    assert "dgst -sha256 -r ./vda.qcow2" in hashed and "dgst -sha256 -r ./backup.json" in hashed
    assert len(hashed) == sum(len((d / "SHA256SUMS").read_text().splitlines())
                              for d in (incremental, full))  # fmt: skip
    assert sorted(p.name for p in dest.iterdir()) == ["vda.raw"]


@needs_tools
@pytest.mark.parametrize("hasher", ["openssl", "sha256sum"])
def test_either_hasher_refuses_a_corrupt_chain(incremental, full, dest, tmp_path, hasher):
    flip_byte(full / "vda.qcow2")
    env = path_without_openssl(tmp_path) if hasher == "sha256sum" else dict(os.environ)

    result = run_restore_env(incremental, "--check", env=env, cwd=tmp_path)

    assert result.returncode != 0
    assert "vda.qcow2: FAILED" in result.stdout
    assert "checksum mismatch" in result.stderr and "failed its check" in result.stderr


@needs_tools
def test_it_falls_back_to_sha256sum_without_openssl(incremental, dest, tmp_path):
    env = path_without_openssl(tmp_path)

    result = run_restore_env(incremental, str(dest), env=env, cwd=dest)

    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in dest.iterdir()) == ["vda.raw"]


@needs_tools
@pytest.mark.parametrize(
    "line",
    ["{digest}  ../../etc/passwd", "{digest}  /etc/passwd", "not-a-digest  vda.qcow2", ""],
)
def test_it_refuses_a_tampered_sums_file(full, dest, tmp_path, line):
    digest = "0" * 64
    (full / "SHA256SUMS").write_text(line.format(digest=digest) + ("\n" if line else ""))

    result = run_restore(full, str(dest), cwd=dest)

    assert result.returncode != 0
    assert "SHA256SUMS" in result.stderr or "checksum mismatch" in result.stderr
    assert list(dest.iterdir()) == []


def run_restore_env(backup: Path, *args: str, env: dict, cwd: Path):
    argv = ["sh", str(backup / "restore.sh"), *args]
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=60)


@needs_tools
def test_it_checks_while_it_converts_and_publishes_after_both(incremental, dest, tmp_path):
    env = overlapping_tools(tmp_path)

    argv = ["sh", str(incremental / "restore.sh"), str(dest)]
    result = subprocess.run(argv, cwd=dest, env=env, capture_output=True, text=True, timeout=60)

    assert result.returncode == 0, result.stderr
    assert "NO OVERLAP" not in result.stderr
    assert sorted(p.name for p in dest.iterdir()) == ["vda.raw"]


@needs_tools
def test_a_corrupt_file_found_beside_the_copy_leaves_no_output(incremental, full, dest,
                                                               tmp_path):  # fmt: skip
    flip_byte(full / "vda.qcow2")  # the parent's data: the chain converts fine
    env = overlapping_tools(tmp_path)

    argv = ["sh", str(incremental / "restore.sh"), str(dest)]
    result = subprocess.run(argv, cwd=dest, env=env, capture_output=True, text=True, timeout=60)

    assert result.returncode != 0
    assert "NO OVERLAP" not in result.stderr
    assert (tmp_path / "converting").exists()  # the copy ran
    assert "failed its check" in result.stderr and "nothing restored" in result.stderr
    assert list(dest.iterdir()) == []


@needs_tools
def test_a_stopped_restore_leaves_no_output(full, dest, tmp_path):
    """TERM to the script's process group (as a terminal's hangup or a service stop)."""
    env = fake_qemu_img(tmp_path, 'for last; do :; done\necho junk > "$last"\nexec sleep 30')
    argv = ["sh", str(full / "restore.sh"), str(dest)]
    proc = subprocess.Popen(argv, cwd=dest, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    try:
        wait_until(lambda: (dest / "vda.raw.partial").exists(), timeout=30)
        os.killpg(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=10) == 130
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert list(dest.iterdir()) == []


@needs_tools
def test_it_refuses_to_restore_into_the_backup_itself(full):
    result = run_restore(full, cwd=full)

    assert result.returncode != 0
    assert "not into the backup" in result.stderr
    assert not (full / "vda.raw").exists()


@pytest.mark.parametrize("args", [["--force"], ["a", "b"], ["--check", "x"]])
def test_it_rejects_bad_arguments(full, dest, args):
    result = run_restore(full, *args, cwd=dest)

    assert result.returncode == 2
    assert "usage:" in result.stderr
    assert list(dest.iterdir()) == []


# ------------------------------------------------------------------- restore.sh, text


@pytest.mark.parametrize("shell", ["sh", "bash"])
def test_it_generates_a_script_the_shell_can_parse(shell, tmp_path):
    m = manifest(
        vm_name=HOSTILE_VM,
        disks=(disk(target=HOSTILE_TARGET, file="x'y.qcow2"),),
        nvram="nv'ram.fd",
        memory="memory.save",
    )
    script = tmp_path / "restore.sh"
    script.write_text(instructions.restore_sh(m))

    result = subprocess.run([shell, "-n", str(script)], capture_output=True, text=True, timeout=10)

    assert result.returncode == 0, result.stderr


def test_it_quotes_every_manifest_value_in_the_script():
    m = manifest(
        vm_name=HOSTILE_VM,
        vm_uuid="u\nrm -rf /",
        disks=(disk(target=HOSTILE_TARGET, file="a b.qcow2", format="qcow2"),),
        nvram="nv'ram.fd",
    )

    script = instructions.restore_sh(m)

    assert script.startswith("#!/bin/sh\n")
    assert "\nset -eu\n" in script
    assert f"VM_NAME={shlex.quote(HOSTILE_VM)}\n" in script
    assert f"VM_UUID={shlex.quote(m.vm_uuid)}\n" in script
    args = (HOSTILE_TARGET, "a b.qcow2", "qcow2", "qcow2", "")
    quoted = " ".join(shlex.quote(a) for a in args)
    assert f"    disk {quoted}\n" in script
    assert f"    extra {shlex.quote(m.nvram)}\n" in script
    assert "rm -rf /\n" not in script.replace(shlex.quote(m.vm_uuid), "")


def test_it_names_the_parent_only_for_incrementals():
    full = instructions.restore_sh(manifest())
    incremental = instructions.restore_sh(manifest(kind="incremental", parent="20261129T010000Z-3"))

    assert "PARENT=''\n" in full
    assert "PARENT=20261129T010000Z-3\n" in incremental


# --------------------------------------------------------------------------- RESTORE.md


def test_it_explains_checking_and_converting_each_disk():
    m = manifest(
        disks=(disk(), disk(target="vdb", file="vdb.raw", format="qcow2")),
        consistency="crash-consistent",
        nvram="nvram.fd",
    )

    text = instructions.restore_md(m)

    assert text.startswith("# Restore instructions: backup of VM `web`")
    assert "sha256sum -c SHA256SUMS" in text
    assert 'qemu-img convert -p -f qcow2 -O raw ./vda.qcow2 "$DEST"/vda.raw' in text
    assert 'qemu-img convert -p -f raw -O qcow2 ./vdb.raw "$DEST"/vdb.qcow2' in text
    assert "power cut" in text
    assert "cp nvram.fd /var/lib/libvirt/qemu/nvram/web_VARS.fd" in text
    assert "virsh define" in text
    assert "virsh restore" not in text
    assert "backing file" not in text


def test_it_explains_incremental_chains():
    backing = "../20261129T010000Z-3/vda.qcow2"
    m = manifest(
        kind="incremental",
        parent="20261129T010000Z-3",
        disks=(disk(backing=backing, backing_format="qcow2"),),
    )

    text = instructions.restore_md(m)

    assert "incremental on top of `20261129T010000Z-3`" in text
    assert f"backing file `{backing}`" in text
    assert "reads the whole chain" in text
    assert "restore.sh --check" in text


def test_it_explains_memory_restore_with_caveats():
    text = instructions.restore_md(manifest(memory="memory.save", consistency="with RAM"))

    assert "virsh restore ./memory.save --xml domain-restored.xml" in text
    assert "Caveats" in text
    assert "`memory.save`: RAM state" in text


def test_it_keeps_hostile_names_inside_code_spans():
    m = manifest(vm_name="a ``b`` c", disks=(disk(target="x`y", file="x`y.qcow2"),))

    text = instructions.restore_md(m)

    assert "VM ```a ``b`` c```" in text
    assert "disk ``x`y``" in text
    assert f"virsh start {shlex.quote(m.vm_name)}" in text


@needs_tools
def test_it_refuses_a_backing_header_pointing_elsewhere_before_qemu_img_opens_it(
    incremental, dest, tmp_path
):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    image = incremental / "vda.qcow2"
    subprocess.run(["qemu-img", "rebase", "-u", "-f", "qcow2", "-b", str(fifo), "-F", "raw",
                    str(image)], check=True, timeout=60)  # fmt: skip

    result = run_restore(incremental, str(dest), cwd=dest)  # a FIFO opened would block

    assert result.returncode != 0
    assert f"backs onto '{fifo}'" in result.stderr
    assert list(dest.iterdir()) == []


@needs_tools
@pytest.mark.parametrize("target", ["/dev/zero", "secret"])
def test_it_refuses_a_symlink_named_like_an_image(full, dest, tmp_path, target):
    secret = tmp_path / "secret"
    secret.write_text("not for backups")
    image = full / "vda.qcow2"
    image.unlink()
    image.symlink_to(secret if target == "secret" else target)

    result = run_restore(full, str(dest), cwd=dest)

    assert result.returncode != 0
    assert "not a regular file" in result.stderr
    assert list(dest.iterdir()) == []
