"""Tests for backups.restic: exact argv and environment (through a stand-in binary that
records how it was run), errors made readable, and behaviour against the real restic with
local-path repositories in temporary directories."""

from __future__ import annotations

import json
import os
import shutil
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest

from backups import restic
from backups.restic import Reason, Repository, ResticError

needs_restic = pytest.mark.skipif(not shutil.which("restic"), reason="restic is required")
SUMMARY = {
    "message_type": "summary",
    "files_new": 2,
    "files_changed": 0,
    "files_unmodified": 0,
    "data_added": 1234,
    "total_files_processed": 2,
    "total_bytes_processed": 5000,
    "total_duration": 0.5,
    "snapshot_id": "0123abcd",
}
FULL_ID = "0123abcd" + "e" * 56
SNAPSHOT = {
    "time": "2026-11-30T01:00:00.123456789Z",
    "id": FULL_ID,
    "short_id": "0123abcd",
    "hostname": "hv1",
    "paths": ["/r/vm/x/a"],
    "tags": ["vmbackup", "vm=a%2Cb"],
}

FAKE = """#!{python}
import json, os, signal, sys, time
record = {{"argv": sys.argv, "env": dict(os.environ), "cwd": os.getcwd()}}
if "--files-from-verbatim" in sys.argv:
    record["list"] = open(sys.argv[sys.argv.index("--files-from-verbatim") + 1]).read()
def stopped(signum, frame):
    open({log!r} + ".signal", "w").write(str(signum))
    sys.exit(130)
signal.signal(signal.SIGINT, stopped)
with open({log!r}, "a") as f:
    f.write(json.dumps(record) + "\\n")
plan = json.load(open({plan!r})).get(sys.argv[1], {{}})
for line in plan.get("lines", []):
    print(line, flush=True)
    time.sleep(plan.get("pause", 0))
sys.stdout.write(plan.get("stdout", ""))
sys.stderr.write(plan.get("stderr", ""))
time.sleep(plan.get("sleep", 0))
sys.exit(plan.get("rc", 0))
"""


class Fake:
    """A stand-in restic: each subcommand answers as ``plan`` says; every call is logged."""

    def __init__(self, tmp: Path):
        self.log, self.plan_file = tmp / "calls.jsonl", tmp / "plan.json"
        self.path = tmp / "restic"
        self.path.write_text(
            FAKE.format(python=sys.executable, log=str(self.log), plan=str(self.plan_file))
        )
        self.path.chmod(0o755)
        self.plan({})

    def plan(self, plan: dict) -> None:
        self.plan_file.write_text(json.dumps(plan))

    @property
    def calls(self) -> list[dict]:
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines()]

    def signal(self) -> str | None:
        path = Path(str(self.log) + ".signal")
        return path.read_text() if path.exists() else None


@pytest.fixture
def fake(tmp_path, monkeypatch) -> Fake:
    stand_in = Fake(tmp_path)
    monkeypatch.setattr(restic, "RESTIC", str(stand_in.path))
    return stand_in


@pytest.fixture
def password(tmp_path) -> Path:
    path = tmp_path / "password"
    path.write_text("correct horse battery staple\n")
    path.chmod(0o600)
    return path


@pytest.fixture
def repo(tmp_path, password) -> Repository:
    return Repository(str(tmp_path / "repo"), str(password), str(tmp_path / "cache"))


def source(tmp_path: Path) -> Path:
    directory = tmp_path / "vm"
    (directory / "20261130T010000Z-7" / "tpm").mkdir(parents=True)
    (directory / "20261130T010000Z-7" / "vda.qcow2").write_bytes(os.urandom(300_000))
    (directory / "20261130T010000Z-7" / "backup.json").write_text("{}\n")
    (directory / "20261130T010000Z-7" / "tpm" / "state").write_text("tpm\n")
    (directory / "20261130T010000Z-7" / "stray").write_text("not named\n")
    return directory


FILES = [
    "20261130T010000Z-7/vda.qcow2",
    "20261130T010000Z-7/backup.json",
    "20261130T010000Z-7/tpm/state",
]


