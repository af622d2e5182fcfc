"""Retention: which backups of one VM to keep, and how to drop the rest without breaking chains.

Kept pure (stdlib only, no Django, no I/O) so the policy can be reasoned about and tested in
isolation, and so a dry-run can print exactly what a real run would do.

Rule semantics follow Proxmox's prune options as the project's issue states them:

* Rules run in the order keep-last, hourly, daily, weekly, monthly, yearly.
* keep-last N keeps the N newest backups.
* A period rule keeps the newest backup of each of its last N periods that have backups, with
  two restrictions that both apply:

  - it looks only at backups older than the oldest one kept so far by the earlier rules (all
    backups if nothing was kept yet), so a coarse rule never re-covers the time span a finer
    rule has already covered;
  - a period that already contains a backup kept by an earlier rule is "already included": it
    is skipped and does not count toward N, as in Proxmox Backup Server's prune code
    (``mark_selections``). So keep-last 1 + keep-daily 1 keeps today's newest backup and
    yesterday's newest, not today's two newest.

  Empty periods never use up a slot either.
* Periods are computed from ``created`` in the caller's timezone, because "daily" means the
  operator's day, not UTC's. Weeks are ISO weeks.
* Equal timestamps are ordered by id (higher id = newer) so the outcome never depends on the
  order the caller happened to list the backups in.

Two safety nets sit on top of the rules and do not move the "older than" cut-off:
``protected`` backups are always kept, and the newest backup is always kept, because pruning
the only recent restore point is never what anybody wants.

A policy whose counts are all zero keeps everything. That is deliberately the default: an
unconfigured policy must never delete data.
"""

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, fields
from datetime import UTC, datetime, tzinfo

__all__ = ["Decision", "Point", "Policy", "PrunePlan", "Rebase", "decide", "plan"]

KEEP_ALL = "keep-all"
PROTECTED = "protected"
NEWEST = "newest"
PRUNED = "pruned"


@dataclass(frozen=True)
class Point:
    """One published, successful backup; failed or unpublished ones must not reach retention."""

    id: int
    created: datetime
    parent_id: int | None = None
    protected: bool = False


