"""Alerts: each fires once (Django's locmem mail), names the VM, says what happened, links
to the dashboard; a second pass stays quiet; every alert is on /metrics."""

import uuid
from datetime import timedelta

import pytest
from django.core import mail
from django.test import Client
from django.urls import reverse
from django.utils import timezone
from django_q.models import Schedule, Task

from backups import alerts, dashboard, jobs, notify, schedules, verify
from backups.models import (
    Alert,
    Backup,
    BackupPolicy,
    BackupRun,
    Host,
    RunStatus,
    Trigger,
    VirtualMachine,
)

pytestmark = pytest.mark.django_db
URL = "https://backup.example.com"
TOKEN = "alert-metrics-token"


@pytest.fixture(autouse=True)
def _mail(settings):
    settings.EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"
    settings.VMBACKUP_URL = URL + "/"
    settings.VMBACKUP_NOTIFY_TO = ["site@example.com"]
    settings.VMBACKUP_METRICS_TOKEN = TOKEN
    settings.VMBACKUP_STALE_HOURS = 36
    settings.VMBACKUP_WORKER_DOWN_MINUTES = 15


@pytest.fixture
def commit(django_capture_on_commit_callbacks):
    """Run a pass as its own transaction would: mail leaves when it commits."""

    def run(action, *args, **kwargs):
        with django_capture_on_commit_callbacks(execute=True):
            return action(*args, **kwargs)

    return run


@pytest.fixture
def host():
    return Host.objects.create(name="h1", uri="test:///default")


@pytest.fixture
def worker_alive(host):
    """The plain cluster (hosts without one) has just finished a task."""
    return finished_task("vmbackup", minutes_ago=0)


@pytest.fixture
def vm(host):
    return VirtualMachine.objects.create(
        host=host, uuid=uuid.uuid4(), name="web-1", first_seen_at=timezone.now()
    )


@pytest.fixture
def policy(vm):
    nightly = BackupPolicy.objects.create(
        name="nightly", schedule="", notify_to="ops@example.com", stale_after_hours=6
    )
    nightly.vms.add(vm)
    return nightly


def backup(vm, hours_ago: float, **fields) -> Backup:
    fields.setdefault("path", f"/nonexistent/{vm.name}/{uuid.uuid4().hex}")
    created = timezone.now() - timedelta(hours=hours_ago)
    return Backup.objects.create(vm=vm, created_at=created, **fields)


def metric_lines(prefix: str) -> list[str]:
    body = Client(headers={"Authorization": f"Bearer {TOKEN}"}).get("/metrics").content.decode()
    return [line for line in body.splitlines() if line.startswith(prefix)]


def test_it_mails_a_failed_manual_run_to_the_site_address_once(vm, commit):
    run = BackupRun.objects.create(vm=vm, trigger=Trigger.BUTTON, status=RunStatus.RUNNING)
    run.mark_failed("not enough space at /backups")
    commit(notify.run_finished, run)
    commit(notify.run_finished, run)  # a second caller (reconcile) stays quiet
    (sent,) = mail.outbox
    assert sent.to == ["site@example.com"]
    assert sent.subject == "[vmbackup] backup of web-1 failed"
    assert "not enough space" in sent.body and "Trigger: button (no policy)" in sent.body
    assert f"{URL}/runs/{run.pk}/" in sent.body
    run.refresh_from_db()
    assert run.journal[-1] == {**run.journal[-1], "step": "notified", "to": ["site@example.com"]}
    assert 'vmbackup_alerts_total{kind="run-failed"} 1' in metric_lines("vmbackup_alerts_total")
    assert metric_lines("vmbackup_alert_active{") == [
        'vmbackup_alert_active{kind="run-failed",vm="web-1"} 1'
    ]


def test_a_later_success_resolves_a_failed_run_alert(vm, commit, worker_alive):
    failed = BackupRun.objects.create(vm=vm, status=RunStatus.FAILED, error="boom")
    commit(notify.run_finished, failed)
    BackupRun.objects.create(vm=vm, status=RunStatus.SUCCEEDED)
    commit(alerts.check)
    assert Alert.objects.open().count() == 0
    assert metric_lines("vmbackup_alert_active{") == []


