"""A slow run is never mistaken for a dead one; the first recorded outcome stands."""

import os
import socket
from datetime import timedelta

import pytest
from django.utils import timezone

from backups import worker
from backups.models import BackupRun, Host, RunStatus, VirtualMachine
from tests.helpers import wait_until


@pytest.fixture
def vm(db):
    host = Host.objects.create(name="h", uri="test:///default")
    return VirtualMachine.objects.create(
        host=host, uuid="6695eb01-f6a4-8304-79aa-97f2502e193f", name="web"
    )


def running(vm, worker: str, beat_ago: timedelta) -> BackupRun:
    beat = timezone.now() - beat_ago
    return BackupRun.objects.create(
        vm=vm, status=RunStatus.RUNNING, worker=worker, heartbeat_at=beat, started_at=beat
    )


def test_it_leaves_a_run_whose_worker_is_alive_here_even_without_heartbeat(vm):
    run = running(vm, f"{socket.gethostname()}:{os.getpid()}", timedelta(hours=2))
    assert worker.is_dead(run, stale_after=60) is False


def test_it_judges_other_hosts_runs_by_their_heartbeat(vm):
    fresh = running(vm, "elsewhere:123", timedelta(seconds=10))
    assert worker.is_dead(fresh, stale_after=60) is False
    fresh.heartbeat_at = timezone.now() - timedelta(minutes=5)
    assert worker.is_dead(fresh, stale_after=60) is True


def test_it_keeps_the_first_recorded_outcome(vm):
    run = running(vm, "elsewhere:123", timedelta(seconds=1))
    BackupRun.objects.get(pk=run.pk).mark_interrupted("worker stopped")
    assert run.mark_failed("late failure") is False
    run.refresh_from_db()
    assert (run.status, run.error) == ("interrupted", "worker stopped")


@pytest.mark.django_db(transaction=True)
def test_it_beats_while_the_run_works_on(vm):
    run = running(vm, "elsewhere:123", timedelta(hours=1))
    with worker.Heartbeat(run.pk, 0.05, BackupRun):
        # the run "works" until the beat shows on its row: no fixed sleep to outlast
        wait_until(lambda: BackupRun.objects.get(pk=run.pk).heartbeat_at > run.heartbeat_at, 10)
    run.refresh_from_db()
    assert run.heartbeat_at > timezone.now() - timedelta(seconds=5)


class FakeStat:
    def __init__(self, host: str, status: str):
        self.host, self.status = host, status


@pytest.mark.parametrize(
    "stats,expected",
    [
        ([], False),
        ([FakeStat("elsewhere", "Idle")], False),
        ([FakeStat(socket.gethostname(), "Stopped")], False),
        ([FakeStat("elsewhere", "Idle"), FakeStat(socket.gethostname(), "Working")], True),
    ],
)
def test_it_sees_a_worker_cluster_only_on_this_machine(monkeypatch, stats, expected):
    monkeypatch.setattr(worker.Stat, "get_all", staticmethod(lambda: stats))
    assert worker.cluster_here() is expected


def test_it_says_no_cluster_when_it_cannot_tell(monkeypatch):
    def broken():
        raise RuntimeError("cache down")

    monkeypatch.setattr(worker.Stat, "get_all", staticmethod(broken))
    assert worker.cluster_here() is False
