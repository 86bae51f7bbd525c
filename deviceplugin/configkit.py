"""Config sections as msgspec Structs, and problems that name their field.

msgspec does the typing (strict types, unknown keys refused, camelCase keys, ranges,
lengths, enums) for 1.2 MiB of RSS, where pydantic with our models cost 8-9 MiB of a
daemon that stays resident on every node. What a type cannot say is checked by field
types of our own (`Checked` strings, `from_config` classes) and by `__post_init__`.
`convert()` reports every problem (msgspec alone stops at the first), worded as the rest
of nodeplug words them: `devicePlugins[0].replicas: Input should be a valid integer, not
a string`.

The built-in backends use it (and vendors may), and the daemon converts its whole config
with it, the `csi:` section included. csi/config.py, which must not import deviceplugin,
defines its sections on msgspec alone with the same conventions: `Section`'s options, and
field types that convert through a `from_config` classmethod, which `convert()` calls by
duck typing. This module imports nothing of nodeplug's.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, TypeVar, Union, get_args, get_origin

import msgspec

T = TypeVar("T")


class Section(
    msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True, rename="camel"
):
    """A mapping of a config: unknown keys refused, camelCase keys.

    Subclasses say `frozen=True` too (read-only once made): type checkers do not see it
    inherited.
    """


class Checked(str):
    """A string field with a check of its own, run while the config is converted."""

    @classmethod
    def check(cls, value: str) -> str:
        """The value to keep; a ValueError says what is wrong with it."""
        raise NotImplementedError

    @classmethod
    def from_config(cls, value: str) -> Checked:
        return cls(cls.check(value))


def absolute_path(value: object) -> Path:
    """Every path in a config is absolute: relative ones would depend on the working directory."""
    if not isinstance(value, str):
        raise TypeError(f"Input should be a valid path, not {_NOUNS.get(_kind(value))}")
    if not value.startswith("/"):
        raise ValueError(f"must be an absolute path, not {value!r}")
    if "\0" in value:
        raise ValueError("must not contain NUL bytes")
    return Path(value)


def _decoded(kind: type, value: object) -> object:
    """msgspec's hook for field types it does not know: paths, and any with `from_config`.

    A string type's `from_config` is given only strings.
    """
    if kind is Path:
        return absolute_path(value)
    from_config = getattr(kind, "from_config", None)
    if from_config is None:
        raise TypeError(f"{kind.__name__} is not a config field type")
    if issubclass(kind, str) and not isinstance(value, str):
        raise TypeError(f"Input should be a valid string, not {_NOUNS.get(_kind(value))}")
    return from_config(value)


class InvalidConfigError(ValueError):
    """Config data that does not convert: every problem found, each at its field."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        self.problems = problems  # (field path, message); the path "" is the top
        super().__init__("; ".join(self.lines()))

    def lines(self, at: str = "") -> list[str]:
        """Each problem as `field.path: message`, below `at` in a larger document."""
        return [f"{_joined(at, path) or '(top level)'}: {text}" for path, text in self.problems]


def convert(data: object, kind: type[T]) -> T:
    """Parsed YAML as a `kind`, or InvalidConfigError naming every problem found."""
    try:
        return msgspec.convert(data, kind, dec_hook=_decoded)
    except msgspec.ValidationError:
        raise InvalidConfigError(_problems(data, kind, "")) from None


def dumped(section: msgspec.Struct) -> Any:
    """The section as plain data with its config keys, as YAML or JSON would hold it."""
    return msgspec.to_builtins(section, enc_hook=_plain)


def _plain(value: object) -> object:
    """Our field types (`Checked` strings, csi's `Bytes`) and paths, as msgspec's own."""
    return int(value) if isinstance(value, int) else str(value)


def field_problem(field: str, message: str) -> ValueError:
    """An error about one field, raised from `__post_init__`: reported at that field.

    `field` is a path below the section (`devicePlugins[1].resourceName`). Other
    errors from `__post_init__` are reported at the section as a whole
    (`devicePlugins[0]: draDriverName: only used with ...`).
    """
    return ValueError(f"{_FIELD}{field}: {message}")


