"""Retention decisions and chain-safe prune plans.

The property tests compare ``decide`` with a deliberately naive reference model written here,
so a shared misunderstanding would have to be made twice to go unnoticed.
"""

from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from backups.retention.rules import Decision, Point, Policy, PrunePlan, Rebase, decide, plan

BASE = datetime(2024, 1, 1, tzinfo=UTC)


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def kept_ids(decisions: list[Decision]) -> set[int]:
    return {decision.point.id for decision in decisions if decision.keep}


def reasons(decisions: list[Decision]) -> dict[int, str]:
    return {decision.point.id: decision.reason for decision in decisions}


def every_hour(start: str, count: int, first_id: int = 1) -> list[Point]:
    return [Point(first_id + n, at(start) + timedelta(hours=n)) for n in range(count)]


# --- hand-written decide cases ----------------------------------------------------------------


def test_it_keeps_the_n_newest_with_keep_last():
    points = every_hour("2026-11-30T00:00", 6)
    decisions = decide(points, Policy(keep_last=3))
    assert [d.point.id for d in decisions] == [6, 5, 4, 3, 2, 1]
    assert kept_ids(decisions) == {6, 5, 4}
    assert reasons(decisions) == {
        6: "keep-last 1/3",
        5: "keep-last 2/3",
        4: "keep-last 3/3",
        3: "pruned",
        2: "pruned",
        1: "pruned",
    }


def test_it_keeps_the_last_backup_of_each_day():
    points = []
    for day in range(7):
        for hour in (2, 10, 18):
            moment = at("2026-11-24T00:00") + timedelta(days=day, hours=hour)
            points.append(Point(len(points) + 1, moment))
    decisions = decide(points, Policy(keep_daily=7))
    assert kept_ids(decisions) == {3, 6, 9, 12, 15, 18, 21}
    assert reasons(decisions)[21] == "daily 2026-11-30"
    assert reasons(decisions)[3] == "daily 2026-11-24"


def test_it_counts_only_days_that_have_backups():
    points = [
        Point(1, at("2026-11-01T12:00")),
        Point(2, at("2026-11-20T12:00")),
        Point(3, at("2026-11-30T12:00")),
    ]
    assert kept_ids(decide(points, Policy(keep_daily=2))) == {2, 3}


def test_it_uses_iso_weeks_for_weekly():
    points = [
        Point(1, at("2026-12-28T12:00")),  # Monday of 2026-W53
        Point(2, at("2026-12-31T12:00")),  # Thursday, 2026-W53
        Point(3, at("2027-01-03T12:00")),  # Sunday, still 2026-W53 although a new calendar year
        Point(4, at("2027-01-04T12:00")),  # Monday, 2027-W01
    ]
    decisions = decide(points, Policy(keep_weekly=5))
    assert kept_ids(decisions) == {3, 4}
    assert reasons(decisions)[4] == "weekly 2027-W01"
    assert reasons(decisions)[3] == "weekly 2026-W53"


def test_it_only_looks_at_backups_older_than_everything_kept_so_far():
    points = []
    for day in ("2026-11-28", "2026-11-29", "2026-11-30"):
        for hour in (6, 12, 18):
            points.append(Point(len(points) + 1, at(f"{day}T{hour:02d}:00")))
    decisions = decide(points, Policy(keep_last=3, keep_daily=2))
    assert kept_ids(decisions) == {9, 8, 7, 6, 3}
    assert reasons(decisions)[6] == "daily 2026-11-29"
    assert reasons(decisions)[3] == "daily 2026-11-28"


def test_it_reports_the_first_rule_that_kept_a_backup():
    points = [
        Point(1, at("2025-12-31T23:00")),
        Point(2, at("2026-11-29T12:00")),
        Point(3, at("2026-11-30T00:00")),
    ]
    decisions = decide(points, Policy(keep_last=1, keep_daily=1, keep_yearly=1))
    assert reasons(decisions) == {3: "keep-last 1/1", 2: "daily 2026-11-29", 1: "yearly 2025"}


def test_it_skips_a_day_that_an_earlier_rule_already_kept_a_backup_of():
    points = [
        Point(1, at("2026-11-29T06:00")),
        Point(2, at("2026-11-29T18:00")),
        Point(3, at("2026-11-30T06:00")),
        Point(4, at("2026-11-30T12:00")),
        Point(5, at("2026-11-30T18:00")),
    ]
    decisions = decide(points, Policy(keep_last=1, keep_daily=1))
    # Today already holds the keep-last backup, so daily's one slot goes to yesterday.
    assert reasons(decisions) == {
        5: "keep-last 1/1",
        4: "pruned",
        3: "pruned",
        2: "daily 2026-11-29",
        1: "pruned",
    }


