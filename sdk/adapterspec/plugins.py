"""The plugin manager: backends are found through the ``adapterspec`` entry-point group.

Built-in backends (``adapterspec_torch``, ``adapterspec_keras``) are registered by the same entry
points a third-party package uses. ``ADAPTERSPEC_DISABLE_PLUGINS`` (comma-separated plugin names, or
``1``/``all``) stops entry-point plugins from loading -- for tests, and to rule a plugin out.

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
import os

import pluggy

from . import hookspecs

__all__ = ["ENTRY_POINT_GROUP", "get_plugin_manager", "plugin_names"]

ENTRY_POINT_GROUP = "adapterspec"
DISABLE_ENV = "ADAPTERSPEC_DISABLE_PLUGINS"


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
    pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
    return pm


def plugin_names() -> list[str]:
    """Names of the registered plugins (entry-point names for installed ones)."""
    pm = get_plugin_manager()
    return sorted(name for name, plugin in pm.list_name_plugin() if plugin is not None)
