"""What an implementation under test provides: the :class:`Implementation` protocol.

Implement the methods for the case kinds you support; a missing method makes those cases
UNSUPPORTED. Refuse an adapter by raising -- an :mod:`adapterspec.errors` class, or :class:`Refused`
with the spec's error class name when your code has its own exceptions. Raise :class:`Unsupported`
(or :class:`adapterspec.UnsupportedError`) for a feature you do not have: the case is then reported
UNSUPPORTED, never passed.

>>> class Mine:
...     name = "mine"
...     def supports(self, case):
...         return True if case.kind == "schema" else "only configs so far"
...     def validate_config(self, config):
...         if config.get("r") == 0:
...             raise Refused("ConfigError", pointer="/r", message="r must be >= 1")
>>> isinstance(Mine(), Implementation)
True
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from .cases import Case

__all__ = ["Implementation", "Refusal", "Refused", "Unsupported", "call"]


class Unsupported(Exception):  # noqa: N818 - it is an outcome, not an error
    """Raised by an implementation for a case it cannot run: the case is reported UNSUPPORTED."""


@dataclass(frozen=True)
class Refusal:
    """How an implementation refused an adapter or config.

    :param error: the spec's error class name (``"MissingTensorError"``), or the implementation's own.
    :param ancestors: ``error`` and its base classes' names (for a Python exception, its MRO).
    :param key: the tensor key or module path the error names, if any.
    :param pointer: the JSON pointer into the config the error names, if any.
    :param message: the error message.
    """

    error: str
    ancestors: tuple[str, ...] = ()
    key: str | None = None
    pointer: str | None = None
    message: str = ""

    @classmethod
    def from_exception(cls, exc: BaseException) -> Refusal:
        """The refusal an exception stands for (:class:`Refused` carries one; others give their class and attributes)."""
        if isinstance(exc, Refused):
            return exc.refusal
        names = tuple(c.__name__ for c in type(exc).__mro__)
        key, pointer = getattr(exc, "key", None), getattr(exc, "pointer", None)
        return cls(type(exc).__name__, names, key if isinstance(key, str) else None,
                   pointer if isinstance(pointer, str) else None, str(exc))

    def to_json(self) -> dict[str, Any]:
        return {"error": self.error, "key": self.key, "pointer": self.pointer, "message": self.message}


class Refused(Exception):  # noqa: N818 - it is an outcome, not an error
    """Raise this to refuse with the spec's error class name when your exceptions are not adapterspec's.

    >>> raise Refused("MissingTensorError", key="base_model.model.l.lora_B.weight")
    Traceback (most recent call last):
    adapterspec.conformance.contract.Refused: MissingTensorError: base_model.model.l.lora_B.weight
    """

    def __init__(self, error: str, *, key: str | None = None, pointer: str | None = None, message: str = "") -> None:
        self.refusal = Refusal(error, (error,), key, pointer, message)
        super().__init__(f"{error}: {message or key or pointer or ''}".rstrip(": "))


@runtime_checkable
class Implementation(Protocol):
    """An implementation of the spec under test. Only ``name`` and ``supports`` are required.

    The other methods, each for one kind of case (a missing one makes that kind UNSUPPORTED):

    * ``validate_config(config: Mapping) -> None`` -- raise if the spec's schema refuses ``config``
      (the error names the JSON pointer of the offending field).
    * ``load_folder(case: FolderCase, path: Path) -> None`` -- build ``case.model`` and load the adapter
      folder ``path`` into it with every check (``case.options``: ``verify`` the sha256, ``allow_pickle``;
      ``case.multi``: load every adapter of a multi-adapter folder); raise to refuse it.
    * ``run_numeric(case: NumericCase, case_dir: Path) -> Mapping[str, array]`` -- build ``case.model``
      with the base weights, load ``case.adapter``, and return the outputs ``case.compute`` asks for,
      keyed as in ``case.expected`` (NumPy arrays or framework tensors).
    * ``roundtrip(case: RoundtripCase, src: Path, dst: Path) -> None`` -- load the adapter folder ``src``
      into ``case.source``'s model and save it to the new folder ``dst``.

    Optional lifecycle: ``begin(corpus)`` before the first case, ``close()`` after the last.

    Warnings: the runner records the Python warnings an implementation gives during a case (a folder
    case's ``warnings`` lists the ones it expects); ``take_warnings() -> list[dict]`` adds others (the
    process protocol's), and ``reports_warnings = False`` makes cases that expect warnings UNSUPPORTED.

    ``checks_error_class`` (default ``True``): set ``False`` for an implementation whose errors do not
    follow the spec's classes; refusals are then checked for having happened, not for their class nor
    for the key or pointer they name (the PEFT driver does this).
    """

    name: str

    def supports(self, case: Case) -> bool | str:
        """``True`` to run ``case``; ``False`` or a reason (``"no conv2d yet"``) to report it UNSUPPORTED."""
        ...


def call(impl: Any, method: str, *args: Any) -> Any:
    """Call ``impl.method(*args)``, raising :class:`Unsupported` if the implementation lacks the method.

    >>> call(object(), "run_numeric")
    Traceback (most recent call last):
    adapterspec.conformance.contract.Unsupported: <object object at ...> has no run_numeric()
    """
    fn = getattr(impl, method, None)
    if fn is None:
        raise Unsupported(f"{getattr(impl, 'name', impl)!s} has no {method}()")
    return fn(*args)

