"""sftp: repositories: restic's ``sftp.command`` built from the URL and the admin's ssh
configuration (``VMBACKUP_SSH_CONFIG``), never from anything else; and a real repository
on an OpenSSH server on 127.0.0.1 (``sftp_server``)."""

from __future__ import annotations

import os
import shutil

import pytest

from backups import restic
from backups.offsite import restic_repository
from backups.restic import Reason, Repository, ResticError

needs_restic = pytest.mark.skipif(not shutil.which("restic"), reason="restic is required")


@pytest.mark.parametrize(
    ("url", "command"),
    [
        (
            "sftp://backup@host.example:2222//srv/restic",
            "/usr/bin/ssh -F /etc/vmbackup/ssh_config -p 2222 backup@host.example -s sftp",
        ),
        (
            "sftp:backup@10.0.0.9:/srv/restic",
            "/usr/bin/ssh -F /etc/vmbackup/ssh_config backup@10.0.0.9 -s sftp",
        ),
        ("sftp:host:/srv/restic", "/usr/bin/ssh -F /etc/vmbackup/ssh_config host -s sftp"),
    ],
)
def test_it_builds_the_sftp_command_from_the_url_and_the_config(url, command):
    assert restic.sftp_command(url, "/etc/vmbackup/ssh_config") == command
    repo = Repository(url, "/etc/vmbackup/pw", None, "/etc/vmbackup/ssh_config")
    assert repo.options == ["-o", f"sftp.command={command}"]


@pytest.mark.parametrize(
    ("url", "config"),
    [
        ("sftp://backup@host:0//srv", "/etc/ssh_config"),
        ("sftp://back'up@host//srv", "/etc/ssh_config"),
        ("sftp:user@ho$t:/srv", "/etc/ssh_config"),
        ("sftp:host:/srv", "/etc/ssh config"),
        ("sftp:host:/srv", "/etc/../root/x"),
    ],
)
def test_it_refuses_what_would_not_split_as_meant(url, config):
    with pytest.raises(ResticError) as caught:
        Repository(url, "/etc/vmbackup/pw", None, config)
    assert caught.value.reason == Reason.INVALID


def test_other_repositories_and_no_config_get_no_option():
    assert Repository("/srv/restic", "/pw", None, "/etc/ssh_config").options == []
    assert Repository("sftp:host:/srv", "/pw").options == []


@needs_restic
def test_it_uses_a_real_sftp_repository(sftp_server, tmp_path, settings, offsite):
    settings.VMBACKUP_SSH_CONFIG = str(sftp_server.config)
    offsite.url = sftp_server.url(tmp_path / "over-sftp")
    repo = restic_repository(offsite)
    restic.init(repo)
    (tmp_path / "vm" / "b").mkdir(parents=True)
    (tmp_path / "vm" / "b" / "f").write_bytes(os.urandom(1000))
    done = restic.backup(repo, str(tmp_path / "vm"), ["b/f"], ["vmbackup"])
    restic.restore(repo, done.snapshot_id, str(tmp_path / "out"))
    assert (tmp_path / "out" / "b" / "f").read_bytes() == (tmp_path / "vm" / "b" / "f").read_bytes()
    assert (tmp_path / "over-sftp" / "config").is_file()  # the server wrote it there

    settings.VMBACKUP_SSH_CONFIG = ""  # root's own ssh does not know this server's key
    with pytest.raises(ResticError) as caught:
        restic.snapshots(restic_repository(offsite), timeout=60)
    assert caught.value.reason == Reason.UNREACHABLE