def test_it_mails_a_stale_vm_once_and_resolves_it_after_a_backup(vm, policy, commit, worker_alive):
    backup(vm, hours_ago=10)  # the policy's window is 6 hours (the site's 36)
    assert dashboard.overview()["vms"][0].protection == dashboard.STALE  # the overview agrees
    assert commit(jobs.check_alerts) == "1 stale, 0 worker alerts raised"
    commit(jobs.check_alerts)
    (sent,) = mail.outbox
    assert sent.to == ["ops@example.com"]
    assert sent.subject == "[vmbackup] web-1 has no backup newer than 6 hours"
    assert "The last good backup of web-1 on h1:" in sent.body
    assert f"{URL}/vms/{vm.pk}/" in sent.body
    assert metric_lines("vmbackup_alert_active{") == [
        'vmbackup_alert_active{kind="stale",vm="web-1"} 1'
    ]
    backup(vm, hours_ago=1)
    commit(jobs.check_alerts)
    assert Alert.objects.open().count() == 0 and len(mail.outbox) == 1
    assert dashboard.overview()["vms"][0].protection == dashboard.OK


def test_it_uses_the_site_window_when_the_policy_sets_none(vm, policy, commit, settings):
    BackupPolicy.objects.filter(pk=policy.pk).update(stale_after_hours=None)
    backup(vm, hours_ago=10)
    commit(alerts.check)
    assert mail.outbox == []
    settings.VMBACKUP_STALE_HOURS = 8
    commit(alerts.check)
    assert [m.subject for m in mail.outbox] == ["[vmbackup] web-1 has no backup newer than 8 hours"]


def test_a_vm_never_backed_up_is_stale_once_its_window_has_passed(vm, policy, commit):
    commit(alerts.check)
    assert mail.outbox == []
    VirtualMachine.objects.filter(pk=vm.pk).update(first_seen_at=timezone.now() - timedelta(7))
    commit(alerts.check)
    (sent,) = mail.outbox
    assert "The last good backup of web-1 on h1: never." in sent.body


def test_it_mails_a_corrupt_backup_once(vm, policy, commit, tmp_path):
    directory = tmp_path / "20261201T020000Z-1"
    directory.mkdir()
    (directory / "vda.qcow2").write_bytes(b"rotten")
    found = backup(vm, hours_ago=1, path=str(directory))
    assert commit(verify.verify_backup, found).startswith("corrupt:")
    commit(verify.verify_backup, found)  # the nightly pass finds it again: no second mail
    (sent,) = mail.outbox
    assert sent.to == ["ops@example.com"]
    assert sent.subject == "[vmbackup] backup of web-1 is corrupt"
    assert "SHA256SUMS" in sent.body and f"{URL}/backups/{found.pk}/" in sent.body
    assert metric_lines("vmbackup_alert_active{") == [
        'vmbackup_alert_active{kind="corrupt",vm="web-1"} 1'
    ]


def test_it_mails_a_missing_backup(vm, commit):
    found = backup(vm, hours_ago=1)
    commit(verify.verify_backup, found)
    assert [m.subject for m in mail.outbox] == ["[vmbackup] backup of web-1 is missing"]
    assert mail.outbox[0].to == ["site@example.com"]  # no policy: the site's address


def finished_task(cluster: str, minutes_ago: float) -> Task:
    stopped = timezone.now() - timedelta(minutes=minutes_ago)
    return Task.objects.create(
        id=uuid.uuid4().hex,
        name=f"t-{uuid.uuid4().hex[:8]}",
        func="backups.jobs.check_alerts",
        started=stopped,
        stopped=stopped,
        success=True,
        cluster=cluster,
    )