# ------------------------------------------------------------------- argv and environment


def test_it_runs_backup_with_exact_argv_in_the_directory(fake, repo, tmp_path):
    fake.plan(
        {
            "backup": {"stdout": json.dumps(SUMMARY) + "\n"},
            "snapshots": {"stdout": json.dumps([SNAPSHOT])},
        }
    )
    when = datetime(2026, 11, 30, 1, 0, tzinfo=UTC)
    result = restic.backup(
        repo,
        str(tmp_path),
        ["a/b.qcow2", "a/backup.json"],
        ["vmbackup", "uuid=42"],
        host="hv1",
        when=when,
    )
    backup, resolve = fake.calls
    listing = backup["argv"][4]
    assert backup["argv"] == [
        str(fake.path),
        "backup",
        "--json",
        "--files-from-verbatim",
        listing,
        "--tag",
        "vmbackup",
        "--tag",
        "uuid=42",
        "--host",
        "hv1",
        "--time",
        "2026-11-30 01:00:00",
    ]
    assert backup["list"] == "a/b.qcow2\na/backup.json\n"
    assert not os.path.exists(listing)  # the list is removed afterwards
    assert backup["cwd"] == str(tmp_path)
    assert resolve["argv"] == [str(fake.path), "snapshots", "--json", "0123abcd"]
    assert result.snapshot_id == FULL_ID and result.bytes_added == 1234
    assert result.total_files == 2 and result.total_bytes == 5000


def test_the_child_gets_the_repository_only_through_its_environment(
    fake, repo, password, monkeypatch
):
    monkeypatch.setenv("SECRET_KEY", "django-secret")
    monkeypatch.setenv("DATABASE_URL", "postgres://u:dbpass@h/db")
    monkeypatch.setenv("RESTIC_PASSWORD", "would-win-over-the-file")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIA-for-s3")
    fake.plan({"snapshots": {"stdout": "[]"}})
    restic.snapshots(repo, ["vmbackup", "uuid=42"])
    (call,) = fake.calls
    assert call["argv"] == [str(fake.path), "snapshots", "--json", "--tag", "vmbackup,uuid=42"]
    env = call["env"]
    assert env["RESTIC_REPOSITORY"] == repo.url
    assert env["RESTIC_PASSWORD_FILE"] == str(password)
    assert env["RESTIC_CACHE_DIR"] == repo.cache_dir
    assert env["AWS_ACCESS_KEY_ID"] == "AKIA-for-s3"  # backends' credentials pass
    assert {"SECRET_KEY", "DATABASE_URL", "RESTIC_PASSWORD"}.isdisjoint(env)
    assert env["TZ"] == "UTC" and env["PATH"] == restic.PATH
    assert "correct horse" not in json.dumps(call)  # the password itself never passes
    assert oct(os.stat(repo.cache_dir).st_mode & 0o777) == "0o700"


def test_it_uses_no_cache_when_given_none(fake, password):
    fake.plan({"snapshots": {"stdout": "[]"}})
    restic.snapshots(Repository("/srv/repo", str(password)))
    assert fake.calls[0]["argv"][-1] == "--no-cache"
    assert "RESTIC_CACHE_DIR" not in fake.calls[0]["env"]


@pytest.mark.parametrize(
    ("call", "argv"),
    [
        (lambda r: restic.init(r), ["init"]),
        (lambda r: restic.ls(r, FULL_ID), ["ls", "--json", FULL_ID]),
        (lambda r: restic.check(r), ["check"]),
        (lambda r: restic.check(r, "10%"), ["check", "--read-data-subset", "10%"]),
        (
            lambda r: restic.restore(r, FULL_ID, "/t", include=["/x/backup.json"]),
            ["restore", FULL_ID, "--target", "/t", "--verify", "--include", "/x/backup.json"],
        ),
        (lambda r: restic.dump(r, FULL_ID, "/x/backup.json"), ["dump", FULL_ID, "/x/backup.json"]),
        (lambda r: restic.forget(r, [FULL_ID]), ["forget", FULL_ID]),
        (lambda r: restic.forget(r, ["0123abcd"], prune=True), ["forget", "--prune", "0123abcd"]),
        (lambda r: restic.unlock(r), ["unlock"]),
        (lambda r: restic.prune(r), ["prune"]),
    ],
)
def test_it_runs_each_command_with_exact_argv(fake, repo, call, argv):
    call(repo)
    assert fake.calls[0]["argv"] == [str(fake.path), *argv]


