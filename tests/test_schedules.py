"""Policies become django-q2 schedules; scheduled runs skip a busy VM."""

from uuid import uuid4

import pytest
from django_q.models import Schedule

from backups import jobs, schedules
from backups.models import BackupPolicy, BackupRun, Host, RunStatus, VirtualMachine

pytestmark = pytest.mark.django_db


@pytest.fixture
def vm():
    host = Host.objects.create(name="h", uri="test:///default")
    return VirtualMachine.objects.create(
        host=host, uuid="6695eb01-f6a4-8304-79aa-97f2502e193f", name="web"
    )


def test_it_creates_one_schedule_per_policy_and_never_duplicates_it():
    policy = BackupPolicy.objects.create(name="nightly", schedule="0 2 * * *")
    policy.save()
    policy.save()
    found = Schedule.objects.filter(name=f"policy-{policy.pk}")
    assert found.count() == 1
    schedule = found.get()
    assert (schedule.func, schedule.args, schedule.cron) == (
        "backups.jobs.run_policy",
        str(policy.pk),
        "0 2 * * *",
    )
    assert (schedule.next_run.hour, schedule.next_run.minute) == (2, 0)


def test_it_follows_cron_changes_and_removes_disabled_or_deleted_policies():
    policy = BackupPolicy.objects.create(name="nightly", schedule="0 2 * * *")
    policy.schedule = "15 3 * * *"
    policy.save()
    assert Schedule.objects.get(name=f"policy-{policy.pk}").cron == "15 3 * * *"
    policy.enabled = False
    policy.save()
    assert not Schedule.objects.filter(name=f"policy-{policy.pk}").exists()
    policy.enabled = True
    policy.save()
    policy.delete()
    assert not Schedule.objects.filter(name__startswith="policy-").exists()


def test_it_installs_housekeeping_idempotently():
    schedules.install_all()
    schedules.install_all()
    names = set(Schedule.objects.values_list("name", flat=True))
    assert {"vmbackup-reconcile", "vmbackup-sync", "vmbackup-verify"} <= names
    assert Schedule.objects.count() == len(names)


def test_it_records_a_skipped_run_when_the_vm_is_still_busy(vm, monkeypatch):
    monkeypatch.setattr("backups.requests.async_task", lambda *a, **k: None)
    policy = BackupPolicy.objects.create(name="nightly", schedule="")
    policy.vms.add(vm)
    BackupRun.objects.create(vm=vm, status=RunStatus.RUNNING)
    assert jobs.run_policy(policy.pk) == "0 started, 1 skipped"
    skipped = BackupRun.objects.get(status=RunStatus.SKIPPED)
    assert skipped.trigger == "schedule" and "already has an active backup" in skipped.error


def test_it_starts_one_run_per_vm(vm, monkeypatch, django_capture_on_commit_callbacks):
    sent = []
    monkeypatch.setattr("backups.requests.async_task", lambda *a, **k: sent.append(a))
    policy = BackupPolicy.objects.create(name="nightly", schedule="", method="push")
    policy.vms.add(vm)
    with django_capture_on_commit_callbacks(execute=True):
        assert jobs.run_policy(policy.pk) == "1 started, 0 skipped"
    run = BackupRun.objects.get()
    assert (run.status, run.method_requested, run.policy) == ("queued", "push", policy)
    assert sent == [("backups.jobs.run_backup", run.pk)]


def test_it_verifies_least_recently_verified_first_within_a_byte_budget(vm):
    from datetime import timedelta

    from django.utils import timezone

    from backups.models import Backup

    def make(name, verified_ago):
        verified = timezone.now() - verified_ago if verified_ago is not None else None
        return Backup.objects.create(
            vm=vm, path=f"/nonexistent/{name}", size_bytes=100, verified_at=verified
        )

    recent = make("recent", timedelta(hours=1))
    never = make("never", None)
    old = make("old", timedelta(days=30))
    assert jobs.verify_pass(budget_seconds=60, budget_bytes=200) == "verified 2 backups (200 bytes)"
    statuses = {b.path.rsplit("/", 1)[1]: b.verify_status for b in Backup.objects.all()}
    assert statuses == {"never": "missing", "old": "missing", "recent": "unverified"}
    assert recent.pk and never.pk and old.pk


