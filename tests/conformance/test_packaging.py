"""The corpus ships inside the package: a wheel installed in a clean venv (no torch, no checkout) runs the suite."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from adapterspec.conformance import load_corpus
from adapterspec.conformance.cases import RoundtripCase

pytest.importorskip("setuptools")
pytest.importorskip("pip")
pytest.importorskip("ml_dtypes")

REPO = Path(__file__).resolve().parents[2]
#: The core's pure dependencies (and theirs): what a `pip install adapterspec` brings, without torch or keras.
DEPENDENCIES = ("numpy", "numpy.libs", "safetensors", "pluggy", "jsonschema", "jsonschema_specifications",
                "referencing", "rpds", "attr", "attrs", "typing_extensions")
TIMEOUT = 120


def _source(tmp: Path) -> Path:
    """What the sdist is built from: the project's files, without build leftovers."""
    src = tmp / "src"
    junk = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build", "dist", ".venv", ".pytest_cache")
    for name in ("sdk", "plugins", "conformance_tests", "spec"):
        shutil.copytree(REPO / name, src / name, ignore=junk)
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(REPO / name, src / name)
    return src


def _dependencies(tmp: Path) -> Path:
    """A folder holding only the pure dependencies (links into this environment), for PYTHONPATH."""
    deps = tmp / "deps"
    deps.mkdir()
    for name in DEPENDENCIES:
        base = Path(importlib.util.find_spec("numpy").origin).parents[1] if name == "numpy.libs" else None  # type: ignore[arg-type]
        if base is not None:
            if (base / name).exists():
                (deps / name).symlink_to(base / name)
            continue
        spec = importlib.util.find_spec(name)
        if spec is None or spec.origin is None:
            continue
        origin = Path(spec.origin)
        target = origin.parent if origin.name == "__init__.py" else origin
        (deps / target.name).symlink_to(target)
    return deps


def _run(argv: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT, check=False)


def test_the_installed_wheel_finds_and_passes_its_corpus(tmp_path: Path) -> None:
    src = _source(tmp_path)
    corpus_files = set(json.loads((src / "conformance_tests" / "v1" / "corpus.json").read_text())["files"]) | {"corpus.json"}
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path), "PIP_NO_INDEX": "1",
           "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    build = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                  str(tmp_path / "dist"), str(src)], tmp_path, env)
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("adapterspec-*.whl")
    shipped = {n.removeprefix("adapterspec/conformance/v1/") for n in zipfile.ZipFile(wheel).namelist()
               if n.startswith("adapterspec/conformance/v1/")}
    assert shipped == corpus_files
    sdist = _run([sys.executable, "-c", "import sys; from setuptools import build_meta; "
                  "print(build_meta.build_sdist(sys.argv[1]))", str(tmp_path / "sdist")], src, env)
    assert sdist.returncode == 0, sdist.stderr[-3000:]
    with tarfile.open(tmp_path / "sdist" / sdist.stdout.split()[-1]) as tar:
        in_sdist = {n.split("/conformance_tests/v1/", 1)[1] for n in tar.getnames() if "/conformance_tests/v1/" in n}
    assert corpus_files <= in_sdist

    venv = tmp_path / "venv"
    assert _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp_path, env).returncode == 0
    install = _run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "--no-deps",
                    "-q", str(wheel)], tmp_path, env)
    assert install.returncode == 0, install.stderr[-3000:]
    env["PYTHONPATH"] = str(_dependencies(tmp_path))
    work = tmp_path / "elsewhere"  # not a checkout: only the installed copy of the corpus can be found
    work.mkdir()
    probe = _run([str(venv / "bin" / "python"), "-c", "import importlib.util, adapterspec.conformance as c; "
                  "print(importlib.util.find_spec('torch') is None, importlib.util.find_spec('keras') is None); "
                  "print(c.default_corpus_dir())"], work, env)
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.splitlines() == ["True True", str(venv / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}"
                                                          / "site-packages" / "adapterspec" / "conformance" / "v1")]
    adapterspec = str(venv / "bin" / "adapterspec")
    listed = _run([adapterspec, "conformance", "list"], work, env)
    assert listed.returncode == 0, listed.stderr
    here = load_corpus()  # the checkout's corpus, which the wheel must carry whole
    total, core = len(here.cases), len(here.in_profile("core"))
    assert f"{total} cases; profiles: core ({core}), full ({total})" in listed.stdout
    assert "numeric/lora-linear-f32  [core,full]  " in listed.stdout
    check = _run([adapterspec, "conformance", "check"], work, env)
    assert check.returncode == 0 and check.stdout.rstrip().endswith(f"ok ({total} cases)"), check.stdout + check.stderr
    # BF16 tensors read as NumPy arrays need ml_dtypes, which is not a dependency: without it the reference
    # cannot round-trip a BF16 adapter (a typed UnsupportedError), so it cannot claim core.
    ran = _run([adapterspec, "conformance", "--impl", "reference", "--profile", "core", "-q"], work, env)
    assert ran.returncode == 1, ran.stdout[-3000:] + ran.stderr[-3000:]
    # (the BF16 round trips: LoRA, DoRA, LoHa, LoKr and, since corpus 1.14's SPEC 17 cases, RoAd and GraLoRA)
    bf16 = sum(isinstance(c, RoundtripCase) and c.dtype == "bfloat16" for c in here.cases)
    assert bf16 >= 6
    assert f"reference: {total - bf16} passed, 0 failed, {bf16} unsupported, 0 xfailed, 0 xpassed ({total} cases)" \
        in ran.stdout
    assert "profile 'core' claimed, but 1 of its cases are unsupported: roundtrip/roundtrip-lora-linear-bf16" in ran.stdout
    (Path(env["PYTHONPATH"]) / "ml_dtypes").symlink_to(Path(importlib.util.find_spec("ml_dtypes").origin).parent)  # type: ignore[arg-type]
    ran = _run([adapterspec, "conformance", "--impl", "reference", "--profile", "core", "-q"], work, env)
    assert ran.returncode == 0, ran.stdout[-3000:] + ran.stderr[-3000:]
    assert f"reference: {total} passed, 0 failed, 0 unsupported, 0 xfailed, 0 xpassed ({total} cases)" in ran.stdout
    assert f"({core} of {core} cases run) -- claimed: HOLDS" in ran.stdout
