"""Line and column of a place in a JSON text: a syntax error, or the member a JSON pointer names.

Python's :mod:`json` keeps no positions, so the text is scanned again: values are skipped with
``raw_decode``, member names read with ``scanstring``. For CI annotations (``::error line=5,col=3``).

>>> text = '{\\n  "peft_type": "LORA",\\n  "r": 0\\n}'
>>> position(text, "/r")
(3, 3)
>>> position('{"r": 1,}', None)
(1, 9)
"""

from __future__ import annotations

import json
from json.decoder import scanstring  # type: ignore[attr-defined]  # json's own scanner: typeshed omits it

__all__ = ["member_position", "position", "syntax_error_position"]

_WHITESPACE = " \t\n\r"
_DECODER = json.JSONDecoder()


def _skip(text: str, i: int) -> int:
    while i < len(text) and text[i] in _WHITESPACE:
        i += 1
    return i


def _line_col(text: str, offset: int) -> tuple[int, int]:
    line = text.count("\n", 0, offset) + 1
    return line, offset - (text.rfind("\n", 0, offset) + 1) + 1


def _child(text: str, i: int, token: str) -> tuple[int, int] | None:
    """(offset of the member's name or the item, offset of its value) of ``token`` in the container at ``i``."""
    i = _skip(text, i)
    if text.startswith("{", i):
        i = _skip(text, i + 1)
        while text.startswith('"', i):
            name, end = scanstring(text, i + 1)
            start = _skip(text, _skip(text, end) + 1)  # past the ':'
            if name == token:
                return i, start
            _, end = _DECODER.raw_decode(text, start)
            i = _skip(text, end)
            if not text.startswith(",", i):
                return None
            i = _skip(text, i + 1)
        return None
    if text.startswith("[", i) and token.isdigit():
        i, index = _skip(text, i + 1), int(token)
        for _ in range(index):
            _, end = _DECODER.raw_decode(text, i)
            i = _skip(text, end)
            if not text.startswith(",", i):
                return None
            i = _skip(text, i + 1)
        return (i, i)
    return None


def syntax_error_position(text: str) -> tuple[int, int] | None:
    """1-based (line, column) where Python's JSON parser stops on ``text``; ``None`` when it parses."""
    try:
        json.loads(text)
    except json.JSONDecodeError as exc:
        return exc.lineno, exc.colno
    except (ValueError, RecursionError):
        return None
    return None


def member_position(text: str, pointer: str) -> tuple[int, int] | None:
    """1-based (line, column) of the member ``pointer`` names in the JSON ``text`` (its name, for an object
    member; the deepest existing member on the way if it does not exist); ``None`` if ``text`` is not JSON."""
    at, value = 0, _skip(text, 0)
    tokens = pointer.split("/")[1:] if pointer else []
    try:
        for token in tokens:
            found = _child(text, value, token.replace("~1", "/").replace("~0", "~"))
            if found is None:
                break
            at, value = found
        else:
            at = at if tokens else value
    except (ValueError, IndexError, RecursionError):
        return None
    return _line_col(text, at)


def position(text: str, pointer: str | None) -> tuple[int, int] | None:
    """1-based (line, column) of the JSON syntax error in ``text``, else of the member ``pointer`` names
    (:func:`member_position`); ``None`` when ``text`` parses and there is no pointer."""
    found = syntax_error_position(text)
    if found is not None or pointer is None:
        return found
    return member_position(text, pointer)
