"""The built wheel and sdist: every package and data file, the license, clean metadata, no unused dependency.

Builds with the setuptools already installed (no download, no install): about 2 s.
"""

from __future__ import annotations

import email
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

import adapterspec

REPO = Path(adapterspec.__file__).resolve().parents[2]
BUILD = "import sys; from setuptools import build_meta as b; print('BUILT', getattr(b, sys.argv[1])(sys.argv[2]))"


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[zipfile.ZipFile, tarfile.TarFile, str]:
    pytest.importorskip("setuptools")
    src, out = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("dist")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(REPO / name, src / name)
    # spec: the package's schema files are links into it; conformance_tests/v1: the corpus the wheel ships
    for name in ("sdk", "plugins", "spec", "conformance_tests"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    built, logs = [], ""
    for hook in ("build_sdist", "build_wheel"):  # one process each, as `python -m build` does
        proc = subprocess.run([sys.executable, "-c", BUILD, hook, str(out)], cwd=src, capture_output=True, text=True,
                              timeout=300, check=False)
        assert proc.returncode == 0, proc.stderr[-3000:]
        built.append(out / proc.stdout.strip().splitlines()[-1].split()[-1])
        logs += proc.stdout + proc.stderr
    return zipfile.ZipFile(built[1]), tarfile.open(built[0]), logs


def metadata(wheel: zipfile.ZipFile) -> email.message.Message:
    (name,) = [n for n in wheel.namelist() if n.endswith(".dist-info/METADATA")]
    return email.message_from_bytes(wheel.read(name))


def test_build_has_no_warning(built: tuple[zipfile.ZipFile, tarfile.TarFile, str]) -> None:
    assert "Warning" not in built[2], built[2][-3000:]


def test_wheel_holds_every_module_and_data_file(built: tuple[zipfile.ZipFile, tarfile.TarFile, str]) -> None:
    names = set(built[0].namelist())
    for root, package in ((REPO / "sdk", "adapterspec"), (REPO / "plugins", "adapterspec_torch"),
                          (REPO / "plugins", "adapterspec_keras")):
        for path in (root / package).rglob("*"):
            if path.suffix in (".py", ".json", ".typed") and "__pycache__" not in path.parts:
                assert path.relative_to(root).as_posix() in names, path
    for schema in ("adapter_config", "manifest", "validate_report"):
        data = built[0].read(f"adapterspec/_schema/{schema}.v1.schema.json")
        assert data.startswith(b"{"), schema  # the file, not a link


def test_license_is_apache_2(built: tuple[zipfile.ZipFile, tarfile.TarFile, str]) -> None:
    text = (REPO / "LICENSE").read_text()
    assert "Apache License\n                           Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text and len(text) > 11000
    meta = metadata(built[0])
    assert meta["License-Expression"] == "Apache-2.0"
    assert built[0].read(next(n for n in built[0].namelist() if n.endswith("licenses/LICENSE"))).decode() == text
    assert any(m.name.endswith("/LICENSE") for m in built[1].getmembers())


def test_metadata_is_complete(built: tuple[zipfile.ZipFile, tarfile.TarFile, str]) -> None:
    meta = metadata(built[0])
    assert meta["Version"] == adapterspec.__version__
    classifiers = meta.get_all("Classifier") or []
    assert "Typing :: Typed" in classifiers and "Programming Language :: Python :: 3.10" in classifiers
    urls = dict(u.split(", ", 1) for u in meta.get_all("Project-URL") or [])
    assert {"Homepage", "Repository", "Issues"} <= set(urls)


def test_every_dependency_is_imported(built: tuple[zipfile.ZipFile, tarfile.TarFile, str]) -> None:
    required = [r for r in metadata(built[0]).get_all("Requires-Dist") or [] if "extra ==" not in r]
    source = "\n".join(p.read_text() for p in (REPO / "sdk" / "adapterspec").rglob("*.py"))
    for requirement in required:
        module = re.split(r"[<>=!~; \[]", requirement, maxsplit=1)[0].replace("-", "_").lower()
        assert re.search(rf"^\s*(import|from) {module}\b", source, re.M), f"{requirement} is never imported"


def test_keras_extras_without_tensorflow(built: tuple[zipfile.ZipFile, tarfile.TarFile, str]) -> None:
    requires = metadata(built[0]).get_all("Requires-Dist") or []
    for extra, backend in (("keras-jax", "jax"), ("keras-torch", "torch")):
        mine = sorted(r.split(";")[0].split(">")[0] for r in requires if f'extra == "{extra}"' in r)
        assert mine == sorted(["keras", backend]), (extra, mine)
    assert any(r.startswith("keras-hub") and 'extra == "keras"' in r for r in requires)