def test_it_skips_an_iso_week_that_an_earlier_rule_already_kept_a_backup_of():
    points = [
        Point(1, at("2026-11-18T12:00")),  # Wednesday, 2026-W47
        Point(2, at("2026-11-25T12:00")),  # Wednesday, 2026-W48
        Point(3, at("2026-11-27T12:00")),  # Friday, 2026-W48
        Point(4, at("2026-11-30T12:00")),  # Monday, 2026-W49
        Point(5, at("2026-12-01T12:00")),  # Tuesday, 2026-W49
        Point(6, at("2026-12-02T12:00")),  # Wednesday, 2026-W49
    ]
    decisions = decide(points, Policy(keep_daily=1, keep_weekly=2))
    # The current week already holds the daily backup: it neither gets a second backup nor
    # uses up one of weekly's two slots.
    assert reasons(decisions) == {
        6: "daily 2026-12-02",
        5: "pruned",
        4: "pruned",
        3: "weekly 2026-W48",
        2: "pruned",
        1: "weekly 2026-W47",
    }


def test_it_writes_readable_reasons_for_every_rule():
    points = [
        Point(1, at("2024-06-01T00:00")),
        Point(2, at("2025-06-01T00:00")),
        Point(3, at("2026-06-01T00:00")),
        Point(4, at("2026-10-01T00:00")),
        Point(5, at("2026-11-01T00:00")),
        Point(6, at("2026-11-29T00:00")),
        Point(7, at("2026-11-30T00:00")),
        Point(8, at("2026-11-30T01:00")),
        Point(9, at("2026-11-30T02:00")),
    ]
    policy = Policy(
        keep_last=1, keep_hourly=1, keep_daily=2, keep_weekly=1, keep_monthly=1, keep_yearly=9
    )
    assert reasons(decide(points, policy)) == {
        9: "keep-last 1/1",
        8: "hourly 2026-11-30T01",
        7: "pruned",  # its day already holds 9 and 8
        6: "daily 2026-11-29",
        5: "daily 2026-11-01",
        4: "weekly 2026-W40",
        3: "monthly 2026-06",
        2: "yearly 2025",  # 2026 already holds 9
        1: "yearly 2024",
    }


def test_it_computes_periods_in_the_given_timezone():
    points = [Point(1, at("2026-11-29T21:00")), Point(2, at("2026-11-29T23:30"))]
    plus_two = timezone(timedelta(hours=2))
    assert kept_ids(decide(points, Policy(keep_daily=2))) == {2}
    decisions = decide(points, Policy(keep_daily=2), tz=plus_two)
    assert reasons(decisions) == {2: "daily 2026-11-30", 1: "daily 2026-11-29"}


def test_it_breaks_timestamp_ties_by_id():
    moment = at("2026-11-30T12:00")
    points = [Point(7, moment), Point(9, moment), Point(8, moment)]
    decisions = decide(points, Policy(keep_last=1))
    assert [d.point.id for d in decisions] == [9, 8, 7]
    assert kept_ids(decisions) == {9}


def test_it_always_keeps_protected_backups():
    points = every_hour("2026-11-30T00:00", 4)
    points[0] = Point(1, points[0].created, protected=True)
    decisions = decide(points, Policy(keep_last=1))
    assert kept_ids(decisions) == {4, 1}
    assert reasons(decisions)[1] == "protected"


def test_it_prefers_a_rule_reason_over_protected():
    points = every_hour("2026-11-30T00:00", 3)
    points[1] = Point(2, points[1].created, protected=True)
    decisions = decide(points, Policy(keep_last=1, keep_hourly=1))
    assert reasons(decisions) == {3: "keep-last 1/1", 2: "hourly 2026-11-30T01", 1: "pruned"}


def test_it_always_keeps_the_newest_backup():
    points = [Point(1, at("2026-11-30T12:00")), Point(2, at("2020-01-01T00:00"))]
    for policy in (Policy(keep_yearly=1), Policy(keep_monthly=1), Policy(keep_last=1)):
        assert 1 in kept_ids(decide(points, policy))


def test_it_keeps_everything_with_an_all_zero_policy():
    points = every_hour("2026-11-30T00:00", 5)
    decisions = decide(points, Policy())
    assert all(d.keep and d.reason == "keep-all" for d in decisions)
    assert len(decisions) == 5


def test_it_returns_nothing_for_no_backups():
    assert decide([], Policy(keep_last=3)) == []
    assert plan([], Policy(keep_last=3)) == PrunePlan([], [], [])


def test_it_rejects_naive_timestamps():
    with pytest.raises(ValueError, match="timezone-aware"):
        decide([Point(1, datetime(2026, 11, 30))], Policy(keep_last=1))


def test_it_rejects_duplicate_ids():
    moment = at("2026-11-30T00:00")
    with pytest.raises(ValueError, match="more than once"):
        decide([Point(1, moment), Point(1, moment)], Policy(keep_last=1))


