"""Fixtures for the Hub tests: a Hub-compatible server on 127.0.0.1 that the real huggingface_hub client talks to.

huggingface_hub reads most settings once, at import; the fixture points the ones that matter at the
test's server and temporary folders (``HF_ENDPOINT`` is read by adapterspec.hub at each call).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from hubdata import TOKEN, lora_config, lora_tensors  # noqa: E402
from hubserver import HubServer  # noqa: E402


@pytest.fixture
def hf_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """huggingface_hub isolated from the user's setup: a fresh cache, no saved token, online, no Xet.

    :returns: the cache folder.
    """
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_OIDC_RESOURCE", "HF_HUB_DISABLE_PROGRESS_BARS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)  # the test server has no Xet storage: LFS instead
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-saved-token"))
    return cache


@pytest.fixture
def hub(hf_env: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[HubServer]:
    """A running Hub server that accepts :data:`TOKEN` (sent through ``HF_TOKEN``); stopped after the test."""
    with HubServer(tokens={TOKEN}) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        yield server


@pytest.fixture
def make_lora(tmp_path: Path):  # type: ignore[no-untyped-def]
    """``make_lora(name, offset=0.0, r=2) -> folder``: write a valid tiny LoRA folder."""
    import adapterspec

    def make(name: str, offset: float = 0.0, r: int = 2) -> Path:
        return adapterspec.write_adapter(tmp_path / "adapters" / name, lora_config(r), lora_tensors(offset, r))

    return make
