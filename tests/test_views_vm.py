from datetime import timedelta

import pytest
from django.urls import reverse
from django.utils import timezone

from backups import charts
from backups.models import Backup, BackupRun, Kind, Method, RunStatus, Trigger
from tests.helpers import make_backup, make_run


def detail(vm):
    return reverse("vm_detail", args=[vm.pk])


def backup_now(vm):
    return reverse("vm_backup", args=[vm.pk])


def test_it_shows_disks_policies_and_the_chain_tree(viewer_client, policy, vm):
    full = make_backup(vm, ago=timedelta(days=3))
    inc = make_backup(vm, ago=timedelta(days=2), kind=Kind.INCREMENTAL, parent=full)
    newer_full = make_backup(vm, ago=timedelta(days=1))

    response = viewer_client.get(detail(vm))

    assert response.status_code == 200
    assert [(b.pk, depth) for b, depth in response.context["chain"]] == [
        (newer_full.pk, 0),
        (full.pk, 0),
        (inc.pk, 1),
    ]
    assert b"vda" in response.content and b"nightly" in response.content
    assert b"Back up now" not in response.content  # the viewer may not run backups


def test_it_draws_an_escaped_svg_chart_of_recent_runs(viewer_client, vm):
    vm.name = "<script>x</script>"
    vm.save()
    for hours in (3, 2, 1):
        run = make_run(vm, ago=timedelta(hours=hours), bytes_written=hours * 1000)
        run.finished_at = run.started_at + timedelta(minutes=hours)
        run.save()
    make_run(vm, RunStatus.FAILED, ago=timedelta(minutes=30))

    response = viewer_client.get(detail(vm))

    assert response.content.count(b"<rect ") == 8  # size and duration of 4 runs
    assert b'class="bar failed"' in response.content
    assert b"<script>x" not in response.content


def test_it_renders_a_chart_as_a_pure_function():
    when = timezone.now()
    svg = charts.runs_chart([charts.RunPoint(when, 2048, 61, True, label='a"<b>')])
    assert svg.startswith("<svg") and svg.endswith("</svg>")
    assert "2.0 KiB" in svg and "1m01s" in svg
    assert "a&quot;&lt;b&gt;" in svg
    assert charts.runs_chart([]) == ""


def test_it_shows_the_backup_button_to_an_operator(operator_client, vm):
    vm.state = "running"
    vm.save()
    response = operator_client.get(detail(vm))
    assert b"Back up now" in response.content
    assert b'value="snapshot"' in response.content


def test_it_queues_a_backup_and_enqueues_it_on_commit(
    operator_client, vm, async_calls, django_capture_on_commit_callbacks
):
    vm.state = "running"
    vm.save()
    with django_capture_on_commit_callbacks(execute=True):
        response = operator_client.post(backup_now(vm), {"method": Method.SNAPSHOT})

    run = BackupRun.objects.get(vm=vm)
    assert response.status_code == 302
    assert response["Location"] == reverse("run_detail", args=[run.pk])
    assert (run.status, run.method_requested, run.trigger) == (
        RunStatus.QUEUED,
        Method.SNAPSHOT,
        Trigger.BUTTON,
    )
    assert async_calls == [
        (("backups.jobs.run_backup", run.pk), {"q_options": {"task_name": f"backup-{run.pk}"}})
    ]


def test_it_shows_a_message_when_a_run_is_already_active(operator_client, vm, async_calls):
    active = make_run(vm, RunStatus.RUNNING)

    response = operator_client.post(backup_now(vm), {"method": "auto"}, follow=True)

    assert response.redirect_chain == [(detail(vm), 302)]
    assert f"already has an active backup (run {active.pk})" in response.content.decode()
    assert BackupRun.objects.filter(vm=vm).count() == 1
    assert async_calls == []


def test_it_rejects_an_unknown_method(operator_client, vm, async_calls):
    response = operator_client.post(backup_now(vm), {"method": "rm -rf"}, follow=True)
    assert b"Choose a backup method" in response.content
    assert not BackupRun.objects.exists()


