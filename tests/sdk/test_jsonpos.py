"""Positions in JSON text for CI annotations: members behind tricky strings, escaped pointer tokens, arrays."""

from __future__ import annotations

import json

import pytest

from adapterspec._jsonpos import member_position, position, syntax_error_position

TEXT = """{
  "a": "}{,\\\\\\"[",
  "x/y": {"m~n": [10, {"k": "v"}, [1, 2]]},
  "é": {"inner": true},
  "r": 0
}"""


def at(line: int, col: int) -> str:
    return TEXT.splitlines()[line - 1][col - 1:]


@pytest.mark.parametrize("pointer, starts", [
    ("/r", '"r": 0'),
    ("/x~1y", '"x/y"'),
    ("/x~1y/m~0n", '"m~n"'),
    ("/x~1y/m~0n/1", '{"k"'),
    ("/x~1y/m~0n/1/k", '"k"'),
    ("/x~1y/m~0n/2/1", "2]"),
    ("/é/inner", '"inner"'),
    ("", "{"),
    ("/x~1y/m~0n/7", '"m~n"'),  # no such item: the deepest member found
    ("/nope", "{"),
])
def test_member_position(pointer: str, starts: str) -> None:
    json.loads(TEXT)  # the fixture is valid JSON
    found = member_position(TEXT, pointer)
    assert found is not None and at(*found).startswith(starts), (found, at(*found) if found else None)


def test_syntax_error_position_is_the_parsers() -> None:
    bad = '{\n  "a": 1,\n  "b": [1, 2,]\n}'
    with pytest.raises(json.JSONDecodeError) as exc:
        json.loads(bad)
    assert syntax_error_position(bad) == (exc.value.lineno, exc.value.colno) == (3, 14)
    assert position(bad, "/a") == (3, 14) and position(TEXT, None) is None
