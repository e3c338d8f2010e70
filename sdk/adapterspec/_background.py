"""Work on a thread whose result (or exception) the caller collects later.

``hashlib``, file reads and writes release the GIL, so on a second core they overlap with the
caller's work: :func:`adapterspec._safetensors.save_file` hashes while it writes, and
:func:`adapterspec._safetensors.read_buffer_in_background` reads a file while a backend injects layers.

>>> result = in_background(lambda: 6 * 7, name="answer")
>>> result()
42
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

__all__ = ["in_background"]

T = TypeVar("T")


def in_background(fn: Callable[[], T], *, name: str) -> Callable[[], T]:
    """Start ``fn()`` on a daemon thread; the function returned waits for it and returns its result,
    or raises the exception it raised (in the caller's thread, with its own traceback)."""
    values: list[T] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            values.append(fn())
        except BaseException as exc:  # handed to the caller
            errors.append(exc)

    thread = threading.Thread(target=run, name=f"adapterspec-{name}", daemon=True)
    thread.start()

    def result() -> T:
        thread.join()
        if errors:
            raise errors[0]
        return values[0]

    return result
