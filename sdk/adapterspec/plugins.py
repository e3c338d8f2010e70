"""The plugin manager: backends are found through the ``adapterspec`` entry-point group.

Built-in backends (``adapterspec_torch``, ``adapterspec_keras``) are registered by the same entry
points a third-party package uses. ``ADAPTERSPEC_DISABLE_PLUGINS`` (comma-separated plugin names, or
``1``/``all``) stops entry-point plugins from loading -- for tests, and to rule a plugin out.

An installed plugin that fails to import (a dependency it forgot) or to register (a hook pluggy rejects)
is left out with an :class:`~adapterspec.errors.AdapterSpecWarning` naming its entry point: models other
backends claim load as if it were not installed, and a model no backend claims is refused with a
:class:`~adapterspec.errors.BackendError` that names it (:func:`broken_plugins`).

>>> pm = get_plugin_manager()
>>> "torch" in plugin_names()                                 # doctest: +SKIP
True

Registering a plugin by hand (tests do this)::

    pm = get_plugin_manager()
    pm.register(my_plugin_module, name="mine")
    try: ...
    finally: pm.unregister(name="mine")
"""

from __future__ import annotations

import functools
import importlib.metadata
import os
import warnings
from typing import Any

import pluggy

from . import hookspecs
from .errors import AdapterSpecWarning

__all__ = ["DISABLE_ENV", "ENTRY_POINT_GROUP", "broken_plugins", "describe_plugin", "get_plugin_manager", "plugin_names"]

ENTRY_POINT_GROUP = "adapterspec"
DISABLE_ENV = "ADAPTERSPEC_DISABLE_PLUGINS"

#: entry-point name -> what stopped it loading (its distribution and the error), for this process's manager.
_BROKEN: dict[str, str] = {}


@functools.cache
def get_plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager, with the hookspecs and the installed entry-point plugins."""
    pm = pluggy.PluginManager(ENTRY_POINT_GROUP)
    pm.add_hookspecs(hookspecs)
    disabled = {n.strip() for n in os.environ.get(DISABLE_ENV, "").split(",") if n.strip()}
    if disabled & {"1", "all", "true"}:
        return pm
    for name in disabled:
        pm.set_blocked(name)
    _load_entry_points(pm)
    return pm


def _load_entry_points(pm: pluggy.PluginManager) -> None:
    """Register each installed entry point of the group that is not blocked; one that fails to load is left out.

    Each goes through pluggy's own loader on its own, so that one plugin's import error stops neither the
    others nor the caller; what failed is kept for :func:`broken_plugins` and warned of once.
    """
    for dist in importlib.metadata.distributions():
        for entry in dist.entry_points.select(group=ENTRY_POINT_GROUP):
            if pm.has_plugin(entry.name) or pm.is_blocked(entry.name) or entry.name in _BROKEN:
                continue
            try:
                pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP, name=entry.name)
            except Exception as exc:  # noqa: BLE001 - any error of a third-party import is that plugin's
                if pm.get_plugin(entry.name) is not None:  # registered halfway (a hook pluggy rejected)
                    pm.unregister(name=entry.name)
                _BROKEN[entry.name] = (f"entry point {entry.name!r} ({entry.value}, from {_dist_name(dist)}): "
                                       f"{type(exc).__name__}: {exc}")
                warnings.warn(f"the adapterspec plugin {_BROKEN[entry.name]}; it is left out (fix: install what "
                              f"it needs, or set {DISABLE_ENV}={entry.name} to stop loading it)",
                              AdapterSpecWarning, stacklevel=4)


def _dist_name(dist: Any) -> str:
    """``name version`` of an installed distribution (or pluggy's facade of one), as pip lists it."""
    return f"{dist.metadata['Name'] or '?'} {dist.version}"


def plugin_names() -> list[str]:
    """Names of the registered plugins (entry-point names for installed ones)."""
    pm = get_plugin_manager()
    return sorted(name for name, plugin in pm.list_name_plugin() if plugin is not None)


def broken_plugins() -> dict[str, str]:
    """The installed plugins that could not be loaded: entry-point name -> its distribution and the error.

    >>> broken_plugins()                                          # doctest: +SKIP
    {'badplug': "entry point 'badplug' (badplug.plugin, from adapterspec-bad 0.0.1): ModuleNotFoundError: ..."}
    """
    get_plugin_manager()
    return dict(_BROKEN)


def describe_plugin(name: str) -> str:
    """How an error names a registered plugin: its name, and the entry point and distribution it came from.

    >>> describe_plugin("torch")                                  # doctest: +SKIP
    "plugin 'torch' (entry point adapterspec:torch = adapterspec_torch.plugin, from adapterspec 0.1.0)"
    """
    pm = get_plugin_manager()
    plugin = pm.get_plugin(name)
    for loaded, dist in pm.list_plugin_distinfo():
        if loaded is plugin:
            module = getattr(plugin, "__name__", type(plugin).__qualname__)
            return f"plugin {name!r} (entry point {ENTRY_POINT_GROUP}:{name} = {module}, from {_dist_name(dist)})"
    return f"plugin {name!r} (registered by hand, no entry point)"
