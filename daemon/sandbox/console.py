"""The sandbox's output: one timed line per step, sections, and a verdict at the end.

A demonstration runs its steps inside `console.step(label)`; the step's line shows
whether it worked, how long it took and what it found (`step.detail`, `step.lines`).
A step that fails prints what went wrong and, when this machine lacks something,
how to get it; the rest of its section is skipped (SectionFailed) and the others run.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TextIO

import grpc

from daemon.terminal import Status, Style

STEP_TIMEOUT = 30.0


class StepError(Exception):
    """A step cannot go on: what is wrong and, when known, what to do about it."""

    def __init__(self, message: str, remedy: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.remedy = remedy


class SectionFailedError(Exception):
    """A step of the section failed and was reported: skip the section's other steps."""


@dataclass
class Step:
    detail: str = ""
    # Further lines under the step's own (a response, a table), printed after it.
    lines: list[str] = field(default_factory=list)


def describe(error: BaseException, timeout: float | None = None) -> tuple[str, str | None]:
    """What an error means for the person reading, and what to do when that is known."""
    if isinstance(error, StepError):
        return error.message, error.remedy
    if isinstance(error, grpc.aio.AioRpcError):
        return f"{error.code().name}: {error.details()}", None
    if isinstance(error, TimeoutError):
        return ("timed out" if timeout is None else f"no answer within {timeout:g} s"), None
    if isinstance(error, OSError):
        return str(error), None
    return f"{type(error).__name__}: {error}", None


class Console:
    def __init__(self, stream: TextIO, style: Style) -> None:
        self.stream = stream
        self.style = style
        self.results: list[tuple[str, str, Status]] = []
        self._section = ""

    def print(self, text: str = "") -> None:
        print(text, file=self.stream, flush=True)

    def section(self, title: str, note: str = "") -> None:
        self._section = title
        self.print()
        self.print(self.style.heading(title, note))

    def info(self, label: str, detail: str) -> None:
        self.print(self.style.line(Status.INFO, label, detail))

    def detail(self, text: str) -> None:
        self.print(self.style.detail(text))

    def _record(self, label: str, status: Status) -> None:
        self.results.append((self._section, label, status))

    def failed(
        self, label: str, message: str, remedy: str | None = None, seconds: float | None = None
    ) -> None:
        self._record(label, Status.FAIL)
        self.print(self.style.line(Status.FAIL, label, message, seconds))
        if remedy:
            self.print(self.style.remedy(remedy))

    def left_out(self, label: str, why: str, remedy: str | None = None) -> None:
        """A part this machine cannot show: why, and how to get it."""
        self._record(label, Status.SKIP)
        self.print(self.style.line(Status.SKIP, label, f"left out: {why}"))
        if remedy:
            self.print(self.style.remedy(remedy))

    @contextlib.asynccontextmanager
    async def step(self, label: str, timeout: float = STEP_TIMEOUT) -> AsyncIterator[Step]:
        step = Step()
        started = time.monotonic()
        try:
            async with asyncio.timeout(timeout):
                yield step
        except asyncio.CancelledError:
            raise
        except Exception as error:
            message, remedy = describe(error, timeout)
            self.failed(label, message, remedy, time.monotonic() - started)
            raise SectionFailedError(label) from error
        self._record(label, Status.OK)
        self.print(self.style.line(Status.OK, label, step.detail, time.monotonic() - started))
        for line in step.lines:
            self.detail(line)

    def summary(self) -> bool:
        """Print the verdict; True when every step ran and worked."""
        counts = {status: 0 for status in (Status.OK, Status.FAIL, Status.SKIP)}
        for _, _, status in self.results:
            counts[status] += 1
        good = counts[Status.FAIL] == 0 and counts[Status.SKIP] == 0
        words = f"{counts[Status.OK]} steps worked"
        if counts[Status.FAIL]:
            words += f", {counts[Status.FAIL]} failed"
        if counts[Status.SKIP]:
            words += f", {counts[Status.SKIP]} left out on this machine"
        self.print()
        self.print(self.style.line(Status.OK if good else Status.FAIL, "summary", words))
        return good
