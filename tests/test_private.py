"""The private-file helpers: modes fixed at creation, whatever the umask."""

import os
import shutil
import subprocess
import uuid

import pytest

from backups import private
from tests.domains import BASE, PREFIX, make_dir
from tests.helpers import assert_private


@pytest.fixture
def open_umask():
    old = os.umask(0)  # the worst a caller could have
    yield
    os.umask(old)


def test_it_creates_files_and_directories_private_under_any_umask(tmp_path, open_umask):
    private.mkdir(tmp_path / "d")
    private.create_file(tmp_path / "d" / "a")
    private.write_file(tmp_path / "d" / "b", "secret")
    private.copy_file(tmp_path / "d" / "b", tmp_path / "d" / "c")
    tmp_path.chmod(0o700)
    assert_private(tmp_path)
    assert (tmp_path / "d" / "c").read_text() == "secret"


def test_it_never_follows_or_reuses_what_is_planted(tmp_path):
    (tmp_path / "secret").write_text("host")
    (tmp_path / "link").symlink_to(tmp_path / "secret")
    with pytest.raises(FileExistsError):
        private.create_file(tmp_path / "link")
    with pytest.raises(FileExistsError):
        private.write_file(tmp_path / "secret", "x")
    assert (tmp_path / "secret").read_text() == "host"


def test_copy_tree_copies_plain_files_only(tmp_path, open_umask):
    source = tmp_path / "src"
    (source / "tpm2").mkdir(parents=True)
    (source / "tpm2" / "tpm2-00.permall").write_bytes(b"keys")
    (source / "tpm2" / ".lock").write_bytes(b"")
    (source / "link").symlink_to("/etc/hostname")
    os.mkfifo(source / "fifo")

    private.copy_tree(source, tmp_path / "dst", skip=(".lock",))

    copied = {p.relative_to(tmp_path / "dst").as_posix() for p in (tmp_path / "dst").rglob("*")}
    assert copied == {"tpm2", "tpm2/tpm2-00.permall"}
    assert_private(tmp_path / "dst")


def test_a_lent_directory_is_taken_back_even_when_the_job_fails(tmp_path):
    vm_dir = tmp_path / "vm"
    private.mkdir(vm_dir)
    staging = vm_dir / ".x.partial"
    private.mkdir(staging)
    qemu = private.owner_of("libvirt-qemu") or private.owner_of("nobody")
    user = "libvirt-qemu" if private.owner_of("libvirt-qemu") else "nobody"

    with pytest.raises(RuntimeError), private.lent_to(staging, user):
        assert (staging.stat().st_uid, staging.stat().st_gid) == qemu
        assert vm_dir.stat().st_mode & 0o777 == 0o711
        raise RuntimeError("job failed")

    assert staging.stat().st_uid == os.getuid()
    assert_private(vm_dir)


@pytest.fixture
def passable(tmp_path):
    """A directory another user can reach (pytest's temporary directories are 0700)."""
    path = make_dir(BASE / f"{PREFIX}acl-{uuid.uuid4().hex[:8]}")
    yield path
    shutil.rmtree(path)


def test_an_acl_lends_read_access_and_its_return_leaves_the_file_as_it_was(passable):
    """Instant recovery lends a backup's image to QEMU's user: owner and mode bits stay,
    nobody else gains anything, and taking it back restores the exact private mode."""
    tmp_path = passable
    directory = tmp_path / "b"
    private.mkdir(directory)
    image = directory / "vda.qcow2"
    private.write_file(image, "disk")
    before = {p: (p.stat().st_uid, p.stat().st_mode) for p in (directory, image)}
    user = private.owner_of("nobody")

    private.grant_acl(directory, user[0], 1)
    private.grant_acl(image, user[0], 4)

    assert private.has_acl(image) and private.has_acl(directory)
    assert image.stat().st_uid == before[image][0]
    assert image.stat().st_mode & 0o707 == 0o600  # the owner's and others' bits untouched
    read = subprocess.run(["/bin/cat", str(image)], user=user[0], capture_output=True, timeout=10)
    listed = subprocess.run(
        ["/bin/ls", str(directory)], user=user[0], capture_output=True, timeout=10
    )
    assert (read.returncode, read.stdout, listed.returncode) == (0, b"disk", 2)

    private.revoke_acl(image, private.FILE)
    private.revoke_acl(directory, private.DIR)
    private.revoke_acl(tmp_path / "gone", private.FILE)  # nothing there: nothing to do

    assert {p: (p.stat().st_uid, p.stat().st_mode) for p in (directory, image)} == before
    assert not private.has_acl(image) and not private.has_acl(directory)


def test_a_push_job_leaves_an_instant_restore_s_lent_vm_directory_passable(tmp_path):
    vm_dir = tmp_path / "vm"
    private.mkdir(vm_dir)
    staging = vm_dir / ".stage"
    private.mkdir(staging)
    nobody = private.owner_of("nobody")
    private.grant_acl(vm_dir, nobody[0], 1)  # mode now 0710: the group bits are the mask

    with private.lent_to(staging, "nobody"):
        pass

    assert vm_dir.stat().st_mode & 0o777 == 0o710 and private.has_acl(vm_dir)
