"""The policy page's preview says what django-q2 will fire.

The reference is django-q2 itself, unmodified: a policy is saved (our ``schedules`` installs
its Schedule), then the clock is moved to just after each ``next_run`` and django-q2's own
``scheduler()`` fires it and sets the next one. Only the clock, ``async_task`` (the queue) and
the closing of stale database connections (it would close the test's) are replaced.
"""

from datetime import UTC, datetime, timedelta
from uuid import uuid4

import pytest
from django.utils import timezone as dj_timezone
from django_q import scheduler as q_scheduler
from django_q.conf import Conf
from django_q.models import Schedule

from backups import cron
from backups.models import BackupPolicy

pytestmark = pytest.mark.django_db

BERLIN = "Europe/Berlin"
RUNS = 6


@pytest.fixture
def zone(settings, monkeypatch):
    """Run in a time zone; django-q2 reads its own copy of TIME_ZONE at import."""

    def use(name: str):
        settings.TIME_ZONE = name
        monkeypatch.setattr(Conf, "TIME_ZONE", name)
        return dj_timezone.get_default_timezone()

    return use


@pytest.fixture
def fired(monkeypatch):
    """The next ``n`` times django-q2 fires a policy with ``expr`` saved at ``start``; the
    scheduler wakes ``late`` after each due time, as its polling loop does."""
    clock = {}

    def now():
        """Each look at the clock takes a second: a spinning scheduler sees time pass."""
        clock["now"] += timedelta(seconds=1)
        return clock["now"]

    monkeypatch.setattr(dj_timezone, "now", now)
    monkeypatch.setattr(q_scheduler, "async_task", lambda *a, **k: uuid4().hex)
    monkeypatch.setattr(q_scheduler, "close_old_django_connections", lambda: None)

    def run(expr: str, start: datetime, n: int = RUNS, late=timedelta(seconds=1)):
        clock["now"] = start
        policy = BackupPolicy.objects.create(name="p", schedule=expr)
        schedule = Schedule.objects.get(name=f"policy-{policy.pk}")
        times = []
        for _ in range(n):
            times.append(schedule.next_run)
            clock["now"] = schedule.next_run + late
            q_scheduler.scheduler(broker=object())
            schedule.refresh_from_db()
            assert schedule.next_run > times[-1], "django-q2's scheduler did not fire"
        return times

    return run


def utc(times):
    """Instants, so that autumn's two 02:30 in one zone compare as different."""
    return [t.astimezone(UTC).strftime("%Y-%m-%d %H:%M") for t in times]


TRICKY = [
    "0 2 * * *",
    "0 2 1-7 * 1",  # both day fields restricted: either matches
    "0 2 1 * mon",
    "0 0 13 * fri",
    "0 0 */2 * 1",  # croniter: "*/2" restricts, so odd days OR Mondays
    "0 0 1-31 * 1",
    "*/15 * * * *",
    "1-30/7 * * * *",
    "5/20 1-3/2 * * *",
    "0 0 1,15 feb,mar *",
    "0 0 31 * *",  # months without a 31st are skipped
    "0 0 28-31 * *",
    "0 0 29 2 *",  # Feb 29, next leap year
    "0 0 * * 0,7",
    "0 9 * * mon-fri",
    "30 2 * * *",  # 02:30 does not exist in spring and happens twice in autumn (Berlin)
    "0 2 * * *",
    "*/30 1-3 * * *",
    "30 2 * 3,10 sun",
]
STARTS = {
    "UTC": [datetime(2026, 1, 1), datetime(2027, 2, 20, 12)],
    BERLIN: [datetime(2026, 3, 28, 12), datetime(2026, 10, 24, 12), datetime(2028, 2, 27)],
}


