"""A drill's evidence, kept after its sandbox is gone: the screen (as PNG: recent QEMUs
hand libvirt one, older ones a PPM, converted here in pure Python, no imaging library) and
the serial console's last lines. Pure functions and private files; no Django, no libvirt."""

from __future__ import annotations

import base64
import os
import re
import struct
import zlib
from pathlib import Path

TAIL_BYTES = 64 * 1024
TAIL_LINES = 40
MAX_PIXELS = 16384 * 16384
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[()][A-Za-z0-9]|\x1bc")


class EvidenceError(Exception):
    """An image that is not what it says (the evidence is then the console alone)."""


def _ppm_header(data: bytes) -> tuple[int, int, int, int]:
    """(width, height, maxval, offset of the pixels) of a binary PPM (P6)."""
    fields, pos = [], 0
    while len(fields) < 4:
        while pos < len(data) and data[pos : pos + 1].isspace():
            pos += 1
        if data[pos : pos + 1] == b"#":  # a comment, to the end of its line
            pos = data.find(b"\n", pos) + 1 or len(data)
            continue
        start = pos
        while pos < len(data) and not data[pos : pos + 1].isspace():
            pos += 1
        if start == pos:
            raise EvidenceError("truncated PPM header")
        fields.append(data[start:pos])
    if fields[0] != b"P6" or not all(f.isdigit() for f in fields[1:]):
        raise EvidenceError("not a binary PPM (P6) image")
    width, height, maxval = (int(f) for f in fields[1:])
    if not (0 < width * height <= MAX_PIXELS) or maxval != 255:
        raise EvidenceError(f"unexpected PPM: {width}x{height}, maxval {maxval}")
    return width, height, maxval, pos + 1  # one whitespace byte ends the header


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def as_png(mime: str, data: bytes) -> bytes:
    """A screenshot as PNG: libvirt gets PNG from recent QEMUs (kept as it is, once its
    signature is checked) and PPM from older ones (converted)."""
    if data.startswith(PNG_SIGNATURE):
        return data
    if data.startswith(b"P6"):
        return png_from_ppm(data)
    raise EvidenceError(f"a screenshot of type {mime or 'unknown'} is neither PNG nor PPM")


def png_from_ppm(data: bytes) -> bytes:
    """The PPM screenshot as a PNG (8-bit RGB, filter 0 on every row)."""
    width, height, _maxval, offset = _ppm_header(data)
    row = width * 3
    pixels = data[offset : offset + row * height]
    if len(pixels) != row * height:
        raise EvidenceError("truncated PPM pixels")
    raw = b"".join(b"\x00" + pixels[y * row : (y + 1) * row] for y in range(height))

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        PNG_SIGNATURE
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw, 6))
        + chunk(b"IEND", b"")
    )


def console_tail(path: Path, lines: int = TAIL_LINES) -> str:
    """The last ``lines`` lines of a console log, terminal escapes and carriage returns
    removed; "" when there is none. Opened without following a link."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        return ""
    with open(fd, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        f.seek(max(0, size - TAIL_BYTES))
        text = f.read(TAIL_BYTES).decode(errors="replace")
    text = _ANSI.sub("", text).replace("\r\n", "\n").replace("\r", "\n")
    kept = [line.rstrip() for line in text.split("\n")]
    while kept and not kept[-1]:
        kept.pop()
    return "\n".join(kept[-lines:])


def console_lines(path: Path) -> list[str]:
    """Every line of the console log so far (for a pattern), escapes removed."""
    return console_tail(path, lines=10**9).split("\n")


def b64_text(value: str) -> str:
    """guest-exec's captured output (base64) as text; "" when it is not base64."""
    try:
        return base64.b64decode(value or "").decode(errors="replace")
    except ValueError:
        return ""
