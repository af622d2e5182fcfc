"""Admin actions call the same jobs as the dashboard."""

import pytest
from django.urls import reverse
from django_q.models import Schedule

from backups.models import Backup, BackupPolicy, BackupRun, Host, VirtualMachine

pytestmark = pytest.mark.django_db


@pytest.fixture
def sent(monkeypatch):
    calls = []
    monkeypatch.setattr("backups.requests.async_task", lambda *a, **k: calls.append(a))
    return calls


@pytest.fixture
def vm():
    host = Host.objects.create(name="h", uri="test:///default")
    return VirtualMachine.objects.create(
        host=host, uuid="6695eb01-f6a4-8304-79aa-97f2502e193f", name="web"
    )


def test_it_backs_up_from_the_admin(admin_client, vm, sent, django_capture_on_commit_callbacks):
    url = reverse("admin:backups_virtualmachine_changelist")
    with django_capture_on_commit_callbacks(execute=True):
        response = admin_client.post(
            url, {"action": "back_up_now", "_selected_action": [vm.pk]}, follow=True
        )
    run = BackupRun.objects.get()
    assert (run.trigger, run.status) == ("admin", "queued")
    assert sent == [("backups.jobs.run_backup", run.pk)]
    assert f"backup queued (run {run.pk})" in response.content.decode()


def test_it_reports_a_busy_vm_instead_of_queueing(admin_client, vm, sent):
    BackupRun.objects.create(vm=vm, status="running")
    url = reverse("admin:backups_virtualmachine_changelist")
    response = admin_client.post(
        url, {"action": "back_up_now", "_selected_action": [vm.pk]}, follow=True
    )
    assert "already has an active backup" in response.content.decode()
    assert BackupRun.objects.count() == 1


def test_it_verifies_from_the_admin(admin_client, vm, sent, django_capture_on_commit_callbacks):
    backup = Backup.objects.create(vm=vm, path="/var/backups/vms/web/20260101T000000Z-1")
    url = reverse("admin:backups_backup_changelist")
    with django_capture_on_commit_callbacks(execute=True):
        admin_client.post(url, {"action": "verify_now", "_selected_action": [backup.pk]})
    assert sent == [("backups.jobs.verify_backup", backup.pk)]


# --- the admin is not a root shell ----------------------------------------------------------------


def policy_data(**changes) -> dict:
    data = {
        "name": "nightly",
        "enabled": "on",
        "schedule": "0 2 * * *",
        "method": "auto",
        "compression": "none",
        "exclude_disks": "",
        "verify_after": "on",
        "destination": "",
        "full_every": "7",
        "keep_last": "7",
        "keep_hourly": "0",
        "keep_daily": "7",
        "keep_weekly": "4",
        "keep_monthly": "6",
        "keep_yearly": "0",
        **{name: "0" for name in BackupPolicy.OFFSITE_KEEP_FIELDS},
        "notify_to": "",
        "drill_timeout": "300",
    }
    data.update(changes)
    return data


@pytest.mark.parametrize(
    "uri",
    [
        "qemu+ext:///system?command=/bin/sh",
        "qemu+ssh://kvm1/system?command=/tmp/x",
        "qemu+unix:///system?socket=/tmp/evil.sock",
    ],
)
def test_it_refuses_a_uri_that_runs_programs(admin_client, settings, uri):
    settings.VMBACKUP_ALLOW_TEST_URI = False
    response = admin_client.post(
        reverse("admin:backups_host_add"), {"name": "evil", "uri": uri, "cluster": ""}
    )
    assert response.status_code == 200
    assert "is not an accepted libvirt URI" in response.content.decode()
    assert not Host.objects.filter(name="evil").exists()


def test_it_refuses_to_change_a_host_to_a_bad_uri(admin_client, vm):
    url = reverse("admin:backups_host_change", args=[vm.host.pk])
    response = admin_client.post(url, {"name": "h", "uri": "qemu+ext:///x", "cluster": ""})
    assert response.status_code == 200
    vm.host.refresh_from_db()
    assert vm.host.uri == "test:///default"


def test_it_saves_a_plain_ssh_uri(admin_client):
    uri = "qemu+ssh://root@kvm1.example.com/system"
    admin_client.post(reverse("admin:backups_host_add"), {"name": "kvm1", "uri": uri})
    assert Host.objects.get(name="kvm1").uri == uri


def test_it_refuses_a_destination_outside_the_roots(admin_client, settings):
    settings.VMBACKUP_ROOT, settings.VMBACKUP_ROOTS = "/srv/main", ["/srv/nas"]
    url = reverse("admin:backups_backuppolicy_add")
    response = admin_client.post(url, policy_data(destination="/etc"))
    assert response.status_code == 200
    assert "/etc is not a configured backup root" in response.content.decode()
    assert not BackupPolicy.objects.exists()
    admin_client.post(url, policy_data(destination="/srv/nas"))
    assert BackupPolicy.objects.get().destination == "/srv/nas"


@pytest.mark.parametrize("view", ["add", "change"])
def test_it_makes_an_invalid_cron_a_form_error(admin_client, view):
    if view == "add":
        url = reverse("admin:backups_backuppolicy_add")
    else:
        policy = BackupPolicy.objects.create(name="nightly")
        url = reverse("admin:backups_backuppolicy_change", args=[policy.pk])
    response = admin_client.post(url, policy_data(schedule="0 25 * * *"))
    assert response.status_code == 200
    assert "hour: 25 is outside 0-23" in response.content.decode()
    assert not BackupPolicy.objects.filter(schedule="0 25 * * *").exists()


@pytest.fixture
def schedule():
    return Schedule.objects.create(name="x", func="backups.jobs.reconcile", schedule_type="I")


@pytest.mark.parametrize("model", ["schedule", "success", "failure", "ormq"])
def test_it_shows_django_q_rows_but_allows_no_add(admin_client, model):
    assert admin_client.get(reverse(f"admin:django_q_{model}_changelist")).status_code == 200
    assert admin_client.get(reverse(f"admin:django_q_{model}_add")).status_code == 403


def test_it_allows_no_change_or_delete_of_a_schedule(admin_client, schedule):
    change = reverse("admin:django_q_schedule_change", args=[schedule.pk])
    page = admin_client.get(change)
    assert page.status_code == 200 and b'name="func"' not in page.content  # read-only view
    response = admin_client.post(change, {"name": "x", "func": "os.system", "args": "'id'"})
    assert response.status_code == 403
    delete = reverse("admin:django_q_schedule_delete", args=[schedule.pk])
    assert admin_client.post(delete, {"post": "yes"}).status_code == 403
    schedule.refresh_from_db()
    assert schedule.func == "backups.jobs.reconcile"


def test_it_offers_no_action_on_django_q_rows(admin_client, schedule):
    url = reverse("admin:django_q_schedule_changelist")
    assert b'name="action"' not in admin_client.get(url).content
    admin_client.post(url, {"action": "delete_selected", "_selected_action": [schedule.pk]})
    assert Schedule.objects.filter(pk=schedule.pk).exists()


def test_it_verifies_a_backup_once_while_queued(admin_client, vm, sent):
    backup = Backup.objects.create(vm=vm, path="/var/backups/vms/web/20260101T000000Z-1")
    url = reverse("admin:backups_backup_changelist")
    admin_client.post(url, {"action": "verify_now", "_selected_action": [backup.pk]})
    response = admin_client.post(
        url, {"action": "verify_now", "_selected_action": [backup.pk]}, follow=True
    )
    assert "already had a verification queued or running" in response.content.decode()
    backup.refresh_from_db()
    assert backup.verify_queued_at is not None
