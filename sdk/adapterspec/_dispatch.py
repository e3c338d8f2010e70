"""Calling the plugins' hooks: what a misbehaving plugin does becomes a :class:`BackendError` naming it.

A hook raises :class:`AdapterSpecError` subclasses only (they pass through unchanged) and returns what its
hook specification says. Any other exception escaping a plugin's hook, and a result of another type, would
reach the user raw or fail later inside the core (a ``str`` taken for a list of names, a config that is not
one): both are refused here, naming the plugin (its entry point and distribution), the hook and what it did,
the original exception chained (``from``). Running out of memory is not a plugin's fault and passes through.

>>> check_result("adapterspec_adapter_names", ["default"], model=None)
>>> RETURNS["adapterspec_set_active"][0]
'True'
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

from .config import AdapterConfig
from .errors import AdapterSpecError, BackendError, shorten
from .plugins import DISABLE_ENV, describe_plugin, get_plugin_manager

__all__ = ["RETURNS", "call_hook", "check_result", "claimant", "unanswered"]


def _names(result: Any) -> bool:
    return isinstance(result, list) and all(isinstance(item, str) for item in result)


def _state(result: Any) -> bool:
    return (isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], AdapterConfig)
            and isinstance(result[1], Mapping) and all(isinstance(key, str) for key in result[1]))


def _identity(result: Any) -> bool:
    return isinstance(result, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in result.items())


#: hook -> (what it returns, as its specification says; whether a result other than ``None`` is that).
#: ``adapterspec_read_buffer`` returns ``Any`` and is not checked.
RETURNS: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "adapterspec_backend_name": ("the backend's name (a str)", lambda r: isinstance(r, str)),
    "adapterspec_inject": ("a list of module paths (str)", _names),
    "adapterspec_load_state": ("a list of tensor keys (str)", _names),
    "adapterspec_extract_state": ("a tuple (AdapterConfig, dict of tensor key -> tensor)", _state),
    "adapterspec_adapter_names": ("a list of adapter names (str)", _names),
    "adapterspec_active_adapters": ("a list of adapter names (str)", _names),
    "adapterspec_set_active": ("True", lambda r: r is True),
    "adapterspec_delete": ("True", lambda r: r is True),
    "adapterspec_merge": ("True", lambda r: r is True),
    "adapterspec_unmerge": ("True", lambda r: r is True),
    "adapterspec_base_identity": ("a dict of str -> str", _identity),
    "adapterspec_reads_slices": ("a bool", lambda r: isinstance(r, bool)),
    "adapterspec_write": ("the folder written (a path)", lambda r: isinstance(r, (str, os.PathLike))),
}


def call_hook(hook: str, *, checked: bool = True, **kwargs: Any) -> Any:
    """The first result of ``hook`` over the plugins (``None``: none answered), its type checked (:data:`RETURNS`).

    :param checked: check the result's type (``False``: the caller does, with :func:`check_result`).

    :raises BackendError: a plugin's hook raised an exception that is no :class:`AdapterSpecError` (chained), or
        returned a result of the wrong type.
    """
    caller = getattr(get_plugin_manager().hook, hook)
    try:
        result = caller(**kwargs)
    except AdapterSpecError:
        raise
    except Exception as exc:
        if _exhausted(exc):
            raise
        name = _raiser(caller, exc) or claimant(kwargs.get("model"))
        raise BackendError(f"{_who(name)}: {hook} raised {type(exc).__name__}: {exc}", hint=_report(name)) from exc
    if checked and result is not None:
        check_result(hook, result, model=kwargs.get("model"))
    return result


def check_result(hook: str, result: Any, *, model: Any) -> None:
    """Refuse a result of ``hook`` (not ``None``) that is not of the type its specification gives.

    :raises BackendError: naming the plugin that claims ``model``, the hook, the result and what it should be.
    """
    what, fits = RETURNS.get(hook, ("", lambda r: True))
    if not fits(result):
        name = claimant(model)
        raise BackendError(f"{_who(name)}: {hook} returned {shorten(result)} (a {type(result).__name__}); the hook "
                           f"returns {what}", hint=_report(name))


def unanswered(hook: str, model: Any, backend: str) -> BackendError:
    """The refusal of a required ``hook`` that returned ``None`` for ``model``, which the ``backend`` claims:
    its plugin lacks the hook (an older plugin), or has it and returned ``None`` (a bug in the plugin)."""
    name = claimant(model)
    caller = getattr(get_plugin_manager().hook, hook)
    if name is not None and any(impl.plugin_name == name for impl in caller.get_hookimpls()):
        return BackendError(f"{_who(name)}: {hook} returned None for a model its backend {backend!r} claims; "
                            f"the hook returns {RETURNS[hook][0]}", hint=_report(name))
    return BackendError(f"the {backend!r} backend ({_who(name)}) does not implement {hook}",
                        hint="upgrade the backend plugin")


def claimant(model: Any) -> str | None:
    """The name of the plugin whose ``adapterspec_backend_name`` claims ``model`` (asked in pluggy's order), if any."""
    if model is None:
        return None
    for impl in reversed(get_plugin_manager().hook.adapterspec_backend_name.get_hookimpls()):
        if impl.hookwrapper or impl.wrapper:
            continue
        try:
            if impl.function(model) is not None:
                return impl.plugin_name
        except Exception:  # noqa: BLE001 - a claim that raises is this plugin's
            return impl.plugin_name
    return None


def _raiser(caller: Any, exc: BaseException) -> str | None:
    """The plugin whose hook implementation ``exc`` escaped: the outermost frame of its traceback that runs one."""
    plugins: dict[Any, str] = {getattr(impl.function, "__code__", None): impl.plugin_name
                               for impl in caller.get_hookimpls()}
    frame = exc.__traceback__
    while frame is not None:
        name = plugins.get(frame.tb_frame.f_code)
        if name is not None:
            return name
        frame = frame.tb_next
    return None


def _exhausted(exc: BaseException) -> bool:
    """Whether ``exc`` is the machine running out of memory (Python's, torch's, TensorFlow's): no plugin's fault."""
    return isinstance(exc, MemoryError) or type(exc).__name__ in {"OutOfMemoryError", "ResourceExhaustedError"}


def _who(name: str | None) -> str:
    return describe_plugin(name) if name is not None else "a plugin"


def _report(name: str | None) -> str:
    """The fix for a plugin's misbehaviour: report it, or leave an installed plugin out."""
    if name is None:
        return "report it to the plugin's authors"
    pm = get_plugin_manager()
    entry = any(plugin is pm.get_plugin(name) for plugin, _ in pm.list_plugin_distinfo())
    return "report it to the plugin's authors" + (f", or set {DISABLE_ENV}={name} to leave the plugin out"
                                                  if entry else "")