@pytest.mark.parametrize("tz_name", STARTS)
@pytest.mark.parametrize("expr", TRICKY)
def test_it_previews_what_django_q2_fires(expr, tz_name, zone, fired):
    tz = zone(tz_name)
    for naive in STARTS[tz_name]:
        start = naive.replace(tzinfo=tz)
        preview = cron.next_runs(expr, dj_timezone.localtime(start), RUNS)
        assert utc(preview) == utc(fired(expr, start)), (expr, start)
        BackupPolicy.objects.all().delete()


@pytest.mark.parametrize("late", [timedelta(seconds=1), timedelta(seconds=45)])
def test_it_agrees_however_late_the_scheduler_wakes(late, zone, fired):
    start = datetime(2026, 10, 24, 12, tzinfo=zone(BERLIN))
    expr = "*/30 1-3 * * *"
    assert utc(cron.next_runs(expr, start, 10)) == utc(fired(expr, start, 10, late))


def test_it_runs_either_day_when_both_day_fields_are_restricted():
    runs = cron.next_runs("0 2 1-7 * 1", datetime(2026, 1, 1, tzinfo=UTC), 8)
    assert [f"{r:%a %d}" for r in runs] == [
        "Thu 01", "Fri 02", "Sat 03", "Sun 04", "Mon 05", "Tue 06", "Wed 07", "Mon 12",
    ]  # fmt: skip


def test_it_counts_a_stepped_star_as_a_restriction():
    runs = cron.next_runs("0 0 */2 * 1", datetime(2026, 1, 1, tzinfo=UTC), 4)
    assert [f"{r:%a %d}" for r in runs] == ["Sat 03", "Mon 05", "Wed 07", "Fri 09"]


def test_it_fires_at_the_end_of_the_spring_gap(zone):
    spring = cron.next_runs("30 2 * * *", datetime(2026, 3, 28, 12, tzinfo=zone(BERLIN)), 2)
    assert utc(spring) == ["2026-03-29 01:00", "2026-03-30 00:30"]  # 03:00 CEST, 02:30 CEST


def test_it_shows_the_repeated_autumn_hour_as_django_q2_fires_it(zone):
    """django-q2 spins until the clocks turn back (see ``cron.next_runs``): a run at the
    hour's first minute fires once, one later in the hour fires in both passes."""
    start = datetime(2026, 10, 24, 12, tzinfo=zone(BERLIN))
    at_two = cron.next_runs("0 2 * * *", start, 2)
    at_half_past = cron.next_runs("30 2 * * *", start, 3)
    assert utc(at_two) == ["2026-10-25 00:00", "2026-10-26 01:00"]
    assert utc(at_half_past) == ["2026-10-25 00:30", "2026-10-25 01:30", "2026-10-26 01:30"]


def test_it_finds_the_next_february_29():
    runs = cron.next_runs("0 0 29 2 *", datetime(2026, 1, 1, tzinfo=UTC), 2)
    assert [f"{r:%Y-%m-%d}" for r in runs] == ["2028-02-29", "2032-02-29"]


@pytest.mark.parametrize(
    "expr, message",
    [
        ("0 2 * * * *", "expected 5 fields"),
        ("@daily", "expected 5 fields"),
        ("0 2 L * *", "day of month: 'L' is not a number"),
        ("0 2 ? * 1", "day of month: '?' is not a number"),
        ("0 2 * * 1#2", "day of week: '1#2' is not a number or a name"),
        ("H 2 * * *", "minute: 'H' is not a number"),
        ("0 25 * * *", "hour: 25 is outside 0-23"),
        ("0 2 5-5 * *", "day of month: range '5-5' has one value; write '5'"),
        ("0 2 * * 1/2", "day of week: step '1/2' needs a range, e.g. '1-7/2'"),
        ("0 0 30 2 *", "no date ever matches"),
        ("0 0 31 4,6 *", "no date ever matches"),
    ],
)
def test_it_refuses_what_croniter_would_read_otherwise(expr, message):
    with pytest.raises(cron.CronError, match=message.replace("?", r"\?")):
        cron.parse(expr)
