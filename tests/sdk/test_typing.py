"""User code type-checks against adapterspec: ``mypy --strict`` sees the real functions, lazy exports included."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import adapterspec

pytest.importorskip("mypy")

# Each wrong line must be reported; the first two lines are right and must not be.
USER_CODE = """\
from pathlib import Path

import adapterspec

folder: Path = adapterspec.download_adapter("org/name", revision="main")
url: str = adapterspec.push_to_hub(folder, "org/name")
adapterspec.download_adapter(42)
adapterspec.download_adapters("org/name", revision=1)
adapterspec.push_to_hub(folder, repo_id=["org/name"])
count: int = adapterspec.download_adapter("org/name")
"""

# Strict for the user's file; the frameworks adapterspec imports are not analysed (skip: they become Any),
# which keeps this to seconds and leaves adapterspec's own annotations as the only source of types.
CONFIG = """\
[mypy]
strict = True
follow_imports = silent
[mypy-numpy,numpy.*,torch,torch.*,tensorflow,tensorflow.*,keras,keras.*,keras_hub,keras_hub.*,jax,jax.*,\
huggingface_hub,huggingface_hub.*,safetensors,safetensors.*,jsonschema,jsonschema.*,pluggy,pluggy.*,\
transformers,transformers.*,peft,peft.*,ml_dtypes,ml_dtypes.*]
follow_imports = skip
ignore_missing_imports = True
"""


def test_lazy_hub_exports_type_as_their_functions(tmp_path: Path) -> None:
    (tmp_path / "user.py").write_text(USER_CODE)
    (tmp_path / "mypy.ini").write_text(CONFIG)
    env = dict(os.environ)
    env.pop("MYPYPATH", None)
    sdk = Path(adapterspec.__file__).resolve().parents[1]  # the folder holding this adapterspec
    if sdk.name not in ("site-packages", "dist-packages"):  # a source checkout; mypy finds an installed one itself
        env["MYPYPATH"] = str(sdk)
    run = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", "mypy.ini", "--cache-dir", str(tmp_path / "cache"), "user.py"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    errors = {(int(m[1]), m[2]) for m in re.finditer(r"^user\.py:(\d+): error: .*\[([a-z-]+)\]$", run.stdout, re.M)}
    assert errors == {(7, "arg-type"), (8, "arg-type"), (9, "arg-type"), (10, "assignment")}, run.stdout + run.stderr
    assert 'Argument 1 to "download_adapter" has incompatible type "int"; expected "str"' in run.stdout
    assert 'Argument "revision" to "download_adapters" has incompatible type "int"' in run.stdout
    assert 'Argument "repo_id" to "push_to_hub" has incompatible type "list[str]"; expected "str"' in run.stdout
    assert run.returncode == 1
