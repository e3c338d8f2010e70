"""``import adapterspec`` must not import a deep-learning framework."""

import subprocess
import sys


def test_import_pulls_in_no_framework() -> None:
    code = ("import sys, adapterspec, adapterspec.cli; "
            "print(sorted(m for m in ('torch', 'tensorflow', 'keras', 'jax') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_public_surface_is_explicit() -> None:
    import adapterspec

    missing = [name for name in adapterspec.__all__ if not hasattr(adapterspec, name)]
    assert missing == []
    assert issubclass(adapterspec.ConfigError, ValueError)
    assert issubclass(adapterspec.DTypeMismatchError, TypeError)
    assert issubclass(adapterspec.BackendError, TypeError)