def problem(error: msgspec.ValidationError, root: type | None = None, at: str = "") -> str:
    """msgspec's error (from a vendor's own convert()) as `field.path: message`.

    `root`, the converted type, names the allowed values of an enum; `at` is where the
    converted data sits in a larger document (a backend's config).
    """
    path, message = _located(error, root, "")
    return f"{_joined(at, path) or '(top level)'}: {message}"


def _problems(data: object, kind: Any, path: str) -> list[tuple[str, str]]:
    """Every problem of `data` as a `kind`, where msgspec stops at the first.

    The fields of a mapping and the items of a list are converted one by one; checks of
    a section as a whole (`__post_init__`) run only once each of its fields is right.
    """
    try:
        msgspec.convert(data, kind, dec_hook=_decoded)
    except msgspec.ValidationError as error:
        first = [_located(error, kind, path)]
    else:
        return []
    found: list[tuple[str, str]] = []
    struct = _member(kind, _is_struct)
    items = _member(kind, _of_origin(list))
    if struct is not None and isinstance(data, dict) and all(isinstance(k, str) for k in data):
        fields = {field.encode_name: field for field in msgspec.structs.fields(struct)}
        for key, value in data.items():
            if key in fields:
                found += _problems(value, fields[key].type, _joined(path, key))
            elif struct.__struct_config__.forbid_unknown_fields:
                found.append((_joined(path, key), _UNKNOWN))
        missing = [name for name, field in fields.items() if field.required and name not in data]
        found += [(_joined(path, name), _MISSING) for name in missing]
    elif items is not None and isinstance(data, list):
        (item,) = get_args(items)
        for index, value in enumerate(data):
            found += _problems(value, item, f"{path}[{index}]")
    return found or first


def _member(kind: Any, wanted: Callable[[Any], bool]) -> Any:
    """`kind`, or the member of its union, that is `wanted` (Annotated looked through)."""
    if get_origin(kind) is Annotated:
        return _member(get_args(kind)[0], wanted)
    if get_origin(kind) in (Union, UnionType):
        return next((m for m in map(lambda a: _member(a, wanted), get_args(kind)) if m), None)
    return kind if wanted(kind) else None


def _located(error: msgspec.ValidationError, root: Any, at: str) -> tuple[str, str]:
    """The field path (below `at`) and message of msgspec's error, worded as ours."""
    message, path = _split(str(error))
    if message.startswith(_FIELD):
        field, _, message = message[len(_FIELD) :].partition(": ")
        path = _joined(path, field)
    elif match := _MISSING_OR_UNKNOWN.fullmatch(message):
        path = _joined(path, match["field"])
        message = _MISSING if match["what"] == "missing required" else _UNKNOWN
    else:
        message = _reworded(message, root, path)
    return _joined(at, path), message


_FIELD = "\x00field "  # marks field_problem()'s messages; never in a YAML key
_MISSING = "required field is missing"
_UNKNOWN = "unknown field (check its spelling and indentation)"
_MISSING_OR_UNKNOWN = re.compile(
    r"Object (?P<what>missing required|contains unknown) field `(?P<field>.*)`"
)
_LOCATION = re.compile(
    r"(?P<message>.*?)(?: - at (?P<key>`key` in )?`\$(?P<path>[^`]*)`)?", re.DOTALL
)
_NOUNS = {
    "int": "an integer",
    "float": "a number",
    "str": "a string",
    "bool": "a boolean",
    "array": "a list",
    "object": "a mapping",
    "null": "null",
}
_EXPECTED = {
    "int": "a valid integer",
    "float": "a valid number",
    "str": "a valid string",
    "bool": "a valid boolean",
    "array": "a valid list",
    "object": "a valid mapping",
    "null": "null",
}
_COMPARISONS = {
    ">=": "greater than or equal to",
    ">": "greater than",
    "<=": "less than or equal to",
    "<": "less than",
}
_LENGTH_NOUNS = {
    "array": ("List", "item"),
    "object": ("Mapping", "item"),
    "str": ("String", "character"),
}


def _wrong_type(found: re.Match[str]) -> str:
    wanted = _either([_EXPECTED.get(w, w) for w in found["want"].split(" | ")])
    return f"Input should be {wanted}, not {_NOUNS.get(found['got'], found['got'])}"


