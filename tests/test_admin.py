"""Admin actions call the same jobs as the dashboard."""

import pytest
from django.urls import reverse

from backups.models import Backup, BackupRun, Host, VirtualMachine

pytestmark = pytest.mark.django_db


@pytest.fixture
def sent(monkeypatch):
    calls = []
    monkeypatch.setattr("backups.jobs.async_task", lambda *a, **k: calls.append(a))
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