def test_it_reports_backup_progress_and_keeps_no_status_lines(fake, repo, tmp_path):
    status = {
        "message_type": "status",
        "percent_done": 0.5,
        "total_files": 2,
        "files_done": 1,
        "total_bytes": 5000,
        "bytes_done": 2500,
    }
    fake.plan(
        {
            "backup": {"lines": [json.dumps(status)] * 3 + [json.dumps(SUMMARY)]},
            "snapshots": {"stdout": json.dumps([SNAPSHOT])},
        }
    )
    seen = []
    restic.backup(repo, str(tmp_path), ["a"], ["vmbackup"], seen.append)
    assert [p.bytes_done for p in seen] == [2500] * 3
    assert seen[0] == restic.Progress(0.5, 2500, 5000, 1, 2)


def test_a_progress_callback_that_raises_stops_restic(fake, repo, tmp_path):
    status = json.dumps({"message_type": "status", "bytes_done": 1, "total_bytes": 9})
    fake.plan({"backup": {"lines": [status], "sleep": 30}})

    def cancel(_progress):
        raise RuntimeError("cancelled by user")

    with pytest.raises(RuntimeError, match="cancelled"):
        restic.backup(repo, str(tmp_path), ["a"], ["vmbackup"], cancel)
    assert fake.signal() == "2"  # SIGINT: restic removes its lock and writes no snapshot


def test_a_watch_that_raises_stops_restic_even_while_it_prints_nothing(fake, repo, tmp_path):
    fake.plan({"backup": {"sleep": 30}})
    calls = []

    def watch():
        calls.append(1)
        if len(calls) >= 2:
            raise RuntimeError("cancelled by user")

    with pytest.raises(RuntimeError, match="cancelled"):
        restic.backup(repo, str(tmp_path), ["a"], ["vmbackup"], watch=watch)
    assert fake.signal() == "2"


@pytest.mark.parametrize(
    "cause",
    [
        "blob not removed, server response: 403 Forbidden (403)",  # rest-server --append-only
        "remove /r/snapshots/0123abcd: operation not permitted",  # chattr +i
        "remove /r/snapshots/0123abcd: read-only file system",
    ],
)
def test_a_refused_deletion_stops_forget_at_once_as_append_only(fake, repo, cause):
    line = f"Remove(<snapshot/0123abcd>) returned error, retrying after 552.3ms: {cause}\n"
    fake.plan({"forget": {"stderr": line, "sleep": 30}})
    with pytest.raises(ResticError) as caught:
        restic.forget(repo, [FULL_ID])
    assert caught.value.reason == Reason.APPEND_ONLY
    assert "refuses deletions" in str(caught.value) and "left to its owner" in str(caught.value)
    assert fake.signal() == "2"  # not after restic's minute of retries


def test_a_passing_error_or_a_lock_is_not_a_refusal():
    retry = "Remove(<{}/0123abcd>) returned error, retrying after 1s: {}"
    assert restic.refused_removal(retry.format("lock", "403 Forbidden")) is None
    assert restic.refused_removal(retry.format("snapshot", "connection reset by peer")) is None
    assert restic.refused_removal(retry.format("data", "permission denied")) == "permission denied"


def test_it_stops_restic_at_the_timeout(fake, repo):
    fake.plan({"snapshots": {"sleep": 30}})
    with pytest.raises(ResticError) as caught:
        restic.snapshots(repo, timeout=0.5)
    assert caught.value.reason == Reason.TIMEOUT
    assert "did not finish within 0.5 s" in str(caught.value)
    assert fake.signal() == "2"


