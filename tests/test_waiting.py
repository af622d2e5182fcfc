"""Runs no worker took: reported while a cluster is alive, and enqueued again when the
broker holds no task a worker could still take for them (``backups.waiting``)."""

from datetime import timedelta

import pytest
from django.urls import reverse
from django.utils import timezone
from django_q.models import OrmQ
from django_q.signing import SignedPackage

from backups import alerts, requests, waiting
from backups.models import Alert, BackupRun, Host, RunStatus, VirtualMachine


@pytest.fixture
def vm(db):
    host = Host.objects.create(name="hv1", uri="test:///default")
    return VirtualMachine.objects.create(host=host, name="web1", uuid="0" * 31 + "1")


def tasks_for(run) -> list[OrmQ]:
    return [
        q
        for q in OrmQ.objects.all()
        if SignedPackage.loads(q.payload)["name"] == f"backup-{run.pk}"
    ]


def queued(vm, minutes: int, django_capture_on_commit_callbacks) -> BackupRun:
    with django_capture_on_commit_callbacks(execute=True):
        run = requests.request_backup(vm)
    BackupRun.objects.filter(pk=run.pk).update(
        created_at=timezone.now() - timedelta(minutes=minutes)
    )
    run.refresh_from_db()
    return run


def test_it_leaves_a_run_whose_task_waits_in_the_broker(vm, django_capture_on_commit_callbacks):
    run = queued(vm, 10, django_capture_on_commit_callbacks)

    found = waiting.check()

    assert [(w.run.pk, w.requeued) for w in found] == [(run.pk, False)]
    assert len(tasks_for(run)) == 1


def test_it_enqueues_again_a_run_whose_task_was_taken_and_never_ran(
    vm, django_capture_on_commit_callbacks
):
    run = queued(vm, 10, django_capture_on_commit_callbacks)
    OrmQ.objects.update(lock=timezone.now() + timedelta(days=1))  # taken by a dead cluster

    with django_capture_on_commit_callbacks(execute=True):
        found = waiting.check()

    assert [(w.run.pk, w.requeued) for w in found] == [(run.pk, True)]
    [task] = tasks_for(run)
    assert task.lock <= timezone.now()
    run.refresh_from_db()
    assert run.status == RunStatus.QUEUED
    assert [e["step"] for e in run.journal] == ["requeued"]
    assert waiting.check() == []  # not again before another period


def test_it_enqueues_again_a_run_whose_task_is_gone(vm, django_capture_on_commit_callbacks):
    run = queued(vm, 10, django_capture_on_commit_callbacks)
    OrmQ.objects.all().delete()

    with django_capture_on_commit_callbacks(execute=True):
        waiting.check()

    assert len(tasks_for(run)) == 1


def test_it_leaves_a_run_queued_a_short_while(vm, django_capture_on_commit_callbacks):
    queued(vm, 1, django_capture_on_commit_callbacks)
    OrmQ.objects.all().delete()

    assert waiting.check() == []


def test_it_alerts_while_a_cluster_claims_to_be_alive(
    vm, django_capture_on_commit_callbacks, monkeypatch
):
    run = queued(vm, 10, django_capture_on_commit_callbacks)
    heard = []
    monkeypatch.setattr(waiting, "clusters_alive", lambda: True)
    waiting.run_waiting.connect(lambda sender, **kw: heard.append(kw), weak=False, dispatch_uid="t")
    try:
        waiting.check()
    finally:
        waiting.run_waiting.disconnect(dispatch_uid="t")

    assert [(h["run"].pk, h["host"].name, h["since"]) for h in heard] == [
        (run.pk, "hv1", run.created_at)
    ]


def test_it_says_whom_a_queued_run_waits_for(admin_client, vm, django_capture_on_commit_callbacks):
    run = queued(vm, 10, django_capture_on_commit_callbacks)

    page = admin_client.get(reverse("run_progress", args=[run.pk])).content.decode()

    assert f"waiting for a worker on hv1 since {run.created_at:%Y-%m-%d %H:%M:%S}" in page


def test_it_mails_once_about_a_run_no_worker_takes(
    vm, django_capture_on_commit_callbacks, monkeypatch, settings, mailoutbox
):
    settings.VMBACKUP_NOTIFY_TO = "ops@example.com"
    settings.VMBACKUP_URL = "https://backup.example.com"
    run = queued(vm, 10, django_capture_on_commit_callbacks)
    monkeypatch.setattr(waiting, "clusters_alive", lambda: True)
    for _ in range(2):
        with django_capture_on_commit_callbacks(execute=True):
            waiting.check()

    assert len(mailoutbox) == 1
    assert "web1" in mailoutbox[0].subject and "hv1" in mailoutbox[0].subject
    assert f"https://backup.example.com/runs/{run.pk}/" in mailoutbox[0].body
    BackupRun.objects.filter(pk=run.pk).update(status=RunStatus.SUCCEEDED)
    alerts.resolve_recovered()
    assert not Alert.objects.open().exists()
