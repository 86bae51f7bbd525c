"""The provider's TOML config: read, validated (errors name the field), cached.

Parsing TOML means importing tomllib, whose own imports (re, datetime, typing) cost
several times the rest of a run. With a cache directory, the validated config is kept
there as `marshal` data keyed by the file's identity (device, inode, size, mtime, ctime)
and the interpreter version, so the kubelet's repeated execs skip TOML entirely until
the file changes. Python 3.9 and 3.10 have no tomllib: the zipapp bundles the
pure-Python `tomli` backport (the same parser tomllib was made from) for them.
"""

from __future__ import annotations

import marshal
import os
import sys

from credprovider.errors import ProviderError
from credprovider.files import private_dir, read_private, write_private
from credprovider.match import PatternError, check_pattern

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

    Table = dict[str, Any]

DEFAULT_CACHE_SECONDS = 300
DEFAULT_TIMEOUT_SECONDS = 10
# The kubelet kills a plugin after one minute; every network or helper call must give
# up long before, so that the provider can still report a clear error.
MAX_TIMEOUT_SECONDS = 30
_CACHE_FILE = "config.marshal"
# 2: durations became whole seconds (ints) checked against Go's range; a cache written
# before then may hold a duration the kubelet cannot parse, so it must not be reused.
_CACHE_FORMAT = 2
_NANOSECONDS = {"h": 3_600_000_000_000, "m": 60_000_000_000, "s": 1_000_000_000, "ms": 1_000_000}
# The kubelet reads every duration we hand it with Go's time.ParseDuration, into an
# int64 of nanoseconds: anything longer fails its whole response.
MAX_DURATION_NANOSECONDS = (1 << 63) - 1
GO_MAX_DURATION = "2562047h47m16.854775807s"
_NUMBER = "0123456789."


def parse_duration(text: str) -> int:
    """Nanoseconds in a Go-style duration ("90s", "5m", "1h30m", "250ms", "0").

    Integer arithmetic, as Go's time.ParseDuration does; a duration Go cannot
    represent is refused here, so that it can never reach the kubelet.
    """
    if text == "0":
        return 0
    if not text:
        raise ValueError("empty duration")
    shown = repr(text if len(text) <= 40 else text[:37] + "...")
    too_long = ValueError(
        f"duration {shown} is longer than Go's longest, {GO_MAX_DURATION}, "
        "so the kubelet could not read it"
    )
    total, i = 0, 0
    while i < len(text):
        start = i
        while i < len(text) and text[i] in _NUMBER:
            i += 1
        number = text[start:i]
        if i == len(text):
            raise ValueError(f"duration {shown} has no unit (e.g. {number[:20]}s)")
        unit = "ms" if text.startswith("ms", i) else text[i]
        whole, _, fraction = number.partition(".")
        if unit not in _NANOSECONDS or not (whole or fraction) or "." in fraction:
            raise ValueError(f"invalid duration {shown} (use h, m, s or ms, e.g. 1h30m)")
        # More digits than an int64 has overflow in any unit; checked before int(),
        # which refuses thousands of digits. Digits past a nanosecond count for nothing.
        whole, fraction = whole.lstrip("0"), fraction[:18]
        if len(whole) > len(str(MAX_DURATION_NANOSECONDS)):
            raise too_long
        scale = _NANOSECONDS[unit]
        total += int(whole or "0") * scale + int(fraction or "0") * scale // 10 ** len(fraction)
        if total > MAX_DURATION_NANOSECONDS:
            raise too_long
        i += len(unit)
    return total


def _seconds(text: str) -> int:
    """A duration for the kubelet's cache, in the whole seconds our responses carry."""
    return parse_duration(text) // 1_000_000_000


def _pattern(value: str) -> str:
    try:
        check_pattern(value)
    except PatternError as error:
        raise ValueError(f"{value!r} can never match an image: {error}") from None
    # Legal for the kubelet, but never what was meant: it would silently match
    # something else (a host cut short at `?` or `#`, or user@ thrown away).
    for char in "?#@":
        if char in value:
            raise ValueError(f"{value!r}: {char!r} is not a glob or host character for the kubelet")
    return value


def _absolute(value: str) -> str:
    if not value.startswith("/"):
        raise ValueError(f"{value!r} is not an absolute path")
    return value


def _timeout(value: str) -> float:
    nanoseconds = parse_duration(value)
    if not 0 < nanoseconds <= MAX_TIMEOUT_SECONDS * 1_000_000_000:
        raise ValueError(f"must be more than 0s and at most {MAX_TIMEOUT_SECONDS}s")
    return nanoseconds / 1e9


def _https(value: str) -> str:
    if not value.startswith("https://") or len(value) <= len("https://"):
        raise ValueError(f"{value!r} is not an https:// URL")
    return value


def _name(value: str) -> str:
    if not value:
        raise ValueError("must not be empty")
    return value


