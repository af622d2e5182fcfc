"""The scheduled offsite check: a django-q2 schedule like the others, one `restic check` per
enabled repository on its own cluster with the configured share of data read, its result
on the repository row, an alert when it fails and the alert resolved by a later good one.
Real restic, local-path repositories in temporary directories."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from django_q.models import Schedule

from backups import jobs, restic, schedules
from backups.models import Alert, AlertKind, OffsiteRepository
from backups.offsite import restic_repository

pytestmark = pytest.mark.skipif(not os.path.exists(restic.RESTIC), reason="restic is required")


def test_the_schedule_requests_a_check_of_each_enabled_repository_with_the_share(
    offsite, settings, async_calls, django_capture_on_commit_callbacks
):
    settings.VMBACKUP_OFFSITE_CHECK_CRON = "10 3 * * 6"
    settings.VMBACKUP_OFFSITE_CHECK_SUBSET = "7%"
    offsite.cluster = "vault"
    offsite.save()
    OffsiteRepository.objects.create(
        name="off", url="/srv/other", password_file="/etc/pw", enabled=False
    )
    schedules.install_housekeeping()
    schedule = Schedule.objects.get(name=schedules.OFFSITE_CHECK)
    assert (schedule.func, schedule.cron) == ("backups.jobs.check_offsite_all", "10 3 * * 6")
    assert schedule.next_run is not None

    with django_capture_on_commit_callbacks(execute=True):
        assert jobs.check_offsite_all() == "1 check(s) requested"
    ((args, kwargs),) = async_calls
    assert args == ("backups.jobs.check_offsite", offsite.pk, "7%")
    assert kwargs["q_options"]["cluster"] == "vault"  # where its password file is

    settings.VMBACKUP_OFFSITE_CHECK_CRON = ""
    schedules.install_housekeeping()
    assert not Schedule.objects.filter(name=schedules.OFFSITE_CHECK).exists()


def flip(pack: Path) -> None:
    with open(pack, "r+b") as f:
        f.seek(pack.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))


def test_damage_alerts_and_a_later_good_check_resolves_it(offsite, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "disk.img").write_bytes(os.urandom(2 * 1024 * 1024))
    restic.backup(restic_repository(offsite), str(data), ["disk.img"], ["vmbackup"])
    assert jobs.check_offsite(offsite.pk, "100%") == "ok"
    assert not Alert.objects.exists()

    pack = max((p for p in Path(offsite.url, "data").rglob("*") if p.is_file()),
               key=lambda p: p.stat().st_size)  # fmt: skip
    flip(pack)
    assert jobs.check_offsite(offsite.pk, "100%").startswith("errors: ")
    offsite.refresh_from_db()
    assert (offsite.check_ok, offsite.check_subset) == (False, "100%")
    alert = Alert.objects.open().get()
    assert (alert.kind, alert.key, alert.about) == (
        AlertKind.OFFSITE_CHECK, f"offsite-check:{offsite.pk}", "offsite"
    )  # fmt: skip
    assert "failed its check" in alert.subject and "(data read: 100%)" in alert.body
    jobs.check_offsite(offsite.pk, "100%")
    assert Alert.objects.count() == 1  # still open: no second alert

    flip(pack)  # repaired
    assert jobs.check_offsite(offsite.pk, "100%") == "ok"
    alert.refresh_from_db()
    assert alert.resolved_at is not None


def test_a_check_that_cannot_run_alerts_too(offsite, tmp_path):
    wrong = tmp_path / "wrong"
    wrong.write_text("nope\n")
    wrong.chmod(0o600)
    offsite.password_file = str(wrong)
    offsite.save()
    assert jobs.check_offsite(offsite.pk).startswith("failed: wrong password")
    offsite.refresh_from_db()
    assert offsite.check_ok is False
    assert offsite.check_message.startswith("the check could not run: wrong password")
    assert Alert.objects.open().get().kind == AlertKind.OFFSITE_CHECK
