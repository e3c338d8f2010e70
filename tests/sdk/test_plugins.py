"""Plugin discovery: an installed plugin that cannot be imported breaks no load another backend claims.

Each test installs small distributions (a ``*.dist-info`` folder with ``entry_points.txt`` next to the
package) into a temporary folder and runs a fresh interpreter with it on ``PYTHONPATH``: the plugin
manager is built once per process, from the entry points installed then. The built-in backends are
disabled there (``ADAPTERSPEC_DISABLE_PLUGINS``), so no framework is imported.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import adapterspec

#: A plugin that claims the objects of its own class ``Model`` and answers every model-level hook.
GOOD_PLUGIN = '''
from adapterspec import hookimpl

class Model:
    pass

@hookimpl
def adapterspec_backend_name(model):
    return "goodplug" if isinstance(model, Model) else None

@hookimpl
def adapterspec_adapter_names(model):
    return [] if isinstance(model, Model) else None
'''

#: What the fresh interpreter runs: every public call the report needs, each error as its class and text.
PROBE = '''
import json, warnings
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import adapterspec
    from adapterspec.plugins import plugin_names, broken_plugins
    names = plugin_names()
out = {"names": names, "broken": sorted(broken_plugins()),
       "warnings": [f"{w.category.__name__}: {w.message}" for w in caught]}
def attempt(what, call):
    try:
        out[what] = call()
    except Exception as exc:
        out[what] = f"{type(exc).__name__}: {exc}"
import goodplug
attempt("claimed", lambda: adapterspec.backend_name(goodplug.Model()))
attempt("claimed_names", lambda: adapterspec.adapter_names(goodplug.Model()))
attempt("unclaimed", lambda: adapterspec.backend_name(object()))
print(json.dumps(out))
'''


def _install(site: Path, dist: str, entry_point: str, module: str, source: str) -> None:
    """A distribution ``dist`` whose entry point ``entry_point`` (group ``adapterspec``) is the module ``module``."""
    info = site / f"{dist.replace('-', '_')}-0.0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.0.1\n", "utf-8")
    (info / "entry_points.txt").write_text(f"[adapterspec]\n{entry_point} = {module}\n", "utf-8")
    (site / f"{module}.py").write_text(source, "utf-8")


def _probe(site: Path, disabled: str = "torch,keras,flax") -> dict[str, object]:
    """Run :data:`PROBE` in a fresh interpreter with the distributions of ``site`` installed."""
    sdk = str(Path(adapterspec.__file__).resolve().parents[1])
    path = os.pathsep.join([str(site), sdk, os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, PYTHONPATH=path, ADAPTERSPEC_DISABLE_PLUGINS=disabled)
    done = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    result: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def _sites(tmp_path: Path) -> Path:
    site = tmp_path / "site"
    _install(site, "adapterspec-good", "goodplug", "goodplug", GOOD_PLUGIN)
    _install(site, "adapterspec-bad", "badplug", "badplug_plugin",
             "import nonexistent_framework_xyz  # a dependency the plugin forgot\n")
    return site


def test_a_plugin_that_fails_to_import_is_skipped_with_a_warning(tmp_path: Path) -> None:
    out = _probe(_sites(tmp_path))
    assert out["names"] == ["goodplug"]
    assert out["broken"] == ["badplug"]
    (warning,) = out["warnings"]
    assert isinstance(warning, str) and warning.startswith("AdapterSpecWarning: ")
    for part in ("'badplug'", "adapterspec-bad", "ModuleNotFoundError", "nonexistent_framework_xyz",
                 "ADAPTERSPEC_DISABLE_PLUGINS=badplug"):
        assert part in warning, (part, warning)
    # the model another backend claims loads as if the broken plugin were not installed
    assert out["claimed"] == "goodplug"
    assert out["claimed_names"] == []


def test_a_model_no_backend_claims_names_the_plugin_that_failed(tmp_path: Path) -> None:
    out = _probe(_sites(tmp_path))
    unclaimed = out["unclaimed"]
    assert isinstance(unclaimed, str) and unclaimed.startswith("BackendError: no adapterspec backend handles "
                                                               "builtins.object objects")
    for part in ("'badplug'", "adapterspec-bad", "ModuleNotFoundError: No module named 'nonexistent_framework_xyz'",
                 "ADAPTERSPEC_DISABLE_PLUGINS=badplug"):
        assert part in unclaimed, (part, unclaimed)


def test_a_disabled_broken_plugin_is_not_imported_nor_reported(tmp_path: Path) -> None:
    out = _probe(_sites(tmp_path), disabled="torch,keras,flax,badplug")
    assert out["names"] == ["goodplug"] and out["broken"] == [] and out["warnings"] == []
    assert isinstance(out["unclaimed"], str) and "badplug" not in out["unclaimed"]
