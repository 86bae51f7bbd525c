"""JSON in and out without the `json` package on the hot path.

`json` imports `re` and `enum`, which cost more start-up time than everything else the
provider does for a static answer. CPython's `_json` C module (the scanner and string
encoder `json` itself uses) needs neither; other interpreters fall back to `json`.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

_WHITESPACE = " \t\n\r"


def _refuse_constant(name: str) -> float:
    # NaN and Infinity are not JSON; Go's decoder refuses them too.
    raise ValueError(f"{name} is not valid JSON")


class _ScannerContext:
    """The attributes `_json.make_scanner` reads from a JSONDecoder."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    parse_constant = staticmethod(_refuse_constant)


class NestingError(ValueError):
    """A document nested deeper than the parser recurses (Python's recursion limit)."""


def loads(text: str) -> object:
    """Parse one JSON document; ValueError (json's: a position, never content) if it is not."""
    try:
        return _loads(text)
    except RecursionError:
        # Both parsers recurse per level: a document nested thousands deep is bad
        # input like any other, not a crash.
        raise NestingError("JSON nested too deeply") from None


def _loads(text: str) -> object:
    try:
        from _json import make_scanner  # noqa: PLC0415

        # typeshed wants a JSONDecoder; the scanner reads only these attributes.
        context: Any = _ScannerContext()
        scan: Callable[[str, int], tuple[object, int]] = make_scanner(context)
        value, end = scan(text, len(text) - len(text.lstrip(_WHITESPACE)))
        if not text[end:].strip(_WHITESPACE):
            return value
    except (ImportError, StopIteration, ValueError, SystemError):
        # Not CPython, or not valid JSON: the C scanner only raises json's own
        # JSONDecodeError once json.decoder is imported, so let json say what is wrong.
        pass
    import json  # noqa: PLC0415

    return json.loads(text, parse_constant=_refuse_constant)


def dumps(value: object) -> str:
    """Compact ASCII JSON of nested dicts with str keys, strs and lists."""
    try:
        from _json import encode_basestring_ascii as quote  # noqa: PLC0415
    except ImportError:  # not CPython
        import json  # noqa: PLC0415

        return json.dumps(value, separators=(",", ":"))
    return _encode(value, quote)


def _encode(value: object, quote: Callable[[str], str]) -> str:
    if isinstance(value, str):
        return quote(value)
    if isinstance(value, dict):
        return "{" + ",".join(quote(k) + ":" + _encode(v, quote) for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ",".join(_encode(v, quote) for v in value) + "]"
    raise TypeError(f"cannot encode {type(value).__name__}")