# Per table: field -> (converter from the TOML string, default; None means required).
_Fields = dict[str, tuple["Callable[[str], object]", object]]
_STATIC: _Fields = {
    "registry": (_pattern, None),
    "username": (_name, None),
    "password": (_name, ""),
    "passwordFile": (_absolute, ""),
    "cacheDuration": (_seconds, ""),
}
_DOCKER: _Fields = {
    "path": (_absolute, None),
    "cacheDuration": (_seconds, ""),
    "helperTimeout": (_timeout, float(DEFAULT_TIMEOUT_SECONDS)),
}
_TOKEN: _Fields = {
    "registry": (_pattern, None),
    "username": (_name, None),
    "mode": (str, "passthrough"),
    "endpoint": (_https, ""),
    "audience": (str, ""),
    "scope": (str, ""),
    "caFile": (_absolute, ""),
    "timeout": (_timeout, float(DEFAULT_TIMEOUT_SECONDS)),
    "maxCacheDuration": (_seconds, 3600),
}
_TABLES = {"static": _STATIC, "dockerConfig": _DOCKER, "serviceAccountToken": _TOKEN}


def _table(raw: object, where: str, fields: _Fields) -> Table:
    if not isinstance(raw, dict):
        raise ProviderError(f"config {where}: must be a table")
    prefix = f"config {where}." if where else "config "
    for key in raw:
        if key not in fields:
            raise ProviderError(f"{prefix}{key}: unknown field")
    table: Table = {}
    for key, (convert, default) in fields.items():
        if key not in raw:
            if default is None:
                raise ProviderError(f"{prefix}{key}: required")
            table[key] = default
            continue
        value = raw[key]
        if not isinstance(value, str):
            raise ProviderError(f"{prefix}{key}: must be a string")
        try:
            table[key] = convert(value)
        except ValueError as error:
            raise ProviderError(f"{prefix}{key}: {error}") from None
    return table


def validate(raw: Table) -> Table:
    """The normalized config (cache durations in whole seconds, timeouts in seconds,
    defaults filled in) or ProviderError."""
    top = {k: v for k, v in raw.items() if k not in _TABLES}
    config = _table(top, "", {"cacheDuration": (_seconds, DEFAULT_CACHE_SECONDS)})
    for name, fields in _TABLES.items():
        entries = raw.get(name, [])
        if not isinstance(entries, list):
            raise ProviderError(f"config {name}: must be an array of tables ([[{name}]])")
        config[name] = [_table(entry, f"{name}[{i}]", fields) for i, entry in enumerate(entries)]
    for i, entry in enumerate(config["static"]):
        if bool(entry["password"]) == bool(entry["passwordFile"]):
            raise ProviderError(f"config static[{i}]: set exactly one of password, passwordFile")
    for i, entry in enumerate(config["serviceAccountToken"]):
        _validate_token_source(entry, f"serviceAccountToken[{i}]")
    if not any(config[name] for name in _TABLES):
        raise ProviderError("config has no credential source (static, dockerConfig, ...)")
    return config


def _validate_token_source(entry: Table, where: str) -> None:
    if entry["mode"] not in ("passthrough", "exchange"):
        raise ProviderError(f"config {where}.mode: must be passthrough or exchange")
    exchange = entry["mode"] == "exchange"
    if exchange and not entry["endpoint"]:
        raise ProviderError(f"config {where}.endpoint: required for mode exchange")
    for key in ("endpoint", "audience", "scope", "caFile"):
        if entry[key] and not exchange:
            raise ProviderError(f"config {where}.{key}: only for mode exchange")


def _parse_toml(data: bytes, path: str) -> Table:
    try:
        import tomllib  # noqa: PLC0415
    except ImportError:  # Python 3.9 and 3.10: the backport, bundled in the zipapp
        import tomli as tomllib  # type: ignore[no-redef]  # noqa: PLC0415
    try:
        return tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise ProviderError(f"config file {path} is not UTF-8") from None
    except tomllib.TOMLDecodeError as error:
        # tomllib's message names a line and column, never the text there.
        raise ProviderError(f"config file {path} is not valid TOML: {error}") from None


def load(path: str, cache_dir: str | None) -> Table:
    """The validated config from `path`, from the cache when the file has not changed."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise ProviderError(f"config file {path} does not exist") from None
    except OSError as error:
        raise ProviderError(f"cannot read config file {path}: {error.strerror}") from None
    identity = (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)
    key = (_CACHE_FORMAT, sys.hexversion, os.path.abspath(path), *identity)
    cache_path = os.path.join(private_dir(cache_dir), _CACHE_FILE) if cache_dir else None
    if cache_path and os.path.exists(cache_path):
        try:
            # Trusted as much as the config: private file, private directory, ours.
            cached_key, cached = marshal.loads(read_private(cache_path, "config cache"))  # noqa: S302
        except (ValueError, EOFError, TypeError):
            cached_key = None  # damaged: parse again and overwrite it
        if cached_key == key:
            return cached  # type: ignore[no-any-return]
    config = validate(_parse_toml(read_private(path, "config file"), path))
    if cache_path:
        write_private(cache_path, marshal.dumps((key, config)))
    return config
