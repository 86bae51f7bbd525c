"""configkit: msgspec's errors, one of each wording, as problems that name their field."""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from deviceplugin import configkit


class Color(enum.StrEnum):
    RED = "red"
    GREEN = "green"
    BLUE = "blue"


class Even(configkit.Checked):
    @classmethod
    def check(cls, value: str) -> str:
        if len(value) % 2:
            raise ValueError(f"{value!r} has an odd length")
        return value.upper()


class Item(configkit.Section, frozen=True):
    item_name: Even
    count: Annotated[int, msgspec.Meta(ge=1, le=9)] = 1
    ratio: Annotated[float, msgspec.Meta(gt=0)] = 1.0
    colors: Annotated[list[Color], msgspec.Meta(min_length=1)] | Color | None = None
    mode: Literal["a", "b"] = "a"
    tag: Annotated[str, msgspec.Meta(min_length=2, pattern="^[a-z]+$")] = "ab"

    def __post_init__(self) -> None:
        if self.count == 7:
            raise configkit.field_problem("count", "seven is taken")
        if self.count == 8 and self.mode == "b":
            raise ValueError("mode: b allows no count of 8")


class Document(configkit.Section, frozen=True):
    some_path: Path = Path("/default")
    items: list[Item] = msgspec.field(default_factory=list)
    labels: dict[str, Color] = msgspec.field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.items) > 2:
            raise configkit.field_problem("items[2]", "at most two items")


def with_item(**item: object) -> dict[str, Any]:
    return {"items": [{"itemName": "ab", **item}]}


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"somePath": "relative"}, "somePath: must be an absolute path, not 'relative'"),
        ({"somePath": "/a\0b"}, "somePath: must not contain NUL bytes"),
        ({"somePath": 7}, "somePath: Input should be a valid path, not an integer"),
        ({"items": {}}, "items: Input should be a valid list, not a mapping"),
        ({"items": [{}]}, "items[0].itemName: required field is missing"),
        (with_item(extra=1), "items[0].extra: unknown field (check its spelling and indentation)"),
        ({"some_path": "/x"}, "some_path: unknown field"),  # camelCase only
        (with_item(itemName="abc"), "items[0].itemName: 'abc' has an odd length"),
        (
            with_item(itemName=5),
            "items[0].itemName: Input should be a valid string, not an integer",
        ),
        (with_item(count="2"), "items[0].count: Input should be a valid integer, not a string"),
        (with_item(count=True), "items[0].count: Input should be a valid integer, not a boolean"),
        (with_item(count=0), "items[0].count: Input should be greater than or equal to 1"),
        (with_item(count=10), "items[0].count: Input should be less than or equal to 9"),
        (with_item(ratio=0), "items[0].ratio: Input should be greater than 0.0"),
        (with_item(ratio=None), "items[0].ratio: Input should be a valid number, not null"),
        (with_item(colors=[]), "items[0].colors: List should have at least 1 item"),
        (
            with_item(colors=["red", "pink"]),
            "items[0].colors[1]: Input should be 'red', 'green' or 'blue', not 'pink'",
        ),
        (with_item(colors="pink"), "items[0].colors: Input should be 'red', 'green' or 'blue'"),
        (
            with_item(colors=1.5),
            "items[0].colors: Input should be a valid string, a valid list or null, not a number",
        ),
        (with_item(mode="c"), "items[0].mode: Input should be 'a' or 'b', not 'c'"),
        (with_item(tag="a"), "items[0].tag: String should have at least 2 characters"),
        (with_item(tag="AB"), "items[0].tag: String should match the pattern '^[a-z]+$'"),
        (with_item(count=7), "items[0].count: seven is taken"),
        (with_item(count=8, mode="b"), "items[0]: mode: b allows no count of 8"),
        ({"labels": {"x": "pink"}}, "labels[...]: Input should be 'red', 'green' or 'blue'"),
        ({"labels": {1: "red"}}, "labels: a key: Input should be a valid string, not an integer"),
        ({1: "red"}, "(top level): a key: Input should be a valid string"),
        ({"items": [{"itemName": "ab", "mode": "b", "count": 8}]}, "items[0]: mode: b allows"),
        ({"items": [{"itemName": "ab"}] * 3}, "items[2]: at most two items"),
        ({"other": 1}, "other: unknown field"),
        ([], "(top level): Input should be a valid mapping, not a list"),
    ],
)
def test_problems_name_the_field(data: object, expected: str) -> None:
    with pytest.raises(configkit.InvalidConfigError) as caught:
        configkit.convert(data, Document)
    (problem,) = caught.value.lines()
    assert problem.startswith(expected)
    # A vendor's own msgspec.convert() raises msgspec's error: worded the same.
    with pytest.raises(msgspec.ValidationError) as plain:
        msgspec.convert(data, Document, dec_hook=configkit._decoded)
    assert configkit.problem(plain.value, Document).startswith(expected)


