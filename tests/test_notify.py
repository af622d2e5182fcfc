"""Failure mail to a policy's recipients (sent once the run's transaction commits)."""

import pytest
from django.core import mail

from backups import notify, reconcile
from backups.models import BackupPolicy, BackupRun, Host, RunStatus, VirtualMachine

pytestmark = pytest.mark.django_db


@pytest.fixture
def run(settings):
    settings.VMBACKUP_URL = "https://backup.example.com/"
    host = Host.objects.create(name="h1", uri="test:///default")
    vm = VirtualMachine.objects.create(
        host=host, uuid="6695eb01-f6a4-8304-79aa-97f2502e193f", name="web 1"
    )
    policy = BackupPolicy.objects.create(
        name="nightly", schedule="", notify_to="ops@example.com, oncall@example.com"
    )
    return BackupRun.objects.create(vm=vm, policy=policy, status=RunStatus.RUNNING)


def test_it_mails_the_policys_recipients_when_a_run_fails(run, django_capture_on_commit_callbacks):
    run.mark_failed("refused: not enough space at /backups")
    with django_capture_on_commit_callbacks(execute=True):
        notify.run_finished(run)
        assert mail.outbox == []  # not before the commit
    (sent,) = mail.outbox
    assert sent.to == ["ops@example.com", "oncall@example.com"]
    assert sent.subject == "[vmbackup] backup of web 1 failed"
    assert "not enough space" in sent.body
    assert f"https://backup.example.com/runs/{run.pk}/" in sent.body
    assert run.journal[-1]["step"] == "notified"


def test_it_stays_quiet_on_success_and_without_recipients(run, django_capture_on_commit_callbacks):
    run.mark_succeeded()
    BackupPolicy.objects.filter(pk=run.policy_id).update(notify_to="")
    other = BackupRun.objects.create(vm=run.vm, policy=run.policy, status=RunStatus.FAILED)
    other.refresh_from_db()
    with django_capture_on_commit_callbacks(execute=True):
        notify.run_finished(run)
        notify.run_finished(other)
    assert mail.outbox == []


def test_it_never_fails_the_run_because_mail_fails(
    run, settings, django_capture_on_commit_callbacks
):
    settings.EMAIL_BACKEND = "django.core.mail.backends.smtp.EmailBackend"
    settings.EMAIL_HOST, settings.EMAIL_PORT, settings.EMAIL_TIMEOUT = "127.0.0.1", 9, 2
    run.mark_failed("boom")
    with django_capture_on_commit_callbacks(execute=True):
        notify.run_finished(run)
    run.refresh_from_db()
    assert run.status == "failed"
    assert run.journal[-1]["step"] == "notify-failed"


def test_it_mails_when_reconcile_finds_a_dead_run(run, django_capture_on_commit_callbacks):
    BackupRun.objects.filter(pk=run.pk).update(worker="elsewhere:1", heartbeat_at=None)
    with django_capture_on_commit_callbacks(execute=True):
        reconcile.reconcile(stale_after=0)
        reconcile.reconcile(stale_after=0)  # a second pass does not mail again
    run.refresh_from_db()
    assert run.status == "interrupted"
    assert [m.subject for m in mail.outbox] == ["[vmbackup] backup of web 1 interrupted"]