@pytest.mark.parametrize("bad", [-1, 1.5, True, None])
def test_it_rejects_invalid_counts(bad):
    with pytest.raises(ValueError, match="keep_daily"):
        Policy(keep_daily=bad)


# --- hand-written plan cases ------------------------------------------------------------------


def chain(start: str, ids: list[int], protected: frozenset[int] = frozenset()) -> list[Point]:
    points, parent = [], None
    for n, point_id in enumerate(ids):
        moment = at(start) + timedelta(hours=n)
        points.append(Point(point_id, moment, parent, point_id in protected))
        parent = point_id
    return points


def test_it_rebases_a_kept_incremental_onto_the_nearest_kept_ancestor():
    points = chain("2026-11-30T00:00", [10, 11, 12, 13], protected=frozenset({10}))
    result = plan(points, Policy(keep_last=1))
    assert result.rebases == [Rebase(13, 10)]
    assert result.deletes == [11, 12]


def test_it_makes_a_kept_incremental_standalone_when_its_full_is_pruned():
    points = chain("2026-11-30T00:00", [10, 11])
    result = plan(points, Policy(keep_last=1))
    assert result.rebases == [Rebase(11, None)]
    assert result.deletes == [10]


def test_it_rebases_only_the_kept_child_of_a_pruned_parent():
    points = chain("2026-11-30T00:00", [10, 11, 12])
    result = plan(points, Policy(keep_last=2))
    assert result.rebases == [Rebase(11, None)]
    assert result.deletes == [10]


def test_it_plans_two_chains_independently_oldest_first():
    first = chain("2026-11-01T10:00", [1, 2]) + chain("2026-11-02T10:00", [3])
    first[2] = Point(3, first[2].created, parent_id=2)
    second = chain("2026-11-03T10:00", [4, 5]) + chain("2026-11-04T10:00", [6])
    second[2] = Point(6, second[2].created, parent_id=5)
    result = plan(first + second, Policy(keep_daily=4))
    assert kept_ids(result.decisions) == {2, 3, 5, 6}
    assert result.rebases == [Rebase(2, None), Rebase(5, None)]
    assert result.deletes == [1, 4]


def test_it_leaves_a_chain_with_a_missing_parent_alone():
    points = [
        Point(11, at("2026-11-30T01:00"), parent_id=99),
        Point(12, at("2026-11-30T02:00"), parent_id=11),
        Point(13, at("2026-11-30T03:00"), parent_id=12),
        Point(20, at("2026-11-30T04:00"), parent_id=98),
    ]
    result = plan(points, Policy(keep_last=1))
    assert kept_ids(result.decisions) == {20}
    assert result.rebases == []
    assert result.deletes == [11, 12, 13]

    result = plan(points[:3], Policy(keep_last=1))
    assert result.rebases == []
    assert result.deletes == []  # 13 still needs 11 and 12: only the caller can judge the gap


def test_it_rejects_a_parent_cycle():
    points = [
        Point(1, at("2026-11-30T01:00"), parent_id=2),
        Point(2, at("2026-11-30T02:00"), parent_id=1),
        Point(3, at("2026-11-30T03:00"), parent_id=2),
    ]
    with pytest.raises(ValueError, match="loops"):
        plan(points, Policy(keep_last=1))


# --- reference model --------------------------------------------------------------------------


def reference_keep(points, policy, tz):
    """Plain loops over a newest-first list; shares nothing with the module."""
    newest_first = sorted(points, key=lambda p: (p.created, p.id), reverse=True)
    counts = [
        policy.keep_last,
        policy.keep_hourly,
        policy.keep_daily,
        policy.keep_weekly,
        policy.keep_monthly,
        policy.keep_yearly,
    ]
    if sum(counts) == 0:
        return {p.id for p in points}

    keep = set()
    for i in range(min(policy.keep_last, len(newest_first))):
        keep.add(newest_first[i].id)

    def hour(d):
        return (d.year, d.month, d.day, d.hour)

    def day(d):
        return (d.year, d.month, d.day)

    def week(d):
        return tuple(d.isocalendar())[:2]

    def month(d):
        return (d.year, d.month)

    def year(d):
        return d.year

    for count, period_of in zip(counts[1:], [hour, day, week, month, year], strict=True):
        first_candidate = 0
        already_included = []
        for i, p in enumerate(newest_first):
            if p.id in keep:
                first_candidate = i + 1
                already_included.append(period_of(p.created.astimezone(tz)))
        periods_done = []
        for p in newest_first[first_candidate:]:
            period = period_of(p.created.astimezone(tz))
            if period in already_included:
                continue  # an earlier rule kept a backup of this period: no slot used
            if period in periods_done:
                continue
            if len(periods_done) == count:
                break
            periods_done.append(period)
            keep.add(p.id)

    for p in points:
        if p.protected:
            keep.add(p.id)
    if newest_first:
        keep.add(newest_first[0].id)
    return keep