def test_each_cluster_gets_its_own_reconcile_and_verify_pass():
    import ast

    Host.objects.create(name="a", uri="test:///default", cluster="rack-a")
    b = Host.objects.create(name="b", uri="test:///default", cluster="rack-b")
    Host.objects.create(name="c", uri="test:///default")  # served by the plain schedules
    schedules.install_all()

    for cluster in ("rack-a", "rack-b"):
        for job in ("reconcile", "verify"):
            s = Schedule.objects.get(name=f"vmbackup-{job}@{cluster}")
            assert s.cluster == cluster  # only that cluster's workers run it
            assert ast.literal_eval(s.kwargs) == {"cluster": cluster}
    plain = Schedule.objects.get(name="vmbackup-reconcile")
    assert plain.cluster is None and ast.literal_eval(plain.kwargs) == {"cluster": ""}
    assert not Schedule.objects.filter(name__startswith="vmbackup-sync@").exists()

    b.cluster = ""
    b.save()  # the host signal re-installs: rack-b's copies go
    assert not Schedule.objects.filter(name__endswith="@rack-b").exists()
    assert Schedule.objects.filter(name="vmbackup-reconcile@rack-a").exists()


def test_a_clusters_verify_pass_and_reconcile_keep_to_its_hosts(monkeypatch):
    from backups import reconcile, verify
    from backups.models import Backup

    mine = Host.objects.create(name="a", uri="test:///default", cluster="rack-a")
    other = Host.objects.create(name="b", uri="test:///default", cluster="rack-b")
    for host in (mine, other):
        vm = VirtualMachine.objects.create(host=host, uuid=uuid4(), name=f"vm-{host.name}")
        Backup.objects.create(vm=vm, path=f"/nonexistent/{host.name}")
    verified, repaired = [], []
    monkeypatch.setattr(verify, "verify_backup", lambda b: verified.append(b.vm.host.name))
    monkeypatch.setattr(reconcile, "_repair_host", lambda h, me, r: repaired.append(h.name) or [])
    monkeypatch.setattr(reconcile.adopt, "adopt", lambda roots: reconcile.adopt.Adopted())

    jobs.verify_pass(budget_seconds=60, cluster="rack-a")
    jobs.reconcile(cluster="rack-a")

    assert verified == ["a"] and repaired == ["a"]


def test_an_inventory_sync_leaves_the_housekeeping_schedules_alone():
    host = Host.objects.create(name="a", uri="test:///default", cluster="rack-a")
    schedules.install_all()
    Schedule.objects.filter(name="vmbackup-verify@rack-a").update(next_run="2030-01-01T04:30Z")
    host.save(update_fields=["last_sync_at"])  # what sync_host does every 15 minutes
    schedules.install_housekeeping()  # and a re-install with the same cron keeps it too
    assert Schedule.objects.get(name="vmbackup-verify@rack-a").next_run.year == 2030


def test_one_site_name_many_worker_queues():
    """Every process signs tasks with the site name; Q_CLUSTER_NAME only names a queue."""
    import os
    import subprocess
    import sys

    code = (
        "import django, os; os.environ.setdefault('DJANGO_SETTINGS_MODULE', "
        "'vmbackup_site.settings'); django.setup(); from django_q.conf import Conf; "
        "print(Conf.PREFIX, Conf.CLUSTER_NAME)"
    )
    env = {**os.environ, "Q_CLUSTER_NAME": "rack-a"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=60, check=True)  # fmt: skip
    assert done.stdout.split() == ["vmbackup", "rack-a"]
