"""Validate policy schedules and preview their next runs with the engine that fires them.

django-q2 fires a cron ``Schedule`` at ``next_run`` and then sets the next one with croniter
(``croniter(cron, localtime()).get_next(datetime)`` in ``Schedule.calculate_next_run``, the
base being "now" in django-q2's time zone). ``next_runs`` asks croniter the same question
from each previous run, through the same scheduler loop, so the preview shows what will fire,
DST quirks included (a time skipped in spring fires at the end of the gap, e.g. 03:00; in
autumn's repeated hour see ``next_runs``). No I/O.

``parse`` is stricter than croniter. Accepted: ``minute hour day-of-month month day-of-week``
with ``*``, lists (``1,15``), ranges (``1-5``), steps (``*/15``, ``0-30/10``, ``5/20``) and
names for months (``jan``-``dec``) and weekdays (``sun``-``sat``; 0 and 7 are both Sunday).
Refused, each with a message naming the field: croniter's extensions (seconds or year fields,
``@daily``, ``L``, ``W``, ``#``, ``?``, ``H``), values out of range, backwards ranges, zero
steps, and two forms croniter misreads: a range of one value (``5-5`` fires at every value)
and a day-of-week step without a range (``1/2`` stops at Saturday). An expression that never
matches a date (``0 0 30 2 *``) is refused too: django-q2 could not compute its next run.

When both day-of-month and day-of-week are restricted a day matches if *either* does
(``0 2 1 * mon`` runs on the 1st and on every Monday). Unlike Vixie cron, croniter counts a
field as restricted unless it is exactly ``*``: ``0 2 */2 * mon`` runs on odd days *and*
on Mondays.
"""

from datetime import UTC, datetime, timedelta

from croniter import CroniterBadDateError, croniter

__all__ = ["CronError", "parse", "next_runs"]

MONTHS = ["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"]
WEEKDAYS = ["sun", "mon", "tue", "wed", "thu", "fri", "sat"]

# (name, low, high, names mapped to low+index)
_FIELDS = (
    ("minute", 0, 59, None),
    ("hour", 0, 23, None),
    ("day of month", 1, 31, None),
    ("month", 1, 12, MONTHS),
    ("day of week", 0, 7, WEEKDAYS),
)
# A fixed base for the "does it ever match" check: croniter looks years ahead (Feb 29 is found).
_PROBE = datetime(2000, 1, 1, tzinfo=UTC)
# Longer than any clock change: how long django-q2's scheduler may spin waiting for one to pass.
_SPIN_MINUTES = 3 * 60


class CronError(ValueError):
    """The expression is not valid 5-field cron; the message says which field and why."""


def _value(text: str, field: str, low: int, high: int, names: list[str] | None) -> int:
    if names and text.lower() in names:
        return names.index(text.lower()) + (1 if field == "month" else 0)
    if not text.isdigit():
        raise CronError(f"{field}: {text!r} is not a number" + (" or a name" if names else ""))
    value = int(text)
    if not low <= value <= high:
        raise CronError(f"{field}: {value} is outside {low}-{high}")
    return value


def _field(text: str, field: str, low: int, high: int, names: list[str] | None) -> None:
    for part in text.split(","):
        if not part:
            raise CronError(f"{field}: empty item in list {text!r}")
        base, slash, step_text = part.partition("/")
        if slash and (not step_text.isdigit() or int(step_text) == 0):
            raise CronError(f"{field}: step {step_text!r} must be a positive number")
        if base == "*":
            continue
        if "-" in base:
            first, _, last = base.partition("-")
            start = _value(first, field, low, high, names)
            end = _value(last, field, low, high, names)
            if start > end:
                raise CronError(f"{field}: range {base!r} runs backwards")
            if start == end:
                raise CronError(f"{field}: range {base!r} has one value; write {first!r}")
            continue
        _value(base, field, low, high, names)
        if slash and field == "day of week":
            raise CronError(f"{field}: step {part!r} needs a range, e.g. '1-7/{step_text}'")


def parse(expr: str) -> str:
    """The expression, whitespace normalised, once it is valid; else ``CronError``."""
    parts = expr.split()
    if len(parts) != 5:
        raise CronError(
            f"expected 5 fields (minute hour day-of-month month day-of-week), got {len(parts)}"
        )
    for text, spec in zip(parts, _FIELDS, strict=True):
        _field(text, *spec)
    normalised = " ".join(parts)
    try:
        croniter(normalised, _PROBE).get_next(datetime)
    except CroniterBadDateError as exc:
        raise CronError("no date ever matches day of month, month and day of week") from exc
    return normalised


def next_runs(expr: str, after: datetime, n: int = 5) -> list[datetime]:
    """The next ``n`` run times after ``after``, as django-q2 will fire them.

    The first is croniter's answer from ``after`` (what django-q2 stores when the schedule is
    saved). Each later one is what django-q2's scheduler sets once the previous run fired: it
    asks croniter from "now" (the run, as converted back from the UTC it stores) and keeps
    asking, as the clock moves, until the answer is later than now *on the wall clock* (both
    carry the same zone and Python ignores ``fold`` within one zone). In autumn's repeated
    hour it therefore spins until the clocks turn back, and a run due in that hour's second
    pass is skipped or kept depending on where it falls; the same loop, stepped a minute at
    a time, gives the same answer here."""
    expr = parse(expr)
    runs: list[datetime] = []
    try:
        run = croniter(expr, after).get_next(datetime)
        while len(runs) < n:
            runs.append(run)
            run = _scheduled_after(expr, _as_stored(run, after))
    except CroniterBadDateError:
        pass
    return runs[:n]


def _as_stored(moment: datetime, like: datetime) -> datetime:
    """``moment`` through the database (UTC) and back to ``like``'s zone: fold set right."""
    return moment.astimezone(UTC).astimezone(like.tzinfo) if like.tzinfo else moment


def _scheduled_after(expr: str, now: datetime) -> datetime:
    """django-q2's ``scheduler``: ``next_run = croniter(cron, localtime()).get_next()`` until
    ``next_run > localtime()``. Within a minute croniter's answer and the comparison do not
    change, so one look per minute is the loop."""
    for _ in range(_SPIN_MINUTES):
        run = croniter(expr, now).get_next(datetime)
        if run > now:
            return run
        now = _as_stored(now.astimezone(UTC) + timedelta(minutes=1), now)  # not wall-clock +1
    raise CroniterBadDateError(f"the scheduler would spin for more than {_SPIN_MINUTES} min")