def _out_of_range(found: re.Match[str]) -> str:
    return f"Input should be {_COMPARISONS[found['op']]} {found['limit']}"


def _wrong_length(found: re.Match[str]) -> str:
    noun, unit = _LENGTH_NOUNS[found["kind"]]
    bound = "at least" if found["op"] == ">=" else "at most"
    return f"{noun} should have {bound} {found['n']} {unit}{'' if found['n'] == '1' else 's'}"


# msgspec's wordings (of the version pinned in .ci/constraints.txt;
# tests/deviceplugin/test_configkit.py has a case of each) and ours, as the rest of
# nodeplug words its messages.
_REWORDINGS: list[tuple[re.Pattern[str], Callable[[re.Match[str]], str]]] = [
    (re.compile(r"Expected `(?P<want>[^`]+)`, got `(?P<got>\w+)`"), _wrong_type),
    (re.compile(r"Expected `(?:int|float)` (?P<op>[<>]=?) (?P<limit>\S+)"), _out_of_range),
    (
        re.compile(r"Expected `(?P<kind>array|object|str)` of length (?P<op>[<>]=) (?P<n>\d+)"),
        _wrong_length,
    ),
    (
        re.compile(r"Expected `str` matching regex (?P<regex>.*)"),
        lambda found: f"String should match the pattern {found['regex']}",
    ),
    (re.compile(r"Expected `str`"), lambda _: "Input should be a valid string"),
]
_KEY_PREFIX = "\x00key "  # a problem with one of a mapping's keys
_BAD_ENUM = re.compile(r"Invalid enum value (?P<value>.*)")


def _kind(value: object) -> str:
    kinds = {bool: "bool", int: "int", float: "float", str: "str", type(None): "null"}
    if type(value) in kinds:
        return kinds[type(value)]
    return "object" if isinstance(value, dict) else "array"


def _split(text: str) -> tuple[str, str]:
    """msgspec's message and the path it names (`[...]` for a mapping's values)."""
    match = _LOCATION.fullmatch(text)
    assert match is not None  # every text matches: the location is optional
    message = f"{_KEY_PREFIX}{match['message']}" if match["key"] else match["message"]
    return message, (match["path"] or "").removeprefix(".")


def _joined(path: str, field: str) -> str:
    if not path or field.startswith("["):
        return f"{path}{field}"
    return f"{path}.{field}" if field else path


def _either(words: list[str]) -> str:
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} or {words[-1]}"


def _reworded(message: str, root: Any, path: str) -> str:
    if message.startswith(_KEY_PREFIX):
        return "a key: " + _reworded(message.removeprefix(_KEY_PREFIX), None, "")
    if match := _BAD_ENUM.fullmatch(message):
        allowed = _allowed_values(root, path)
        if not allowed:
            return f"{match['value']} is not one of the allowed values"
        return f"Input should be {_either([repr(a) for a in allowed])}, not {match['value']}"
    for pattern, reword in _REWORDINGS:
        if found := pattern.fullmatch(message):
            return reword(found)
    return message


def _allowed_values(kind: Any, path: str) -> list[object]:
    """The values an enum or literal field at `path` below `kind` takes, if it is one."""
    for index, name in re.findall(r"\[(\d+|\.\.\.)\]|\.?([^.\[]+)", path):
        if name:
            struct = _member(kind, _is_struct)
            fields = msgspec.structs.fields(struct) if struct is not None else ()
            kind = next((field.type for field in fields if field.encode_name == name), None)
        else:  # a list's item, or a mapping's value: [...]
            container = _member(kind, _of_origin(dict if index == "..." else list))
            kind = get_args(container)[-1] if container is not None else None
    members = _member(kind, lambda t: isinstance(t, type) and issubclass(t, Enum))
    if members is not None:
        return [member.value for member in members]
    literal = _member(kind, _of_origin(Literal))
    return list(get_args(literal)) if literal is not None else []


def _is_struct(kind: Any) -> bool:
    return isinstance(kind, type) and issubclass(kind, msgspec.Struct)


def _of_origin(origin: Any) -> Callable[[Any], bool]:
    """Whether a type is a `origin[...]` (list[int] for list)."""
    return lambda kind: get_origin(kind) is origin