def test_every_problem_is_found_and_checks_of_a_whole_section_wait_for_its_fields() -> None:
    data = {
        "somePath": "relative",
        "other": 1,
        "items": [
            {"itemName": "abc", "count": 0},
            {"itemName": "ab", "count": 8, "mode": "b"},  # a whole-section check
            {"itemName": "ab", "count": 8, "mode": "c"},  # its field first
            {"colors": ["red", "pink", "blue", 5]},
        ],
    }
    with pytest.raises(configkit.InvalidConfigError) as caught:
        configkit.convert(data, Document)
    assert caught.value.lines(at="doc") == [
        "doc.somePath: must be an absolute path, not 'relative'",
        "doc.other: unknown field (check its spelling and indentation)",
        "doc.items[0].itemName: 'abc' has an odd length",
        "doc.items[0].count: Input should be greater than or equal to 1",
        "doc.items[1]: mode: b allows no count of 8",
        "doc.items[2].mode: Input should be 'a' or 'b', not 'c'",
        "doc.items[3].colors[1]: Input should be 'red', 'green' or 'blue', not 'pink'",
        "doc.items[3].colors[3]: Input should be a valid string, not an integer",
        "doc.items[3].itemName: required field is missing",
    ]


def test_without_the_root_type_allowed_values_go_unnamed() -> None:
    with pytest.raises(msgspec.ValidationError) as caught:
        msgspec.convert(with_item(mode="c"), Document, dec_hook=configkit._decoded)
    assert configkit.problem(caught.value, at="plugin.config") == (
        "plugin.config.items[0].mode: 'c' is not one of the allowed values"
    )


def test_problems_are_placed_where_the_section_sits() -> None:
    with pytest.raises(configkit.InvalidConfigError) as caught:
        configkit.convert({"items": [{"itemName": "ab"}] * 3}, Document)
    assert caught.value.lines(at="plugin.config") == ["plugin.config.items[2]: at most two items"]
    with pytest.raises(configkit.InvalidConfigError) as caught:
        configkit.convert([], Document)
    assert caught.value.lines(at="plugin.config") == [
        "plugin.config: Input should be a valid mapping, not a list"
    ]


def test_checked_values_and_paths_are_kept_as_converted() -> None:
    document = configkit.convert({"somePath": "/p", "items": [{"itemName": "ab"}]}, Document)
    assert document.some_path == Path("/p")
    assert document.items[0].item_name == "AB"  # what check() returned
    assert configkit.dumped(document) == {
        "somePath": "/p",
        "items": [
            {
                "itemName": "AB",
                "count": 1,
                "ratio": 1.0,
                "colors": None,
                "mode": "a",
                "tag": "ab",
            }
        ],
        "labels": {},
    }
    with pytest.raises(AttributeError):
        document.some_path = Path("/q")  # type: ignore[misc]


class Count(int):
    @classmethod
    def from_config(cls, value: object) -> Count:
        return cls(int(str(value)))


class Counted(configkit.Section, frozen=True):
    count: Count


def test_numbers_of_a_type_of_their_own_are_dumped_as_numbers() -> None:
    counted = configkit.convert({"count": "12"}, Counted)
    assert type(counted.count) is Count
    dumped = configkit.dumped(counted)
    assert dumped == {"count": 12} and type(dumped["count"]) is int


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=12,
)


@given(
    st.dictionaries(
        st.sampled_from(["somePath", "items", "labels", "other"]), json_values, max_size=3
    )
    | st.fixed_dictionaries(
        {
            "items": st.lists(
                st.dictionaries(
                    st.sampled_from(["itemName", "count", "colors", "mode", "tag"]), json_values
                ),
                max_size=3,
            )
        }
    )
)
def test_property_every_refusal_is_worded_problems(data: dict[str, Any]) -> None:
    try:
        configkit.convert(data, Document)
    except configkit.InvalidConfigError as error:
        lines = error.lines()
        assert lines and all(": " in line and " - at `" not in line for line in lines), lines
