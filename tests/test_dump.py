"""Self-protection: the database is copied into the backup root (private, the newest N
kept, on a daily schedule), and when the database is lost altogether an empty one is
rebuilt from the backup directories alone by ``vmbackup_sync`` + ``vmbackup_reconcile``."""

import json
import sqlite3
import stat
from pathlib import Path

import pytest
from django.core.management import call_command
from django.db import connection
from django_q.models import Schedule

from backups import dump, jobs, requests, schedules
from backups.models import Backup, BackupPolicy, Host, RunStatus, VirtualMachine
from tests.domains import DiskSpec


@pytest.fixture
def root(settings, tmp_path):
    settings.VMBACKUP_ROOT = str(tmp_path / "root")
    settings.VMBACKUP_ROOTS = [settings.VMBACKUP_ROOT]
    return tmp_path / "root"


def rows_in(path: Path) -> dict:
    """What a dump holds: policy names and user names."""
    if path.suffix == ".sqlite3":
        with sqlite3.connect(path) as db:
            policies = [r[0] for r in db.execute("select name from backups_backuppolicy")]
            users = [r[0] for r in db.execute("select username from auth_user")]
        return {"policies": policies, "users": users}
    objects = json.loads(path.read_text())
    return {
        "policies": [o["fields"]["name"] for o in objects if o["model"] == "backups.backuppolicy"],
        "users": [o["fields"]["username"] for o in objects if o["model"] == "auth.user"],
    }


@pytest.mark.django_db(transaction=True)
def test_it_dumps_the_database_privately_into_the_backup_root(root, django_user_model):
    BackupPolicy.objects.create(name="nightly", schedule="0 2 * * *")
    django_user_model.objects.create_user("operator", password="pw-operator-1")

    call_command("vmbackup_dump")

    (written,) = dump.dumps()
    assert written.parent == root / ".vmbackup-db"
    assert written.suffix == (".sqlite3" if connection.vendor == "sqlite" else ".json")
    assert stat.S_IMODE(written.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(written.stat().st_mode) == 0o600
    assert stat.S_IMODE(root.stat().st_mode) == 0o711  # a root made here: search-only
    assert rows_in(written) == {"policies": ["nightly"], "users": ["operator"]}
    assert [p.name for p in written.parent.iterdir()] == [written.name]  # no partial left


@pytest.mark.django_db(transaction=True)
def test_it_keeps_the_newest_dumps(root, settings):
    settings.VMBACKUP_DUMP_KEEP = 2
    made = []
    for name in ("a", "b", "c"):
        BackupPolicy.objects.create(name=name, schedule="")
        dump.dump_database()
        made.append(dump.dumps()[-1])
    assert dump.dumps() == made[1:]
    assert rows_in(made[-1])["policies"] == ["a", "b", "c"]


@pytest.mark.django_db(transaction=True)
def test_it_refuses_a_dump_directory_that_is_a_symlink(root, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    root.mkdir()
    (root / ".vmbackup-db").symlink_to(elsewhere)
    with pytest.raises(dump.DumpError, match="not a directory"):
        dump.dump_database()
    assert list(elsewhere.iterdir()) == []


@pytest.mark.django_db
def test_it_installs_a_daily_dump_schedule():
    schedules.install_housekeeping()
    schedule = Schedule.objects.get(name="vmbackup-dump")
    assert schedule.func == "backups.jobs.dump_database"
    assert schedule.schedule_type == Schedule.CRON and schedule.cron.endswith("* * *")


def push(vm) -> Backup:
    run = requests.request_backup(vm, method="push", enqueue=False)
    jobs.run_backup(run.pk)
    run.refresh_from_db()
    assert run.status == RunStatus.SUCCEEDED, run.error
    return run.backup


@pytest.mark.libvirt
@pytest.mark.django_db(transaction=True)
def test_it_rebuilds_the_index_from_the_directories_into_an_empty_database(
    domains, backup_root, synced, settings, libvirt_uri
):
    dom = domains.create([DiskSpec("vda", "qcow2", 16, [(0, 1, 0xA1)])], start=True)
    vm = synced(dom)
    full = push(vm)
    incremental = push(vm)
    assert incremental.kind == "incremental" and incremental.parent == full
    before = {
        b.path: (b.kind, b.method, b.consistency, b.size_bytes, b.manifest)
        for b in (full, incremental)
    }

    call_command("flush", interactive=False)  # the database is lost
    assert not (Host.objects.exists() or VirtualMachine.objects.exists() or Backup.objects.exists())
    settings.VMBACKUP_LIBVIRT_URI = libvirt_uri
    call_command("vmbackup_sync")
    call_command("vmbackup_reconcile")

    rebuilt = {b.path: b for b in Backup.objects.select_related("vm", "parent")}
    assert {
        p: (b.kind, b.method, b.consistency, b.size_bytes, b.manifest) for p, b in rebuilt.items()
    } == before
    assert {str(b.vm.uuid) for b in rebuilt.values()} == {dom.uuid}
    assert rebuilt[incremental.path].parent == rebuilt[full.path]
    assert all(b.verify_status == "unverified" for b in rebuilt.values())


@pytest.mark.django_db(transaction=True)
def test_it_writes_a_json_dump_that_loads_into_a_fresh_database(tmp_path, django_user_model):
    """The PostgreSQL form (dumpdata, natural keys) restores with loaddata after migrate."""
    BackupPolicy.objects.create(name="nightly", schedule="0 2 * * *", keep_daily=9)
    django_user_model.objects.create_superuser("operator", "", "pw-operator-1")
    path = tmp_path / "dump.json"
    dump._dumpdata(path)

    call_command("flush", interactive=False)
    call_command("loaddata", str(path))

    assert BackupPolicy.objects.get(name="nightly").keep_daily == 9
    assert django_user_model.objects.get(username="operator").check_password("pw-operator-1")