@pytest.mark.parametrize(
    ("stderr", "reason", "words"),
    [
        ("Fatal: wrong password or no key found\n", Reason.WRONG_PASSWORD, "does not open"),
        (
            "Fatal: unable to open config file: stat /r/config: no such file or directory\n"
            "Is there a repository at the following location?\n/r\n",
            Reason.NO_REPOSITORY,
            "no restic repository at",
        ),
        (
            "Fatal: create repository at /r failed: config file already exists\n",
            Reason.EXISTS,
            "already a repository",
        ),
        (
            "unable to create lock in backend: repository is already locked by PID 9 on h by "
            "root (UID 0, GID 0)\n",
            Reason.LOCKED,
            "locked by PID 9",
        ),
        (
            "subprocess ssh: ssh: connect to host 10.0.0.9 port 22: Connection refused\n"
            "Fatal: unable to open repository at sftp:b@10.0.0.9:/r: unable to start the sftp "
            "session, error: EOF\n",
            Reason.UNREACHABLE,
            "unreachable",
        ),
        ("Fatal: something new\n", Reason.FAILED, "something new"),
    ],
)
def test_it_turns_restic_errors_into_reasons(fake, repo, stderr, reason, words):
    fake.plan({"snapshots": {"stderr": stderr, "rc": 1}})
    with pytest.raises(ResticError) as caught:
        restic.snapshots(repo)
    assert caught.value.reason == reason
    assert words in str(caught.value)
    assert caught.value.returncode == 1 and caught.value.argv[1] == "snapshots"


def test_a_backup_that_missed_files_is_incomplete_with_its_snapshot(fake, repo, tmp_path):
    fake.plan(
        {
            "backup": {
                "stdout": json.dumps(SUMMARY) + "\n",
                "rc": 3,
                "stderr": "error: open a: permission denied\n",
            }
        }
    )
    with pytest.raises(ResticError) as caught:
        restic.backup(repo, str(tmp_path), ["a"], ["vmbackup"])
    assert caught.value.reason == Reason.INCOMPLETE
    assert caught.value.snapshot_id == "0123abcd"


def test_a_check_that_finds_damage_is_a_result_not_an_error(fake, repo):
    stderr = "Pack ID does not match, want 2d44, got 58c7\nFatal: repository contains errors\n"
    fake.plan({"check": {"stderr": stderr, "rc": 1}})
    result = restic.check(repo, "100%")
    assert not result.ok
    assert result.errors == (
        "Pack ID does not match, want 2d44, got 58c7",
        "Fatal: repository contains errors",
    )


def test_a_password_in_the_url_is_masked_everywhere(fake, password):
    url = "rest:https://backup:s3cr3t@offsite.example:8000/vm"
    repo = Repository(url, str(password))
    fake.plan({"snapshots": {"stderr": f"Fatal: dial {url}: connection refused\n", "rc": 1}})
    with pytest.raises(ResticError) as caught:
        restic.snapshots(repo)
    assert "s3cr3t" not in str(caught.value) + caught.value.stderr
    assert repo.display == "rest:https://backup:***@offsite.example:8000/vm"


# ------------------------------------------------------------------- refused before running


@pytest.mark.parametrize(
    "url",
    [
        "",
        "relative/path",
        " /lead",
        "ftp://x/y",
        "sftp:-oProxyCommand=touch%20x:/r",
        "sftp:user@-oProxyCommand=x:/r",
        "sftp://-oProxyCommand=x/r",
        "local:rel",
        "rest:ftp://x",
        "/repo\nrm",
    ],
)
def test_it_refuses_urls_restic_should_not_be_given(url, password):
    with pytest.raises(ResticError) as caught:
        Repository(url, str(password))
    assert caught.value.reason == Reason.INVALID


@pytest.mark.parametrize(
    "url",
    [
        "/srv/restic",
        "local:/srv/restic",
        "sftp:backup@host:/srv/restic",
        "sftp://backup@host:2222//srv/restic",
        "rest:https://host:8000/",
        "s3:s3.amazonaws.com/b",
        "b2:bucket:path",
    ],
)
def test_it_accepts_restic_urls(url, password):
    assert Repository(url, str(password)).url == url


