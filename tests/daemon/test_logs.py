"""Log calls: none can kill the daemon, whatever the level (see also tests/conftest.py)."""

from __future__ import annotations

import ast
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon.logs import JsonFormatter, TextFormatter

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("daemon", "deviceplugin", "csi", "credprovider", "examples", "bench")
LOG_METHODS = {"debug", "info", "warning", "error", "exception", "critical", "log"}
# Logger.makeRecord raises KeyError for an extra that names one of these.
RESERVED = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


def log_calls() -> Iterator[tuple[str, ast.Call]]:
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if path.name.endswith(("_pb2.py", "_pb2_grpc.py")):
                continue
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if (
                    isinstance(node, ast.Call)
                    and isinstance(node.func, ast.Attribute)
                    and node.func.attr in LOG_METHODS
                    and any(keyword.arg == "extra" for keyword in node.keywords)
                ):
                    yield f"{path.relative_to(ROOT)}:{node.lineno}", node


def extra_problems(call: ast.Call) -> list[str]:
    (extra,) = [keyword.value for keyword in call.keywords if keyword.arg == "extra"]
    if not isinstance(extra, ast.Dict):
        return ["extra= is not a dict literal, so its keys cannot be checked"]
    problems = []
    for key in extra.keys:
        if not (isinstance(key, ast.Constant) and isinstance(key.value, str)):
            problems.append("a key that is not a string literal (or a ** spread)")
        elif key.value in RESERVED:
            problems.append(f"{key.value!r} is a LogRecord attribute: logging raises KeyError")
    return problems


def test_the_scan_finds_the_log_calls() -> None:
    assert len(list(log_calls())) > 20


def test_every_extra_names_only_free_keys() -> None:
    problems = {where: p for where, call in log_calls() if (p := extra_problems(call))}
    assert problems == {}


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ('log.debug("x", extra={"name": 1})', ["'name' is a LogRecord attribute"]),
        ('log.info("x", extra={"message": 1})', ["'message' is a LogRecord attribute"]),
        ('log.info("x", extra=fields)', ["not a dict literal"]),
        ('log.info("x", extra={**fields})', ["not a string literal"]),
        ('log.info("x", extra={"entry": 1})', []),
    ],
)
def test_the_check_itself(source: str, expected: list[str]) -> None:
    call = ast.parse(source).body[0].value  # type: ignore[attr-defined]
    problems = extra_problems(call)
    assert len(problems) == len(expected)
    assert all(e in p for e, p in zip(expected, problems, strict=True))


@pytest.mark.parametrize("formatter", [JsonFormatter(), TextFormatter()])
def test_formatters_take_any_field_value(formatter: logging.Formatter) -> None:
    record = logging.LogRecord("daemon.x", logging.DEBUG, __file__, 1, "m %s", ("a",), None)
    record.path = Path("/x")
    record.entries = {1: object()}
    record.blob = b"\xff"
    text = formatter.format(record)
    if isinstance(formatter, JsonFormatter):
        entry = json.loads(text)
        assert (entry["msg"], entry["path"], entry["level"]) == ("m a", "/x", "debug")
