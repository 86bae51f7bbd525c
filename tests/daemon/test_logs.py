"""Log calls: none can kill the daemon, whatever the level (see also tests/conftest.py)."""

from __future__ import annotations

import ast
import io
import json
import logging
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon import logs
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


@pytest.fixture
def restored_logging() -> Iterator[None]:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    flags = logging._srcfile, logging.logThreads, logging.logProcesses, logging.logMultiprocessing
    try:
        yield
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
        (
            logging._srcfile,
            logging.logThreads,
            logging.logProcesses,
            logging.logMultiprocessing,
        ) = flags


@pytest.mark.usefixtures("restored_logging")
def test_the_writer_thread_writes_everything_by_close_with_request_ids() -> None:
    buffer = io.StringIO()
    writer = logs.configure("json", "info", background=True, stream=buffer)
    log = logging.getLogger("daemon.test")
    token = logs.REQUEST_ID.set("0badcafe")
    try:
        for index in range(500):
            log.info("allocated %d", index, extra={"devices": ["a"]})
    finally:
        logs.REQUEST_ID.reset(token)
    log.error("fatal error", exc_info=RuntimeError("driver unloaded"))
    log.debug("below the level")
    writer.close()
    log.error("after close: written at once")
    entries = [json.loads(line) for line in buffer.getvalue().splitlines()]
    assert [e["msg"] for e in entries[:2]] == ["allocated 0", "allocated 1"]
    assert len(entries) == 502
    assert all(e["request_id"] == "0badcafe" for e in entries[:500])
    assert entries[500]["msg"] == "fatal error"
    assert "RuntimeError: driver unloaded" in entries[500]["exception"]
    assert "request_id" not in entries[500]
    assert entries[501]["msg"] == "after close: written at once"


@pytest.mark.usefixtures("restored_logging")
def test_the_event_loop_thread_neither_formats_nor_writes() -> None:
    class Recording(io.StringIO):
        def __init__(self) -> None:
            super().__init__()
            self.threads: set[int] = set()

        def write(self, text: str) -> int:
            self.threads.add(threading.get_ident())
            return super().write(text)

    stream = Recording()
    writer = logs.configure("json", "info", background=True, stream=stream)
    logging.getLogger("daemon.test").info("allocated", extra={"devices": ["a"]})
    writer.close()
    assert stream.getvalue()
    assert threading.get_ident() not in stream.threads
