"""Lines people read at a glance: a status mark, an aligned label, a duration, a detail.

Shared by `nodeplug sandbox` and `nodeplug doctor`. Colour only when the stream is a
terminal that shows it, never with NO_COLOR set (no-color.org) or TERM=dumb; marks are
symbols where the stream can encode them and short words otherwise.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import TextIO

LABEL_WIDTH = 20
DURATION_WIDTH = 7
_RESET = "\033[0m"
_COLOURS = {"green": "32", "red": "31", "yellow": "33", "grey": "90", "bold": "1", "cyan": "36"}


class Status(StrEnum):
    OK = "ok"
    WARN = "warn"
    FAIL = "fail"
    SKIP = "skip"
    INFO = "info"


# Status -> (symbol, word, colour); the words are as wide as each other.
_MARKS: dict[Status, tuple[str, str, str]] = {
    Status.OK: ("✓", "ok  ", "green"),
    Status.WARN: ("!", "warn", "yellow"),
    Status.FAIL: ("✗", "FAIL", "red"),
    Status.SKIP: ("-", "skip", "grey"),
    Status.INFO: (" ", "    ", "grey"),
}


@dataclass(frozen=True, slots=True)
class Style:
    colour: bool
    symbols: bool

    @classmethod
    def detect(cls, stream: TextIO, environ: Mapping[str, str] | None = None) -> Style:
        env = os.environ if environ is None else environ
        tty = hasattr(stream, "isatty") and stream.isatty()
        colour = tty and not env.get("NO_COLOR") and env.get("TERM", "") != "dumb"
        try:
            "✓✗→".encode(getattr(stream, "encoding", None) or "ascii")
            symbols = True
        except (UnicodeEncodeError, LookupError):
            symbols = False
        return cls(colour=colour, symbols=symbols)

    def paint(self, text: str, colour: str) -> str:
        return f"\033[{_COLOURS[colour]}m{text}{_RESET}" if self.colour and text else text

    def mark(self, status: Status) -> str:
        symbol, word, colour = _MARKS[status]
        return self.paint(symbol if self.symbols else word, colour)

    @property
    def mark_width(self) -> int:
        return 1 if self.symbols else 4

    @property
    def arrow(self) -> str:
        return "→" if self.symbols else "->"

    def heading(self, title: str, note: str = "") -> str:
        rule = self.paint(title, "bold")
        return f"{rule}  {self.paint(note, 'grey')}" if note else rule

    def line(
        self, status: Status, label: str, detail: str = "", seconds: float | None = None
    ) -> str:
        """One aligned line: mark, label, duration (when timed), detail."""
        duration = "" if seconds is None else format_duration(seconds)
        text = f"  {self.mark(status)} {label:<{LABEL_WIDTH}} "
        if seconds is not None:
            text += f"{self.paint(f'{duration:>{DURATION_WIDTH}}', 'grey')}  "
        return (text + detail).rstrip()

    def remedy(self, text: str) -> str:
        """The "what to do" line under a failed item, indented under its label."""
        indent = " " * (3 + self.mark_width)
        return f"{indent}{self.paint(self.arrow + ' ' + text, 'cyan')}"

    def detail(self, text: str) -> str:
        """A further line about the item above (a table row, a value)."""
        return f"{' ' * (3 + self.mark_width)}{text}"


def format_duration(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 60:
        return f"{seconds:.1f} s"
    return f"{seconds / 60:.1f} min"