def test_it_mails_once_when_a_cluster_is_silent_too_long(host, vm, policy, commit):
    far = Host.objects.create(name="far-host", uri="test:///default", cluster="far")
    finished_task("vmbackup", minutes_ago=1)  # the plain cluster (hosts without one) lives
    finished_task("far", minutes_ago=20)
    commit(alerts.check)
    commit(alerts.check)
    (sent,) = mail.outbox
    assert sent.subject == "[vmbackup] no live worker for far-host"
    assert "No worker of cluster far (hosts: far-host)" in sent.body
    assert sent.to == ["site@example.com"]  # no policy names a VM of that host
    assert f"{URL}/" in sent.body
    assert metric_lines("vmbackup_alert_active{") == [
        'vmbackup_alert_active{kind="no-worker",vm="far"} 1'
    ]
    finished_task("far", minutes_ago=0)  # it is back
    commit(alerts.check)
    assert not Alert.objects.open().exists() and far.pk


def test_a_cluster_never_heard_from_gets_its_grace_first(host, commit, monkeypatch):
    commit(alerts.check)
    pending = Alert.objects.get()
    assert pending.fired_at is None and mail.outbox == []
    assert metric_lines("vmbackup_alert_active{") == []  # not an alert yet
    later = timezone.now() + timedelta(minutes=16)
    commit(alerts.check, later)
    commit(alerts.check, later)
    assert [m.subject for m in mail.outbox] == ["[vmbackup] no live worker for h1"]


def test_a_cluster_back_within_its_grace_is_never_mailed(host, commit):
    commit(alerts.check)
    finished_task("vmbackup", minutes_ago=0)
    commit(alerts.check, timezone.now() + timedelta(minutes=1))
    commit(alerts.check, timezone.now() + timedelta(minutes=10))
    assert mail.outbox == [] and not Alert.objects.open().exists()


def test_a_mail_failure_is_recorded_on_the_alert(vm, commit, settings):
    settings.EMAIL_BACKEND = "django.core.mail.backends.smtp.EmailBackend"
    settings.EMAIL_HOST, settings.EMAIL_PORT, settings.EMAIL_TIMEOUT = "127.0.0.1", 9, 2
    run = BackupRun.objects.create(vm=vm, status=RunStatus.FAILED, error="boom")
    commit(notify.run_finished, run)
    alert = Alert.objects.get()
    assert alert.mail_error and alert.mailed_at and alert.fired_at


def test_the_check_is_scheduled_on_every_cluster(host):
    Host.objects.create(name="far-host", uri="test:///default", cluster="far")
    schedules.install_housekeeping()
    plain = Schedule.objects.get(name="vmbackup-alerts")
    far = Schedule.objects.get(name="vmbackup-alerts@far")
    assert plain.func == far.func == "backups.jobs.check_alerts"
    assert (far.cluster, far.kwargs) == ("far", "{'cluster': 'far'}")


def test_the_admin_sends_a_test_mail(admin_client, policy):
    BackupPolicy.objects.create(name="quiet", schedule="")
    response = admin_client.post(
        reverse("admin:backups_backuppolicy_changelist"),
        {
            "action": "send_test_mail",
            "_selected_action": list(BackupPolicy.objects.values_list("pk", flat=True)),
        },
        follow=True,
    )
    assert response.status_code == 200
    assert sorted(tuple(m.to) for m in mail.outbox) == [
        ("ops@example.com",),
        ("site@example.com",),
    ]
    assert all(m.subject == "[vmbackup] test mail" and URL in m.body for m in mail.outbox)
    assert "test mail sent to ops@example.com" in response.content.decode()


def test_the_test_mail_says_when_nobody_would_hear(admin_client, policy, settings):
    settings.VMBACKUP_NOTIFY_TO = []
    BackupPolicy.objects.filter(pk=policy.pk).update(notify_to="")
    response = admin_client.post(
        reverse("admin:backups_backuppolicy_changelist"),
        {"action": "send_test_mail", "_selected_action": [policy.pk]},
        follow=True,
    )
    assert "not sent: no recipients" in response.content.decode()
    assert mail.outbox == []
