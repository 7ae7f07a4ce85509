"""How the ``ptutils`` command writes what it read: durations, counts, sparklines, tables (rich or plain), JSON."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

SPARKS = "▁▂▃▄▅▆▇█"
STATE_ORDER = ("running", "paused", "interrupted", "pending", "failed", "complete")
STATE_STYLE = {"running": "green", "paused": "yellow", "interrupted": "red", "failed": "bold red",
               "complete": "blue", "pending": "dim"}


def duration(seconds: float | None) -> str:
    """``2s``, ``14m``, ``1h12m``, ``3d4h``; ``-`` for unknown."""
    if seconds is None or not math.isfinite(seconds):
        return "-"
    s = int(round(max(0.0, seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s" if s < 600 else f"{s // 60}m"
    if s < 86400:
        return f"{s // 3600}h{(s % 3600) // 60:02d}m"
    return f"{s // 86400}d{(s % 86400) // 3600}h"


def count(n: int) -> str:
    """``950``, ``12.4k``, ``1.2M``."""
    if n < 10_000:
        return str(n)
    if n < 1_000_000:
        return f"{n / 1000:.1f}k"
    return f"{n / 1_000_000:.1f}M"


def number(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "-" if value is None else str(value)
    if isinstance(value, int):
        return str(value)
    return f"{value:.4g}"


def when(stamp: float | None) -> str:
    if stamp is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(stamp)))


def sparkline(values: Sequence[float], width: int = 40) -> str:
    """The values as block characters, at most ``width`` of them (evenly sampled)."""
    finite = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    if not finite:
        return ""
    if len(finite) > width:
        finite = [finite[round(i * (len(finite) - 1) / (width - 1))] for i in range(width)]
    low, high = min(finite), max(finite)
    span = (high - low) or 1.0
    return "".join(SPARKS[min(len(SPARKS) - 1, int((v - low) / span * len(SPARKS)))] for v in finite)


def to_json(value: Any) -> str:
    """JSON of records (non-finite floats as null, anything else unknown as its string)."""
    def clean(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, Mapping):
            return {str(k): clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        if isinstance(v, (bytes, bytearray, memoryview)):
            return f"<{len(bytes(v))} bytes>"
        if v is None or isinstance(v, (str, int, float, bool)):
            return v
        return str(v)

    return json.dumps(clean(value), indent=2, sort_keys=False)


class Output:
    """Writes tables and sections: rich ones in a terminal, tab-free aligned plain text otherwise."""

    def __init__(self, rich: bool):
        self.rich = rich
        self._console = None
        if rich:
            from rich.console import Console

            self._console = Console(highlight=False)

    def line(self, text: str = "") -> None:
        if self._console is not None:
            self._console.print(text, markup=False, soft_wrap=True)
        else:
            print(text)

    def heading(self, text: str) -> None:
        if self._console is not None:
            from rich.rule import Rule

            self._console.print(Rule(text, align="left", style="cyan"))
        else:
            print(f"== {text} ==")

    def table(self, columns: Sequence[str], rows: Sequence[Sequence[str]], *, styles: Sequence[str | None] = (),
              right: Sequence[str] = ()) -> None:
        """A table of strings; ``right`` names the columns aligned right, ``styles`` a style per row."""
        if self._console is not None:
            from rich import box
            from rich.table import Table

            table = Table(box=box.ROUNDED, header_style="bold", show_edge=True)
            for col in columns:
                table.add_column(col, justify="right" if col in right else "left", overflow="fold")
            for i, row in enumerate(rows):
                table.add_row(*row, style=styles[i] if i < len(styles) else None)
            self._console.print(table)
            return
        widths = [max([len(c)] + [len(r[i]) for r in rows]) for i, c in enumerate(columns)]

        def fmt(cells: Sequence[str]) -> str:
            out = [cell.rjust(w) if col in right else cell.ljust(w) for cell, w, col in zip(cells, widths, columns)]
            return "  ".join(out).rstrip()

        print(fmt(columns))
        for row in rows:
            print(fmt(row))

    def pairs(self, items: Sequence[tuple[str, str]]) -> None:
        """``key  value`` lines, keys aligned."""
        width = max((len(k) for k, _ in items), default=0)
        for key, value in items:
            self.line(f"  {key.ljust(width)}  {value}")

    def text_block(self, text: str) -> None:
        for line in text.rstrip("\n").splitlines():
            self.line(f"  {line}")


def flatten(value: Any, prefix: str = "") -> list[tuple[str, str]]:
    """A nested config as ``dotted.path  value`` pairs (lists of specs by index)."""
    if isinstance(value, Mapping) and value:
        out: list[tuple[str, str]] = []
        for k, v in value.items():
            out += flatten(v, f"{prefix}.{k}" if prefix else str(k))
        return out
    if isinstance(value, list) and value and any(isinstance(v, (Mapping, list)) for v in value):
        out = []
        for i, v in enumerate(value):
            out += flatten(v, f"{prefix}[{i}]")
        return out
    return [(prefix, json.dumps(value) if not isinstance(value, str) else value)]