# --- strategies -------------------------------------------------------------------------------

THREE_YEARS_IN_MINUTES = 3 * 366 * 24 * 60
counts = st.integers(min_value=0, max_value=5)
policies = st.builds(
    Policy,
    keep_last=counts,
    keep_hourly=counts,
    keep_daily=counts,
    keep_weekly=counts,
    keep_monthly=counts,
    keep_yearly=counts,
)
zones = st.sampled_from(
    [UTC, timezone(timedelta(hours=5, minutes=30)), timezone(timedelta(hours=-8))]
)
# Mixing wide and narrow spreads gives both years of history and crowded hours/days, and a
# coarse grid produces equal timestamps so the id tie-break is exercised.
offsets = st.one_of(
    st.integers(0, THREE_YEARS_IN_MINUTES // 60).map(lambda hours: hours * 60),
    st.integers(0, 3 * 24 * 4).map(lambda quarters: quarters * 15),
)


@st.composite
def histories(draw):
    """Backups with unique ids in random order and valid chains (parents are older)."""
    minutes = draw(st.lists(offsets, min_size=0, max_size=40))
    ids = draw(
        st.lists(st.integers(1, 10_000), min_size=len(minutes), max_size=len(minutes), unique=True)
    )
    pending = sorted(zip(minutes, ids, strict=True))
    points = []
    for index, (minute, point_id) in enumerate(pending):
        parent = None
        if index and draw(st.integers(0, 4)):  # mostly incrementals, sometimes a new full
            parent = pending[draw(st.integers(max(0, index - 3), index - 1))][1]
        protected = draw(st.integers(0, 9)) == 0
        points.append(Point(point_id, BASE + timedelta(minutes=minute), parent, protected))
    return draw(st.permutations(points))


# --- properties -------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(points=histories(), policy=policies, tz=zones)
def test_it_agrees_with_the_reference_model(points, policy, tz):
    decisions = decide(points, policy, tz)
    assert kept_ids(decisions) == reference_keep(points, policy, tz)
    assert sorted(d.point.id for d in decisions) == sorted(p.id for p in points)
    stamps = [(d.point.created, d.point.id) for d in decisions]
    assert stamps == sorted(stamps, reverse=True)
    assert all(d.reason == "pruned" for d in decisions if not d.keep)


@settings(max_examples=300, deadline=None)
@given(points=histories(), policy=policies, tz=zones)
def test_it_always_keeps_the_newest_and_protected_backups(points, policy, tz):
    decisions = decide(points, policy, tz)
    if decisions:
        assert decisions[0].keep
    assert all(d.keep for d in decisions if d.point.protected)


@settings(max_examples=300, deadline=None)
@given(points=histories(), policy=policies, tz=zones)
def test_it_keeps_all_of_its_own_kept_set_when_run_again(points, policy, tz):
    # True for every policy: periods are monotonic in time, so thinning out pruned backups
    # changes neither the keep-last prefix nor the newest backup of any chosen period.
    survivors = [d.point for d in decide(points, policy, tz) if d.keep]
    assert all(d.keep for d in decide(survivors, policy, tz))


@settings(max_examples=300, deadline=None)
@given(points=histories(), policy=policies, tz=zones)
def test_it_plans_rebases_and_deletes_that_leave_every_kept_chain_whole(points, policy, tz):
    result = plan(points, policy, tz)
    kept = kept_ids(result.decisions)
    original = {p.id: p.parent_id for p in points}
    created = {p.id: (p.created, p.id) for p in points}

    assert set(result.deletes) == {p.id for p in points} - kept
    assert [created[i] for i in result.deletes] == sorted(created[i] for i in result.deletes)
    rebased = [created[r.point_id] for r in result.rebases]
    assert rebased == sorted(rebased)

    parents = dict(original)
    for rebase in result.rebases:
        assert rebase.point_id in kept
        # The new parent must be an old ancestor, so a safe rebase preserves the image content.
        assert rebase.new_parent_id is None or rebase.new_parent_id in ancestors(
            original, rebase.point_id
        )
        assert rebase.new_parent_id is None or rebase.new_parent_id in kept
        parents[rebase.point_id] = rebase.new_parent_id
    for point_id in result.deletes:
        del parents[point_id]

    for point_id in kept:
        assert all(ancestor in kept for ancestor in ancestors(parents, point_id))


def ancestors(parents: dict[int, int | None], point_id: int) -> list[int]:
    found = []
    parent = parents[point_id]
    while parent is not None:
        assert parent in parents, f"{point_id} lost its backing image {parent}"
        found.append(parent)
        parent = parents[parent]
    return found
