"""Finding the implementation to test from a ``--impl`` string.

* ``reference`` -- adapterspec's core with the float64 NumPy reference math (no framework);
* ``peft`` -- PEFT itself (:mod:`adapterspec.conformance.peft_driver`), to see where PEFT departs from the spec;
* a name offered by an installed plugin's ``adapterspec_conformance_implementations`` hook (``torch``, ``keras``);
* ``module:object`` -- a Python object (or a class, instantiated without arguments) following
  :class:`~adapterspec.conformance.Implementation`;
* ``cmd:COMMAND`` -- a driver process speaking the JSON-lines protocol (``cmd:"node driver.js"``).

>>> resolve_implementation("reference").name
'reference'
"""

from __future__ import annotations

import importlib
import inspect
import shlex
from typing import Any

__all__ = ["available_implementations", "resolve_implementation"]

#: The built-in backends' implementations, used if their plugin does not offer them through the hook (yet).
_BUILTIN = {"torch": "adapterspec_torch.conformance:TorchImplementation",
            "keras": "adapterspec_keras.conformance:KerasImplementation"}


def _from_hook() -> dict[str, Any]:
    from ..plugins import get_plugin_manager

    found: dict[str, Any] = {}
    for result in get_plugin_manager().hook.adapterspec_conformance_implementations():
        for impl in result or []:
            found.setdefault(getattr(impl, "name", type(impl).__name__), impl)
    return found


def _load_object(spec: str) -> Any:
    module_name, _, attr = spec.partition(":")
    obj: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj() if inspect.isclass(obj) else obj


def available_implementations() -> list[str]:
    """The names ``--impl`` accepts without ``module:`` or ``cmd:`` (plugins' names included).

    >>> "reference" in available_implementations() and "peft" in available_implementations()
    True
    """
    try:
        hooked = list(_from_hook())
    except Exception:  # noqa: BLE001 - a broken plugin must not hide the others
        hooked = []
    return sorted({"reference", "peft", *_BUILTIN, *hooked})


def resolve_implementation(spec: str) -> Any:
    """The implementation object for ``spec`` (see the module docstring for the forms).

    :raises ValueError: the name is unknown, or the object cannot be imported.
    """
    if spec.startswith("cmd:"):
        from .protocol import ProcessImplementation

        return ProcessImplementation(shlex.split(spec[4:]))
    if spec == "reference":
        from .reference_impl import ReferenceImplementation

        return ReferenceImplementation()
    if spec == "peft":
        from .peft_driver import PeftImplementation

        return PeftImplementation()
    if ":" in spec:
        try:
            return _load_object(spec)
        except (ImportError, AttributeError) as exc:
            raise ValueError(f"cannot load implementation {spec!r}: {exc}") from exc
    hooked = _from_hook()
    if spec in hooked:
        return hooked[spec]
    if spec in _BUILTIN:
        try:
            return _load_object(_BUILTIN[spec])
        except (ImportError, AttributeError) as exc:
            raise ValueError(f"the {spec} implementation cannot be loaded: {exc}") from exc
    raise ValueError(f"unknown implementation {spec!r}; use one of {', '.join(available_implementations())}, "
                     "module:object or cmd:COMMAND")
