"""A small 5-field cron parser: validate policy schedules and preview their next runs.

Pure stdlib, no I/O. Syntax: ``minute hour day-of-month month day-of-week`` with ``*``,
lists (``1,15``), ranges (``1-5``), steps (``*/15``, ``0-30/10``, ``5/20``) and names for
months (``jan``-``dec``) and weekdays (``sun``-``sat``; 0 and 7 are both Sunday).

As in Vixie cron, when both day-of-month and day-of-week are restricted a day matches if
*either* does (``0 2 1 * mon`` runs on the 1st and on every Monday).
"""

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta

__all__ = ["CronError", "Cron", "parse", "next_runs"]

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
# Give up looking for a matching day after this many years (e.g. "0 0 30 2 *" never runs).
_SEARCH_YEARS = 5


class CronError(ValueError):
    """The expression is not valid 5-field cron; the message says which field and why."""


@dataclass(frozen=True)
class Cron:
    minutes: frozenset[int]
    hours: frozenset[int]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]  # 0 = Sunday .. 6 = Saturday
    days_restricted: bool
    weekdays_restricted: bool

    def day_matches(self, day: datetime) -> bool:
        if day.month not in self.months:
            return False
        dom = day.day in self.days
        dow = (day.isoweekday() % 7) in self.weekdays
        if self.days_restricted and self.weekdays_restricted:
            return dom or dow
        return dom and dow


def _value(text: str, field: str, low: int, high: int, names: list[str] | None) -> int:
    if names and text.lower() in names:
        return names.index(text.lower()) + (1 if field == "month" else 0)
    if not text.isdigit():
        raise CronError(f"{field}: {text!r} is not a number" + (" or a name" if names else ""))
    value = int(text)
    if not low <= value <= high:
        raise CronError(f"{field}: {value} is outside {low}-{high}")
    return value


def _field(text: str, field: str, low: int, high: int, names: list[str] | None) -> set[int]:
    values: set[int] = set()
    for part in text.split(","):
        if not part:
            raise CronError(f"{field}: empty item in list {text!r}")
        base, slash, step_text = part.partition("/")
        step = 1
        if slash:
            if not step_text.isdigit() or int(step_text) == 0:
                raise CronError(f"{field}: step {step_text!r} must be a positive number")
            step = int(step_text)
        if base == "*":
            start, end = low, high
        elif "-" in base:
            first, _, last = base.partition("-")
            start = _value(first, field, low, high, names)
            end = _value(last, field, low, high, names)
            if start > end:
                raise CronError(f"{field}: range {base!r} runs backwards")
        else:
            start = _value(base, field, low, high, names)
            end = high if step_text else start
        values.update(range(start, end + 1, step))
    return values


def parse(expr: str) -> Cron:
    """Parse or raise ``CronError``."""
    parts = expr.split()
    if len(parts) != 5:
        raise CronError(
            f"expected 5 fields (minute hour day-of-month month day-of-week), got {len(parts)}"
        )
    sets = [_field(text, *spec) for text, spec in zip(parts, _FIELDS, strict=True)]
    return Cron(
        minutes=frozenset(sets[0]),
        hours=frozenset(sets[1]),
        days=frozenset(sets[2]),
        months=frozenset(sets[3]),
        weekdays=frozenset(day % 7 for day in sets[4]),
        # Vixie cron: a field that starts with "*" (even "*/2") does not restrict the day.
        days_restricted=not parts[2].startswith("*"),
        weekdays_restricted=not parts[4].startswith("*"),
    )


def _runs(cron: Cron, after: datetime) -> Iterator[datetime]:
    """Matching minutes strictly after ``after``, in wall-clock time of its tzinfo."""
    tz = after.tzinfo
    start = after.replace(tzinfo=None, second=0, microsecond=0) + timedelta(minutes=1)
    day = start.replace(hour=0, minute=0)
    last_day = day + timedelta(days=366 * _SEARCH_YEARS)
    hours = sorted(cron.hours)
    minutes = sorted(cron.minutes)
    while day <= last_day:
        if cron.day_matches(day):
            for hour in hours:
                for minute in minutes:
                    moment = day.replace(hour=hour, minute=minute)
                    if moment >= start:
                        yield moment.replace(tzinfo=tz)
        day += timedelta(days=1)


def next_runs(expr: str | Cron, after: datetime, n: int = 5) -> list[datetime]:
    """The next ``n`` run times after ``after`` (fewer if the schedule almost never matches)."""
    cron = parse(expr) if isinstance(expr, str) else expr
    runs: list[datetime] = []
    for moment in _runs(cron, after):
        runs.append(moment)
        if len(runs) >= n:
            break
    return runs
