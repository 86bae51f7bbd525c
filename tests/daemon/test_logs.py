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


def log_calls() -> Iterator[tuple[str, ast.Call, dict[str, ast.Dict]]]:
    """Every log call with extra=, and the module's helpers that return a dict literal."""
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if path.name.endswith(("_pb2.py", "_pb2_grpc.py")):
                continue
            tree = ast.parse(path.read_text(), str(path))
            helpers = dict_helpers(tree)
            for node in ast.walk(tree):
                if (
                    isinstance(node, ast.Call)
                    and isinstance(node.func, ast.Attribute)
                    and node.func.attr in LOG_METHODS
                    and any(keyword.arg == "extra" for keyword in node.keywords)
                ):
                    yield f"{path.relative_to(ROOT)}:{node.lineno}", node, helpers


def dict_helpers(tree: ast.Module) -> dict[str, ast.Dict]:
    """Functions and methods whose body is `return {...}`: their keys can be checked."""
    helpers = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and len(node.body) == 1:
            (statement,) = node.body
            if isinstance(statement, ast.Return) and isinstance(statement.value, ast.Dict):
                helpers[node.name] = statement.value
    return helpers


def resolved(value: ast.expr, helpers: dict[str, ast.Dict]) -> ast.Dict | None:
    """The dict literal an extra (or a ** spread in one) is, or None if unknown."""
    if isinstance(value, ast.Dict):
        return value
    if isinstance(value, ast.Call):
        function = value.func
        name = function.attr if isinstance(function, ast.Attribute) else None
        if isinstance(function, ast.Name):
            name = function.id
        return helpers.get(name or "")
    return None


def extra_problems(call: ast.Call, helpers: dict[str, ast.Dict] | None = None) -> list[str]:
    (extra,) = [keyword.value for keyword in call.keywords if keyword.arg == "extra"]
    literal = resolved(extra, helpers or {})
    if literal is None:
        return ["extra= is not a dict literal (or a helper returning one): keys unchecked"]
    return dict_problems(literal, helpers or {})


def dict_problems(literal: ast.Dict, helpers: dict[str, ast.Dict]) -> list[str]:
    problems = []
    for key, value in zip(literal.keys, literal.values, strict=True):
        if key is None:  # a ** spread
            spread = resolved(value, helpers)
            if spread is None:
                problems.append("a ** spread of something that is not a known dict literal")
            else:
                problems += dict_problems(spread, helpers)
        elif not (isinstance(key, ast.Constant) and isinstance(key.value, str)):
            problems.append("a key that is not a string literal")
        elif key.value in RESERVED:
            problems.append(f"{key.value!r} is a LogRecord attribute: logging raises KeyError")
    return problems


def test_the_scan_finds_the_log_calls() -> None:
    assert len(list(log_calls())) > 30


def test_every_extra_names_only_free_keys() -> None:
    problems = {
        where: problems
        for where, call, helpers in log_calls()
        if (problems := extra_problems(call, helpers))
    }
    assert problems == {}


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ('log.debug("x", extra={"name": 1})', ["'name' is a LogRecord attribute"]),
        ('log.info("x", extra={"message": 1})', ["'message' is a LogRecord attribute"]),
        ('log.info("x", extra=fields)', ["not a dict literal"]),
        ('log.info("x", extra={**fields})', ["not a known dict literal"]),
        ('log.info("x", extra={"entry": 1})', []),
        ('log.info("x", extra=self._fields(c))', []),
        ('log.info("x", extra={**self._fields(c), "error": 1})', []),
        ('log.info("x", extra={**self._named(c)})', ["'name' is a LogRecord attribute"]),
        ('log.info("x", extra=_named())', ["'name' is a LogRecord attribute"]),
    ],
)
def test_the_check_itself(source: str, expected: list[str]) -> None:
    module = ast.parse(
        "def _fields(c):\n    return {'claim': c}\n"
        "def _named(c=None):\n    return {'name': c}\n" + source
    )
    call = module.body[-1].value  # type: ignore[attr-defined]
    problems = extra_problems(call, dict_helpers(module))
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
