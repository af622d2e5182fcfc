"""Offsite retention against a real restic repository (a local path in a temporary
directory) holding real copies of published backups: the policy's offsite_keep_* decide,
a kept incremental keeps its whole chain, the dry run is the plan that is applied, an
append-only repository (its snapshot files made immutable, as rest-server --append-only
refuses deletions) is said so and left alone, a locked one is tried again later."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
from datetime import timedelta
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command
from django.urls import reverse
from django.utils import timezone
from django_q.models import Schedule

from backups import archive, jobs, requests, restic, worker
from backups.models import BackupPolicy, OffsiteCopy, RunStatus
from backups.offsite import forget, restic_repository
from tests.helpers import make_backup, publish_backup, wait_until

pytestmark = pytest.mark.skipif(not os.path.exists(restic.RESTIC), reason="restic is required")
KIB = 1024
NOW = timezone.now().replace(microsecond=0)


def fill(staging: Path) -> list[dict]:
    (staging / "vda.raw").write_bytes(os.urandom(64 * KIB))
    return [dict(target="vda", source="/x/vda.img", format="raw", virtual_size=64 * KIB,
                 file="vda.raw")]  # fmt: skip


def backup_of(vm, root, run_id, days_ago, parent=None, policy=None):
    when = NOW - timedelta(days=days_ago)
    kind = "incremental" if parent else "full"
    fields = {"parent": Path(parent.path).name} if parent else {}
    path = publish_backup(root, vm.name, run_id, fill, when=when, vm_uuid=str(vm.uuid),
                          kind=kind, **fields)  # fmt: skip
    return make_backup(vm, path=str(path), manifest=archive.read_manifest(path).to_dict(),
                       created_at=when, kind=kind, parent=parent, policy=policy)  # fmt: skip


def copy_now(backup, repository) -> OffsiteCopy:
    copy = requests.request_offsite_copy(backup, repository, enqueue=False)
    jobs.copy_offsite(copy.pk)
    copy.refresh_from_db()
    assert copy.status == RunStatus.SUCCEEDED, copy.error
    return copy


@pytest.fixture
def chains(vm, offsite, tmp_path):
    """Two chains of one VM copied offsite under a policy keeping the last one there, and
    a manual backup copied too: {name: copy}."""
    root = tmp_path / "root"
    root.mkdir()
    policy = BackupPolicy.objects.create(
        name="offsite-last", schedule="", offsite=offsite,
        **{name: 0 for name in BackupPolicy.OFFSITE_KEEP_FIELDS} | {"offsite_keep_last": 1},
    )  # fmt: skip
    policy.vms.add(vm)
    f0 = backup_of(vm, root, 1, 6, policy=policy)
    i0 = backup_of(vm, root, 2, 5, parent=f0, policy=policy)
    f1 = backup_of(vm, root, 3, 3, policy=policy)
    i1 = backup_of(vm, root, 4, 2, parent=f1, policy=policy)
    i2 = backup_of(vm, root, 5, 1, parent=i1, policy=policy)
    manual = backup_of(vm, root, 6, 7)
    backups = {"f0": f0, "i0": i0, "f1": f1, "i1": i1, "i2": i2, "manual": manual}
    copies = {}
    for name, backup in backups.items():
        copies[name] = copy_now(backup, offsite)
        # the copy asked for the newest backup left uncopied: these are copied in order
        OffsiteCopy.objects.filter(status=RunStatus.QUEUED).update(status=RunStatus.CANCELLED)
    offsite.refresh_from_db()
    return copies


def listed(repository) -> set[str]:
    return {s.id for s in restic.snapshots(restic_repository(repository))}


def plan_lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.count("\t") == 6]


def test_a_kept_incremental_keeps_its_chain_and_the_dry_run_is_what_is_applied(
    chains, offsite, capsys
):
    before = listed(offsite)
    call_command("vmbackup_offsite", "prune", "--dry-run")
    dry = capsys.readouterr().out
    assert listed(offsite) == before  # nothing changed
    reasons = {line.split("\t")[3]: line.split("\t")[5:] for line in plan_lines(dry)}
    short = {name: copy.snapshot_id[:8] for name, copy in chains.items()}
    assert reasons[short["i2"]] == ["keep", "keep-last 1/1"]
    assert reasons[short["i1"]] == ["keep", f"parent of kept {short['i2']}"]
    assert reasons[short["f1"]] == ["keep", f"parent of kept {short['i1']}"]
    assert reasons[short["i0"]][0] == reasons[short["f0"]][0] == "forget"
    assert reasons[short["manual"]] == ["keep", forget.NO_RULE]
    assert "offsite: dry-run: 2 snapshot(s) would be forgotten" in dry

    call_command("vmbackup_offsite", "prune")
    applied = capsys.readouterr().out
    assert plan_lines(applied) == plan_lines(dry)
    assert "offsite: ok: forgot 2 snapshot(s); pruned" in applied
    gone = {chains["f0"].snapshot_id, chains["i0"].snapshot_id}
    assert listed(offsite) == before - gone
    for name, copy in chains.items():
        copy.refresh_from_db()
        assert (copy.forgotten_at is not None) == (name in ("f0", "i0"))
    assert set(OffsiteCopy.objects.in_repository(offsite)) == {
        chains[n] for n in ("f1", "i1", "i2", "manual")
    }
    assert "forgotten" in [e["step"] for e in chains["f0"].journal]
    offsite.refresh_from_db()
    assert (offsite.prune_state, offsite.prune_holder) == ("ok", "")
    assert restic.check(restic_repository(offsite)).ok

    call_command("vmbackup_offsite", "prune")  # a second pass: nothing left to do
    assert "offsite: nothing: nothing to forget" in capsys.readouterr().out


@contextlib.contextmanager
def immutable(paths: list[Path]):
    """chattr +i: not even root may delete them, as an append-only backend refuses."""
    done = []
    try:
        for path in paths:
            if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode:
                pytest.skip("chattr +i is not available on this file system")
            done.append(path)
        yield
    finally:
        for path in done:
            subprocess.run(["chattr", "-i", str(path)], capture_output=True)


@pytest.mark.skipif(not shutil.which("chattr"), reason="chattr is required")
def test_an_append_only_repository_is_said_so_and_left_to_its_owner(chains, offsite, capsys):
    before = listed(offsite)
    with immutable(sorted(Path(offsite.url, "snapshots").iterdir())):
        call_command("vmbackup_offsite", "prune")  # exit 0: not an error
    out = capsys.readouterr().out
    assert "offsite: append-only: 2 snapshot(s) not forgotten" in out
    assert "refuses deletions" in out and "left to its owner" in out
    assert listed(offsite) == before
    assert OffsiteCopy.objects.exclude(forgotten_at=None).count() == 0
    offsite.refresh_from_db()
    assert offsite.prune_state == "append-only"
    assert restic.check(restic_repository(offsite)).ok  # its lock was removed


def test_a_snapshot_its_owner_forgot_marks_the_copy_gone(chains, offsite):
    restic.forget(restic_repository(offsite), [chains["manual"].snapshot_id])
    plan, outcome = forget.run(offsite, worker.worker_id())
    assert outcome.state == "ok"
    chains["manual"].refresh_from_db()
    assert chains["manual"].forgotten_at is not None
    assert "gone" in [e["step"] for e in chains["manual"].journal]


def test_it_stands_back_while_a_copy_to_the_repository_runs(chains, offsite, vm, tmp_path):
    other = backup_of(vm, tmp_path / "root", 9, 0)
    running = requests.request_offsite_copy(other, offsite, enqueue=False)
    OffsiteCopy.claim(running.pk, "elsewhere:1")
    _plan, outcome = forget.run(offsite, worker.worker_id())
    assert outcome.state == "busy" and "is running" in outcome.message
    assert OffsiteCopy.objects.exclude(forgotten_at=None).count() == 0
    assert len(listed(offsite)) == 6


def test_one_pass_per_repository_at_a_time(chains, offsite):
    offsite.claim_prune(worker.worker_id(), timezone.now() - timedelta(hours=1))
    with pytest.raises(CommandError, match="1 of 1 repositories were not pruned"):
        call_command("vmbackup_offsite", "prune")
    assert jobs.prune_offsite(offsite.pk).startswith("busy: offsite is being pruned by ")
    offsite.refresh_from_db()
    assert offsite.prune_holder == worker.worker_id()  # the holder's pass is not disturbed
    assert offsite.prune_queued_at is None  # a later copy may ask for the next pass
    assert not offsite.claim_prune("other:1", timezone.now() - timedelta(hours=1))


@contextlib.contextmanager
def locked(repository):
    """A live restic holding a lock on the repository: a backup waiting on its stdin."""
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": os.environ.get("HOME", "/root"),
        "RESTIC_REPOSITORY": repository.url,
        "RESTIC_PASSWORD_FILE": repository.password_file,
    }
    proc = subprocess.Popen(
        [restic.RESTIC, "backup", "--no-cache", "--stdin", "--stdin-filename", "held"],
        stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
    )  # fmt: skip
    try:
        wait_until(lambda: any(Path(repository.url, "locks").iterdir()), 30, "no lock taken")
        yield proc
    finally:
        proc.send_signal(signal.SIGINT)  # no snapshot, its lock removed
        proc.stdin.close()
        proc.wait(30)


def test_a_locked_repository_is_tried_again_later_once(chains, offsite, settings):
    settings.VMBACKUP_OFFSITE_RETRY_MINUTES = 20
    with locked(offsite):
        assert jobs.prune_offsite(offsite.pk).startswith("locked: ")
        assert jobs.prune_offsite(offsite.pk).startswith("locked: ")
        assert jobs.check_offsite(offsite.pk, "5%").startswith("locked, retried later")
    retries = Schedule.objects.filter(name__startswith="vmbackup-retry-")
    by_name = {s.name: s for s in retries}
    assert set(by_name) == {
        f"vmbackup-retry-prune_offsite-{offsite.pk}",
        f"vmbackup-retry-check_offsite-{offsite.pk}",
    }  # one pending retry each, not one per failure
    check = by_name[f"vmbackup-retry-check_offsite-{offsite.pk}"]
    assert (check.schedule_type, check.repeats, check.args) == (
        Schedule.ONCE, -1, repr((offsite.pk, "5%"))
    )  # fmt: skip
    assert timedelta(minutes=19) < check.next_run - timezone.now() <= timedelta(minutes=20)
    offsite.refresh_from_db()
    assert offsite.checked_at is None  # a lock is not a failed check
    assert len(listed(offsite)) == 6
    assert jobs.prune_offsite(offsite.pk).startswith("ok: forgot 2")


def test_each_copy_that_succeeds_asks_for_one_prune_of_its_repository(
    vm, offsite, tmp_path, async_calls, django_capture_on_commit_callbacks
):
    root = tmp_path / "root"
    root.mkdir()
    first, second = backup_of(vm, root, 1, 2), backup_of(vm, root, 2, 1)
    with django_capture_on_commit_callbacks(execute=True):
        copy_now(first, offsite)
        copy_now(second, offsite)
    prunes = [args for args, _ in async_calls if args[0] == "backups.jobs.prune_offsite"]
    assert prunes == [("backups.jobs.prune_offsite", offsite.pk)]  # queued once
    offsite.refresh_from_db()
    assert offsite.prune_queued_at is not None
    assert jobs.prune_offsite(offsite.pk) == "nothing: nothing to forget"
    offsite.refresh_from_db()
    assert offsite.prune_queued_at is None  # taken: the next copy asks again


def test_the_admin_queues_one_pass_on_the_repository_cluster(
    admin_client, offsite, async_calls, django_capture_on_commit_callbacks
):
    offsite.cluster = "vault"
    offsite.save()
    action = {"action": "prune_now", "_selected_action": [offsite.pk]}
    changelist = reverse("admin:backups_offsiterepository_changelist")
    with django_capture_on_commit_callbacks(execute=True):
        admin_client.post(changelist, action)
        response = admin_client.post(changelist, action, follow=True)
    assert b"one is queued already" in response.content
    ((args, kwargs),) = async_calls
    assert args == ("backups.jobs.prune_offsite", offsite.pk)
    assert kwargs["q_options"]["cluster"] == "vault"