def offered(response) -> list[str]:
    form = response.context["backup_form"]
    return [value for value, _label in form.fields["method"].choices]


@pytest.mark.parametrize("state", ["shutoff", "crashed", "other"])
def test_it_offers_only_offline_for_a_vm_that_is_not_running(operator_client, vm, state):
    vm.state = state
    vm.save()
    response = operator_client.get(detail(vm))
    assert offered(response) == ["auto", "offline"]
    assert b'value="push"' not in response.content


@pytest.mark.parametrize("state", ["running", "paused"])
def test_it_offers_the_live_methods_for_a_running_vm(operator_client, vm, policy, state):
    vm.state = state
    vm.save()
    assert offered(operator_client.get(detail(vm))) == ["auto", "push", "snapshot", "memory"]


def test_it_offers_offline_on_a_running_vm_when_its_policy_allows_shutdown(
    operator_client, vm, policy, async_calls
):
    vm.state = "running"
    vm.save()
    policy.shutdown_for_offline = True
    policy.save()
    response = operator_client.get(detail(vm))
    assert offered(response)[-1] == "offline"
    assert "as policy nightly allows" in response.content.decode()
    operator_client.post(backup_now(vm), {"method": "offline"})
    run = BackupRun.objects.get(vm=vm)
    assert (run.method_requested, run.policy) == ("offline", policy)  # its consent travels


def test_it_refuses_a_method_that_does_not_fit_the_state(operator_client, vm, async_calls):
    vm.state = "shutoff"
    vm.save()
    response = operator_client.post(backup_now(vm), {"method": "snapshot"}, follow=True)
    assert "snapshot does not fit web-1 while it is shutoff" in response.content.decode()
    vm.state = "running"
    vm.save()
    response = operator_client.post(backup_now(vm), {"method": "offline"}, follow=True)
    assert "offline does not fit web-1 while it is running" in response.content.decode()
    assert not BackupRun.objects.exists() and async_calls == []


def test_a_shut_off_vm_is_backed_up_offline_without_a_policy(operator_client, vm, async_calls):
    vm.state = "shutoff"
    vm.save()
    operator_client.post(backup_now(vm), {"method": "offline"})
    run = BackupRun.objects.get(vm=vm)
    assert (run.method_requested, run.policy) == ("offline", None)


def test_it_refuses_to_back_up_a_vanished_vm(operator_client, vm, async_calls):
    vm.gone_at = timezone.now()
    vm.save()
    response = operator_client.post(backup_now(vm), {"method": "auto"}, follow=True)
    assert b"is gone from libvirt" in response.content
    assert not BackupRun.objects.exists()


@pytest.mark.parametrize("wanted, expected", [("1", True), ("0", False), ("", True)])
def test_it_sets_or_toggles_protection(owner_client, vm, wanted, expected):
    backup = make_backup(vm)
    response = owner_client.post(
        reverse("backup_protect", args=[backup.pk]), {"protected": wanted, "return_to": "vm"}
    )
    assert response["Location"] == detail(vm)
    backup.refresh_from_db()
    assert backup.protected is expected


def test_it_queues_a_verify_and_returns_to_the_backup(
    owner_client, vm, async_calls, django_capture_on_commit_callbacks
):
    backup = make_backup(vm)
    with django_capture_on_commit_callbacks(execute=True):
        response = owner_client.post(reverse("backup_verify", args=[backup.pk]))
    assert response["Location"] == reverse("backup_detail", args=[backup.pk])
    assert async_calls[0][0] == ("backups.jobs.verify_backup", backup.pk)


def test_it_refuses_to_verify_a_pruned_backup(owner_client, vm, async_calls):
    backup = make_backup(vm, pruned_at=timezone.now())
    response = owner_client.post(reverse("backup_verify", args=[backup.pk]), follow=True)
    assert b"was pruned" in response.content
    assert async_calls == []
    assert Backup.objects.get(pk=backup.pk).verify_status == "unverified"