@pytest.mark.parametrize(
    "call",
    [
        lambda r, d: restic.backup(r, d, ["../etc/shadow"], ["vmbackup"]),
        lambda r, d: restic.backup(r, d, ["/etc/shadow"], ["vmbackup"]),
        lambda r, d: restic.backup(r, d, ["a\nb"], ["vmbackup"]),
        lambda r, d: restic.backup(r, d, ["a"], ["vm=a,b"]),
        lambda r, d: restic.backup(r, d, [], ["vmbackup"]),
        lambda r, d: restic.ls(r, "latest; rm"),
        lambda r, d: restic.check(r, "0%"),
        lambda r, d: restic.check(r, "101%"),
        lambda r, d: restic.check(r, "--read-data"),
        lambda r, d: restic.restore(r, FULL_ID, "relative"),
        lambda r, d: restic.dump(r, FULL_ID, "relative"),
    ],
)
def test_it_refuses_bad_arguments_before_running(fake, repo, tmp_path, call):
    with pytest.raises(ResticError) as caught:
        call(repo, str(tmp_path))
    assert caught.value.reason == Reason.INVALID
    assert fake.calls == []


def test_it_refuses_a_missing_or_world_readable_password_file(fake, tmp_path, password):
    with pytest.raises(ResticError, match="not readable on this worker") as caught:
        restic.snapshots(Repository("/srv/r", str(tmp_path / "nope")))
    assert caught.value.reason == Reason.PASSWORD_FILE
    password.chmod(0o644)
    with pytest.raises(ResticError, match="readable by every user"):
        restic.snapshots(Repository("/srv/r", str(password)))
    assert fake.calls == []


# ------------------------------------------------------------------------- real restic


@needs_restic
def test_it_initializes_backs_up_lists_and_restores_for_real(repo, tmp_path):
    assert restic.probe(repo).state == "no-repository"
    assert restic.init(repo)
    assert restic.probe(repo).ok
    with pytest.raises(ResticError) as caught:
        restic.init(repo)
    assert caught.value.reason == Reason.EXISTS
    directory = source(tmp_path)
    seen = []
    result = restic.backup(
        repo,
        str(directory),
        FILES,
        ["vmbackup", "vm=a%2Cb"],
        seen.append,
        host="hv1",
        when=datetime(2026, 11, 30, 1, tzinfo=UTC),
    )
    assert len(result.snapshot_id) == 64 and result.bytes_added > 300_000
    (snap,) = restic.snapshots(repo, ["vm=a%2Cb"])
    assert snap.id == result.snapshot_id and snap.tag("vm") == "a%2Cb"
    assert snap.time == datetime(2026, 11, 30, 1, tzinfo=UTC) and snap.hostname == "hv1"
    assert restic.snapshots(repo, ["vm=other"]) == []
    files = {n.path: n.size for n in restic.ls(repo, snap.id) if n.type == "file"}
    assert files == {"/" + name: (directory / name).stat().st_size for name in FILES}
    assert restic.dump(repo, snap.short_id, "/20261130T010000Z-7/backup.json") == b"{}\n"
    target = tmp_path / "out"
    restic.restore(repo, snap.id, str(target))
    for name in FILES:
        assert (target / name).read_bytes() == (directory / name).read_bytes()
    assert not (target / "20261130T010000Z-7" / "stray").exists()  # only what was named
    assert restic.check(repo, "100%").ok  # damage found: test_offsite_failures
    restic.forget(repo, [snap.id])
    assert restic.snapshots(repo) == []


@needs_restic
def test_it_tells_a_wrong_password_from_a_missing_repository(repo, tmp_path):
    restic.init(repo)
    wrong = tmp_path / "wrong"
    wrong.write_text("not it\n")
    wrong.chmod(0o600)
    other = Repository(repo.url, str(wrong), repo.cache_dir)
    assert restic.probe(other).state == "wrong-password"
    with pytest.raises(ResticError) as caught:
        restic.snapshots(other)
    assert caught.value.reason == Reason.WRONG_PASSWORD
    assert str(wrong) in str(caught.value)
    missing = Repository(str(tmp_path / "nothing"), repo.password_file)
    assert restic.probe(missing).state == "no-repository"