@dataclass(frozen=True)
class Policy:
    """How many backups each rule keeps; all zero (the default) keeps everything."""

    keep_last: int = 0
    keep_hourly: int = 0
    keep_daily: int = 0
    keep_weekly: int = 0
    keep_monthly: int = 0
    keep_yearly: int = 0

    def __post_init__(self) -> None:
        # A negative count would silently behave like zero; reject it so typos surface early.
        for field in fields(self):
            value = getattr(self, field.name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{field.name} must be a non-negative int, got {value!r}")

    @property
    def keeps_everything(self) -> bool:
        return not any(getattr(self, field.name) for field in fields(self))


@dataclass(frozen=True)
class Decision:
    """The verdict on one backup, with a reason meant to be shown to a human in a dry-run."""

    point: Point
    keep: bool
    reason: str


@dataclass(frozen=True)
class Rebase:
    """Re-point a kept image past pruned parents; ``None`` turns it into a standalone full."""

    point_id: int
    new_parent_id: int | None


@dataclass(frozen=True)
class PrunePlan:
    """Rebases must all run before any delete: a rebase still reads the old backing chain."""

    decisions: list[Decision]
    rebases: list[Rebase]
    deletes: list[int]


# --- periods ---------------------------------------------------------------------------------
# Labels double as period keys: they are unique per period and readable in a dry-run.


def _hour(moment: datetime) -> str:
    return f"{moment:%Y-%m-%dT%H}"


def _day(moment: datetime) -> str:
    return f"{moment:%Y-%m-%d}"


def _iso_week(moment: datetime) -> str:
    # ISO year, not calendar year: 2027-01-03 belongs to 2026-W53.
    year, week, _ = moment.isocalendar()
    return f"{year:04d}-W{week:02d}"


def _month(moment: datetime) -> str:
    return f"{moment:%Y-%m}"


def _year(moment: datetime) -> str:
    return f"{moment.year:04d}"


_PERIOD_RULES: tuple[tuple[str, str, Callable[[datetime], str]], ...] = (
    ("hourly", "keep_hourly", _hour),
    ("daily", "keep_daily", _day),
    ("weekly", "keep_weekly", _iso_week),
    ("monthly", "keep_monthly", _month),
    ("yearly", "keep_yearly", _year),
)


# --- decide ----------------------------------------------------------------------------------


def decide(points: Iterable[Point], policy: Policy, tz: tzinfo = UTC) -> list[Decision]:
    """Newest first, because that is how operators read a backup list."""
    ordered = _newest_first(points)
    if not ordered:
        return []
    if policy.keeps_everything:
        reasons = {point.id: KEEP_ALL for point in ordered}
    else:
        reasons = _apply_rules(ordered, policy, tz)
    _apply_safety_nets(ordered, reasons)
    return [
        Decision(point, point.id in reasons, reasons.get(point.id, PRUNED)) for point in ordered
    ]


def _newest_first(points: Iterable[Point]) -> list[Point]:
    # Validate here so that every later step can rely on unique ids and comparable timestamps.
    ordered = list(points)
    seen: set[int] = set()
    for point in ordered:
        if point.created.utcoffset() is None:
            raise ValueError(f"backup {point.id}: created must be timezone-aware")
        if point.id in seen:
            raise ValueError(f"backup id {point.id} appears more than once")
        seen.add(point.id)
    ordered.sort(key=lambda point: (point.created, point.id), reverse=True)
    return ordered


def _apply_rules(ordered: Sequence[Point], policy: Policy, tz: tzinfo) -> dict[int, str]:
    """Map kept id -> reason; insertion order keeps the first rule that claimed a backup."""
    reasons: dict[int, str] = {}
    kept: list[Point] = []
    for rank, point in enumerate(ordered[: policy.keep_last], start=1):
        reasons[point.id] = f"keep-last {rank}/{policy.keep_last}"
        kept.append(point)
    start = len(kept)  # everything from here on is older than all kept so far
    for name, field, label in _PERIOD_RULES:
        count = getattr(policy, field)
        if not count:
            continue
        included = {label(point.created.astimezone(tz)) for point in kept}
        chosen = _newest_per_period(ordered[start:], count, label, tz, included)
        for offset, period in chosen:
            point = ordered[start + offset]
            reasons[point.id] = f"{name} {period}"
            kept.append(point)
        if chosen:
            start += chosen[-1][0] + 1
    return reasons


def _newest_per_period(
    candidates: Sequence[Point],
    count: int,
    label: Callable[[datetime], str],
    tz: tzinfo,
    included: set[str],
) -> list[tuple[int, str]]:
    """(index, period) of the newest candidate in each of the ``count`` newest periods.

    Periods in ``included`` already hold a backup kept by an earlier rule: they are skipped
    and do not count toward ``count``.
    """
    chosen: list[tuple[int, str]] = []
    periods: set[str] = set()
    for index, point in enumerate(candidates):
        period = label(point.created.astimezone(tz))
        if period in included or period in periods:
            continue
        if len(periods) >= count:
            break
        periods.add(period)
        chosen.append((index, period))
    return chosen


def _apply_safety_nets(ordered: Sequence[Point], reasons: dict[int, str]) -> None:
    # A rule's reason wins when it also applies: it tells the operator more than a safety net.
    for point in ordered:
        if point.protected:
            reasons.setdefault(point.id, PROTECTED)
    reasons.setdefault(ordered[0].id, NEWEST)


# --- plan ------------------------------------------------------------------------------------


def plan(points: Iterable[Point], policy: Policy, tz: tzinfo = UTC) -> PrunePlan:
    """Turn decisions into safe storage operations.

    A kept incremental whose parent is pruned is rebased onto its nearest kept ancestor (or made
    standalone when none is left) before anything is deleted, so no kept image ever loses its
    backing file.

    A chain that reaches a parent id absent from ``points`` cannot be judged here: the kept image
    is left as it is (no rebase) and the pruned images between it and the gap are not deleted,
    since the image may still need them. Verifying chain integrity is the caller's job.

    Raises ValueError on a parent cycle, which no real chain can have.
    """
    decisions = decide(points, policy, tz)
    by_id = {decision.point.id: decision.point for decision in decisions}
    kept = {decision.point.id for decision in decisions if decision.keep}
    rebases: list[Rebase] = []
    still_needed: set[int] = set()
    for decision in reversed(decisions):  # oldest first
        if not decision.keep:
            continue
        skipped, stop = _walk_pruned_ancestors(decision.point, by_id, kept)
        if not skipped:
            continue
        if stop is None or stop in kept:
            rebases.append(Rebase(decision.point.id, stop))
        else:
            still_needed.update(skipped)
    deletes = [
        decision.point.id
        for decision in reversed(decisions)
        if not decision.keep and decision.point.id not in still_needed
    ]
    return PrunePlan(decisions=decisions, rebases=rebases, deletes=deletes)


def _walk_pruned_ancestors(
    point: Point, by_id: dict[int, Point], kept: set[int]
) -> tuple[list[int], int | None]:
    """Pruned ancestors directly above ``point`` and where the walk stopped.

    The stop is a kept id, None (the chain's full backup was pruned too) or an id missing from
    the input (a broken chain).
    """
    skipped: list[int] = []
    visited = {point.id}
    parent = point.parent_id
    while parent is not None and parent in by_id:
        if parent in visited:
            raise ValueError(f"backup {point.id}: parent chain loops at backup {parent}")
        if parent in kept:
            break
        visited.add(parent)
        skipped.append(parent)
        parent = by_id[parent].parent_id
    return skipped, parent
