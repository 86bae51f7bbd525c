"""What `nodeplug doctor` found: one result per check, as lines for people or JSON."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from daemon.terminal import Status, Style

_COUNTED = {Status.FAIL: "failed", Status.WARN: "warnings", Status.SKIP: "not applicable"}


@dataclass(frozen=True, slots=True)
class Check:
    section: str
    name: str
    status: Status
    detail: str
    # What to do about it (set when the status is FAIL or WARN).
    remedy: str | None = None


class Report:
    def __init__(self) -> None:
        self.checks: list[Check] = []

    def section(self, name: str) -> Section:
        return Section(self, name)

    @property
    def ok(self) -> bool:
        return all(check.status is not Status.FAIL for check in self.checks)

    def lines(self, style: Style) -> list[str]:
        lines: list[str] = []
        current = None
        for check in self.checks:
            if check.section != current:
                current = check.section
                lines += ["", style.heading(current)] if lines else [style.heading(current)]
            lines.append(style.line(check.status, check.name, check.detail))
            if check.remedy and check.status in (Status.FAIL, Status.WARN):
                lines.append(style.remedy(check.remedy))
        counts = {status: 0 for status in Status}
        for check in self.checks:
            counts[check.status] += 1
        words = [f"{counts[Status.OK]} passed"]
        words += [f"{counts[s]} {word}" for s, word in _COUNTED.items() if counts[s]]
        lines += [
            "",
            style.line(Status.OK if self.ok else Status.FAIL, "summary", ", ".join(words)),
        ]
        return lines

    def document(self) -> dict[str, Any]:
        return {"ok": self.ok, "checks": [asdict(check) for check in self.checks]}


class Section:
    """Adds checks under one heading."""

    def __init__(self, report: Report, name: str) -> None:
        self.report = report
        self.name = name

    def add(self, name: str, status: Status, detail: str, remedy: str | None = None) -> None:
        self.report.checks.append(Check(self.name, name, status, detail, remedy))

    def ok(self, name: str, detail: str) -> None:
        self.add(name, Status.OK, detail)

    def warn(self, name: str, detail: str, remedy: str | None = None) -> None:
        self.add(name, Status.WARN, detail, remedy)

    def fail(self, name: str, detail: str, remedy: str | None = None) -> None:
        self.add(name, Status.FAIL, detail, remedy)

    def skip(self, name: str, detail: str) -> None:
        self.add(name, Status.SKIP, detail)
