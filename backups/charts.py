"""Server-rendered SVG charts: pure functions from numbers to an SVG string.

No JavaScript and no build step. Every piece of text that reaches the SVG goes through
``html.escape``, so the result is safe to mark safe in a template.
"""

from dataclasses import dataclass
from datetime import datetime
from html import escape

__all__ = ["RunPoint", "runs_chart"]

WIDTH = 720
PANEL = 110  # height of one panel
GAP = 34
LEFT = 64
RIGHT = 12
TOP = 20


@dataclass(frozen=True)
class RunPoint:
    when: datetime
    size_bytes: int
    seconds: float | None
    ok: bool
    label: str = ""


def human_bytes(value: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"  # pragma: no cover


def human_seconds(value: float) -> str:
    value = int(round(value))
    if value < 60:
        return f"{value}s"
    if value < 3600:
        return f"{value // 60}m{value % 60:02d}s"
    return f"{value // 3600}h{value % 3600 // 60:02d}m"


def _attrs(**attrs) -> str:
    return " ".join(
        f'{name.rstrip("_").replace("_", "-")}="{escape(str(value))}"'
        for name, value in attrs.items()
    )


def _text(x: float, y: float, text: str, **attrs) -> str:
    return f"<text {_attrs(x=f'{x:.1f}', y=f'{y:.1f}', **attrs)}>{escape(text)}</text>"


def _bar(point: RunPoint, x: float, top: float, width: float, height: float, tip: str) -> str:
    attrs = _attrs(
        x=f"{x:.1f}",
        y=f"{top + PANEL - height:.1f}",
        width=f"{width:.1f}",
        height=f"{height:.1f}",
        class_="bar" if point.ok else "bar failed",
    )
    return f"<rect {attrs}><title>{escape(tip)}</title></rect>"


def _panel(points, top: float, title: str, values, fmt) -> list[str]:
    """One bar panel; bars of failed runs get their own class so CSS can colour them."""
    plot_width = WIDTH - LEFT - RIGHT
    peak = max((v for v in values if v is not None), default=0) or 1
    slot = plot_width / max(len(points), 1)
    bar = max(slot * 0.7, 1.0)
    axis = _attrs(x1=LEFT, y1=top + PANEL, x2=WIDTH - RIGHT, y2=top + PANEL, class_="axis")
    out = [
        _text(LEFT, top - 6, title, class_="title"),
        f"<line {axis}/>",
        _text(LEFT - 6, top + 10, fmt(peak), class_="tick", text_anchor="end"),
        _text(LEFT - 6, top + PANEL, fmt(0), class_="tick", text_anchor="end"),
    ]
    for index, (point, value) in enumerate(zip(points, values, strict=True)):
        if value is None:
            continue
        height = max(PANEL * value / peak, 1.0)
        x = LEFT + index * slot + (slot - bar) / 2
        tip = f"{point.when:%Y-%m-%d %H:%M} {point.label} {fmt(value)}".strip()
        out.append(_bar(point, x, top, bar, height, tip))
    return out


def runs_chart(points: list[RunPoint], title: str = "Backup size and duration") -> str:
    """Two aligned bar panels (size, duration), oldest run on the left."""
    if not points:
        return ""
    points = sorted(points, key=lambda p: p.when)
    height = TOP + 2 * PANEL + GAP + 24
    svg = _attrs(viewBox=f"0 0 {WIDTH} {height}", class_="chart", role="img", aria_label=title)
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" {svg}>',
        f"<title>{escape(title)}</title>",
    ]
    parts += _panel(points, TOP, "Size", [p.size_bytes for p in points], human_bytes)
    parts += _panel(
        points, TOP + PANEL + GAP, "Duration", [p.seconds for p in points], human_seconds
    )
    bottom = TOP + 2 * PANEL + GAP + 16
    parts.append(_text(LEFT, bottom, f"{points[0].when:%Y-%m-%d %H:%M}", class_="tick"))
    parts.append(
        _text(
            WIDTH - RIGHT,
            bottom,
            f"{points[-1].when:%Y-%m-%d %H:%M}",
            class_="tick",
            text_anchor="end",
        )
    )
    parts.append("</svg>")
    return "".join(parts)
