from datetime import timedelta

import pytest
from django.urls import reverse
from django.utils import timezone

from backups import dashboard
from backups.models import BackupRun, RunStatus
from tests.helpers import make_run, populate

LIST = reverse("run_list")


def progress_url(run):
    return reverse("run_progress", args=[run.pk])


def test_it_polls_the_progress_partial_while_the_run_is_active(viewer_client, vm):
    run = make_run(vm, RunStatus.RUNNING)
    response = viewer_client.get(reverse("run_detail", args=[run.pk]))
    content = response.content.decode()
    assert f'hx-get="{progress_url(run)}"' in content
    assert 'hx-trigger="every 1s"' in content


def test_it_does_not_poll_a_finished_run(viewer_client, vm):
    run = make_run(vm, RunStatus.SUCCEEDED)
    response = viewer_client.get(reverse("run_detail", args=[run.pk]))
    assert b"hx-get" not in response.content


def test_it_returns_200_from_the_partial_while_running(viewer_client, vm, monkeypatch):
    now = timezone.now()
    monkeypatch.setattr("backups.dashboard.timezone.now", lambda: now)  # rate, ETA exact
    run = make_run(
        vm,
        RunStatus.RUNNING,
        started_at=now - timedelta(seconds=100),
        bytes_done=50 * 2**20,
        bytes_total=200 * 2**20,
        journal=[{"at": (now - timedelta(seconds=100)).isoformat(), "step": "copy", "disk": "vda"}],
    )

    response = viewer_client.get(progress_url(run), headers={"HX-Request": "true"})

    assert response.status_code == 200
    content = response.content.decode()
    assert '<progress max="209715200" value="52428800">' in content
    assert "(25%)" in content
    assert "512.0 KiB/s" in content
    assert "about 5m00s left" in content
    assert "disk=vda" in content
    assert "<html" not in content  # a fragment, not a page


def test_it_counts_the_rate_over_the_copy_only(viewer_client, vm, monkeypatch):
    now = timezone.now()
    monkeypatch.setattr("backups.dashboard.timezone.now", lambda: now)
    at = lambda seconds: (now - timedelta(seconds=seconds)).isoformat()  # noqa: E731
    run = make_run(
        vm,
        RunStatus.SUCCEEDED,
        started_at=now - timedelta(seconds=100),
        finished_at=now,
        bytes_done=80 * 2**20,
        bytes_total=80 * 2**20,
        journal=[{"at": at(90), "step": "copy"}, {"at": at(80), "step": "hash"}],
    )
    content = viewer_client.get(progress_url(run)).content.decode()
    assert "8.0 MiB/s" in content  # 80 MiB in the 10 s of copying, not over 100 s


@pytest.mark.parametrize("status", [RunStatus.SUCCEEDED, RunStatus.FAILED, RunStatus.CANCELLED])
def test_it_returns_286_from_the_partial_once_finished(viewer_client, vm, status):
    run = make_run(vm, status, error="boom" if status == RunStatus.FAILED else "")
    response = viewer_client.get(progress_url(run))
    assert response.status_code == 286


def test_it_computes_rate_and_eta():
    now = timezone.now()
    run = BackupRun(
        status=RunStatus.RUNNING,
        started_at=now - timedelta(seconds=10),
        bytes_done=100,
        bytes_total=400,
    )
    progress = dashboard.progress(run, now)
    assert (progress.percent, progress.rate, progress.eta) == (25, 10.0, timedelta(seconds=30))
    assert dashboard.progress(BackupRun(status=RunStatus.QUEUED), now).rate is None


def test_it_cancels_a_queued_run(operator_client, vm):
    run = make_run(vm, RunStatus.QUEUED)
    response = operator_client.post(reverse("run_cancel", args=[run.pk]))
    assert response["Location"] == reverse("run_detail", args=[run.pk])
    run.refresh_from_db()
    assert run.status == RunStatus.CANCELLED


def test_it_asks_a_running_run_to_stop(operator_client, vm):
    run = make_run(vm, RunStatus.RUNNING)
    operator_client.post(reverse("run_cancel", args=[run.pk]))
    run.refresh_from_db()
    assert (run.status, run.cancel_requested) == (RunStatus.RUNNING, True)


def test_it_leaves_a_finished_run_alone(operator_client, vm):
    run = make_run(vm, RunStatus.FAILED)
    response = operator_client.post(reverse("run_cancel", args=[run.pk]), follow=True)
    assert b"already finished" in response.content
    run.refresh_from_db()
    assert run.status == RunStatus.FAILED


def test_it_filters_runs_by_status(viewer_client, vm):
    failed = make_run(vm, RunStatus.FAILED)
    make_run(vm, RunStatus.SUCCEEDED)
    response = viewer_client.get(LIST, {"status": "failed"})
    assert [r.pk for r in response.context["page"].object_list] == [failed.pk]
    assert len(viewer_client.get(LIST, {"status": "nonsense"}).context["page"].object_list) == 2


def test_it_paginates_runs_by_50(viewer_client, vm):
    BackupRun.objects.bulk_create(BackupRun(vm=vm, status=RunStatus.SUCCEEDED) for _ in range(120))
    page3 = viewer_client.get(LIST, {"page": 3}).context["page"]
    assert (len(page3.object_list), page3.paginator.num_pages) == (20, 3)


def test_it_keeps_the_filter_when_paging(viewer_client, vm):
    BackupRun.objects.bulk_create(BackupRun(vm=vm, status=RunStatus.FAILED) for _ in range(60))
    response = viewer_client.get(LIST, {"status": "failed"})
    assert b"?status=failed&amp;page=2" in response.content


@pytest.mark.parametrize("count", [10, 1000])
def test_it_costs_the_same_queries_for_10_and_1000_runs(
    viewer_client, host, count, django_assert_num_queries
):
    populate(host, count)
    # session, user, 2 x permissions, count, page
    with django_assert_num_queries(6):
        response = viewer_client.get(LIST)
    assert len(response.context["page"].object_list) == min(count, 50)


def test_it_shows_the_checksum_pass_while_it_outlasts_the_copy(viewer_client, vm):
    run = make_run(
        vm, RunStatus.RUNNING, bytes_done=100, bytes_total=100,
        bytes_hashed=30 * 2**20, bytes_to_hash=120 * 2**20,
    )  # fmt: skip
    content = viewer_client.get(progress_url(run)).content.decode()
    assert f'<progress max="{120 * 2**20}" value="{30 * 2**20}">checksums</progress>' in content
    assert "checksums: 30.0\xa0MB of 120.0\xa0MB hashed" in content

    BackupRun.objects.filter(pk=run.pk).update(status=RunStatus.SUCCEEDED)
    assert "checksums" not in viewer_client.get(progress_url(run)).content.decode()
