"""Small display filters for the dashboard templates."""

from datetime import datetime, timedelta

from django import template

from ..charts import human_seconds

register = template.Library()


@register.filter
def duration(value: timedelta | None) -> str:
    """A compact "1h05m" / "3m07s" / "12s"; empty for None."""
    if value is None:
        return ""
    return human_seconds(value.total_seconds())


@register.filter
def age(value: timedelta | None) -> str:
    """A coarse age such as "5 min", "3 h", "2 d"."""
    if value is None:
        return ""
    seconds = max(int(value.total_seconds()), 0)
    if seconds < 3600:
        return f"{seconds // 60} min"
    if seconds < 2 * 86400:
        return f"{seconds // 3600} h"
    return f"{seconds // 86400} d"


@register.filter(expects_localtime=True)
def stamp(value: datetime | None) -> str:
    """Like ``date:"Y-m-d H:i"`` (the template converts to local time first) at a fraction of
    its cost: the overview prints up to three per row."""
    if value is None:
        return ""
    return value.strftime("%Y-%m-%d %H:%M")


@register.filter
def rate(value: float | None) -> str:
    """Bytes per second as "12.3 MiB/s"."""
    if not value:
        return ""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.1f} {unit}/s"
        value /= 1024
    return ""  # pragma: no cover


@register.filter
def indent(depth: int) -> str:
    """Tree prefix for a backup nested ``depth`` levels under its full."""
    return "\u2514\u2500 " if depth else ""


@register.simple_tag(takes_context=True)
def query_with(context, **changes) -> str:
    """The current GET query with some parameters replaced (pagination keeps the filters)."""
    query = context["request"].GET.copy()
    for key, value in changes.items():
        if value in (None, ""):
            query.pop(key, None)
        else:
            query[key] = value
    encoded = query.urlencode()
    return f"?{encoded}" if encoded else "?"
