"""A misbehaving Hub (the test server's fault modes): every fault ends in a typed error, in bounded time,
with nothing bad left in the cache -- and a retry against a healthy Hub works.

Calls that could hang run on a daemon thread joined with a bound, so a regression fails the test
instead of blocking the suite; the network timeout is set through ``ADAPTERSPEC_HUB_TIMEOUT``.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hubdata import lora_tensors

import adapterspec
from adapterspec import HubError, IntegrityError
from adapterspec.hub import download_adapter, download_adapters

pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=:DeprecationWarning")

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
TIMEOUT_ENV = "ADAPTERSPEC_HUB_TIMEOUT"  # documented in README.md (Safety)
BOUND_S = 20.0  # no call in this file may take longer (a fixed download takes about 1-3 s here)


def _git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _flip_last(data: bytes) -> bytes:
    return data[:-1] + bytes([data[-1] ^ 0x01])


def _bounded(call: Callable[[], Any], seconds: float = BOUND_S) -> tuple[float, Any, BaseException | None]:
    """Run ``call`` on a daemon thread; (seconds taken, value, exception). Fails the test if it outlives ``seconds``."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = call()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            box["error"] = exc

    start = time.monotonic()
    thread = threading.Thread(target=run, daemon=True, name="hub-fault-call")
    thread.start()
    thread.join(seconds)
    took = time.monotonic() - start
    assert not thread.is_alive(), f"still running after {seconds} s"
    return took, box.get("value"), box.get("error")


def _cache_is_sound(cache: Path) -> None:
    """Every blob hashes to its name (sha256 or git blob id), no unfinished download, no link to a missing blob."""
    assert not list(cache.rglob("*.incomplete"))
    for blob in cache.glob("models--*/blobs/*"):
        data = blob.read_bytes()
        assert blob.name in (hashlib.sha256(data).hexdigest(), _git_blob_id(data)), blob
    for link in cache.glob("models--*/snapshots/**/*"):
        assert link.exists(), f"dangling {link}"


@pytest.fixture
def repo(hub, make_lora) -> Path:
    """``org/lora`` on the test Hub: one adapter (config + LFS weights); returns the local original."""
    local = make_lora("lora")
    hub.commit("org/lora", {n: (local / n).read_bytes() for n in (CONFIG, WEIGHTS)})
    return local


def _assert_good(folder: Path, local: Path) -> None:
    assert (folder / WEIGHTS).read_bytes() == (local / WEIGHTS).read_bytes()
    got = adapterspec.read_adapter(folder, verify=True).load_tensors("numpy")
    for key, want in lora_tensors().items():
        np.testing.assert_array_equal(got[key], want, err_msg=key)


# -- integrity ---------------------------------------------------------------------------------------------
def test_corrupt_weights_are_refused_and_not_cached(hub, repo: Path, hf_env: Path, monkeypatch) -> None:
    """Right size, one bit off: refused online, not kept (so not loadable offline), and a retry gets the real file."""
    good = (repo / WEIGHTS).read_bytes()
    hub.body_faults[WEIGHTS] = _flip_last

    with pytest.raises(IntegrityError) as info:
        download_adapter("org/lora")
    text = str(info.value)
    assert f"hf://org/lora/{WEIGHTS}: {WEIGHTS} is not the file the Hub announced" in text
    assert hashlib.sha256(good).hexdigest() in text and hashlib.sha256(_flip_last(good)).hexdigest() in text
    assert "removed from the cache" in text and "fix: retry the download" in text
    _cache_is_sound(hf_env)
    assert not list(hf_env.glob(f"models--org--lora/snapshots/*/{WEIGHTS}"))

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubError, match="not in the local Hugging Face cache"):
        download_adapter("org/lora")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    hub.body_faults.clear()
    _assert_good(download_adapter("org/lora"), repo)


def test_corrupt_header_does_not_poison_the_cache(hub, repo: Path, hf_env: Path) -> None:
    hub.body_faults[WEIGHTS] = lambda data: b"\xff" * 8 + data[8:]

    with pytest.raises(IntegrityError, match=f"{WEIGHTS} is not the file the Hub announced"):
        download_adapter("org/lora")
    _cache_is_sound(hf_env)
    hub.body_faults.clear()
    _assert_good(download_adapter("org/lora"), repo)


def test_regular_files_are_checked_by_their_git_blob_id(hub, repo: Path, hf_env: Path) -> None:
    config = (repo / CONFIG).read_bytes()
    tampered = config.replace(b'"r": 2', b'"r": 3')
    assert tampered != config and len(tampered) == len(config)
    hub.body_faults[CONFIG] = lambda data: tampered

    with pytest.raises(IntegrityError) as info:
        download_adapter("org/lora")
    assert f"its git blob id is {_git_blob_id(tampered)}, the Hub's (ETag) is {_git_blob_id(config)}" in str(info.value)
    _cache_is_sound(hf_env)
    hub.body_faults.clear()
    _assert_good(download_adapter("org/lora"), repo)


@pytest.mark.parametrize("offline", [True, False])
def test_a_cache_corrupted_on_disk_is_caught_then_healed(hub, repo: Path, hf_env: Path, monkeypatch,
                                                         offline: bool) -> None:
    """Bytes changed in the cache after a good download: refused (offline and online), removed, a retry re-downloads."""
    folder = download_adapter("org/lora")
    blob = (folder / WEIGHTS).resolve()
    blob.write_bytes(_flip_last(blob.read_bytes()))
    if offline:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    with pytest.raises(IntegrityError, match="removed from the cache") as info:
        download_adapter("org/lora")
    assert ("online (unset HF_HUB_OFFLINE)" in str(info.value)) is offline
    assert not blob.exists() and not (folder / WEIGHTS).is_symlink()
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    _assert_good(download_adapter("org/lora"), repo)


def test_download_adapters_checks_the_cache_offline(hub, repo: Path, hf_env: Path, monkeypatch) -> None:
    folder = download_adapters("org/lora")
    blob = (folder / CONFIG).resolve()
    blob.write_bytes(blob.read_bytes().replace(b'"r": 2', b'"r": 3'))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(IntegrityError, match=f"hf://org/lora/{CONFIG}: {CONFIG} is not the file"):
        download_adapters("org/lora")


def test_without_symlinks_the_file_is_checked_against_a_fresh_etag(hub, repo: Path, hf_env: Path,
                                                                   monkeypatch) -> None:
    """A cache without symlinks keeps no ETag: online, the file is checked against the Hub's ETag asked again."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_DISABLE_SYMLINKS", True)
    hub.body_faults[WEIGHTS] = _flip_last
    with pytest.raises(IntegrityError, match=f"{WEIGHTS} is not the file the Hub announced"):
        download_adapter("org/lora")
    assert not list(hf_env.glob(f"models--org--lora/snapshots/*/{WEIGHTS}"))
    hub.body_faults.clear()
    folder = download_adapter("org/lora")
    assert not (folder / WEIGHTS).is_symlink()
    _assert_good(folder, repo)


# -- transfers that break ------------------------------------------------------------------------------------
def test_a_body_shorter_than_announced_is_a_hub_error(hub, repo: Path, hf_env: Path) -> None:
    size = len((repo / WEIGHTS).read_bytes())
    hub.body_faults[WEIGHTS] = lambda data: data[:-100]

    with pytest.raises(HubError, match=rf"the transfer of {WEIGHTS} ended early: .*size {size} but has size "
                                       rf"{size - 100}.*fix: retry \(the partial file was not kept\)"):
        download_adapter("org/lora")
    _cache_is_sound(hf_env)
    assert not list(hf_env.glob("models--org--lora/blobs/*")) or all(
        b.stat().st_size != size - 100 for b in hf_env.glob("models--org--lora/blobs/*"))
    hub.body_faults.clear()
    _assert_good(download_adapter("org/lora"), repo)


def test_a_redirect_loop_is_a_hub_error(hub, repo: Path) -> None:
    hub.redirect_loop.add(WEIGHTS)
    with pytest.raises(HubError, match=rf"hf://org/lora: the Hub redirected in a loop: .*{WEIGHTS}.*fix: retry later"):
        download_adapter("org/lora")


# -- time ------------------------------------------------------------------------------------------------------
def test_an_api_that_never_answers_times_out(hub, repo: Path, hf_env: Path, monkeypatch) -> None:
    monkeypatch.setenv(TIMEOUT_ENV, "1")
    hub.hang.add("api")

    took, _, error = _bounded(lambda: download_adapter("org/lora"))
    assert isinstance(error, HubError), error
    assert "not in the local Hugging Face cache" in str(error) and "did not answer within 1 s" in str(error)
    assert took < 5, took

    hub.hang.clear()
    folder = download_adapter("org/lora")
    hub.hang.add("api")  # like an unreachable Hub: the cached adapter is used
    took, value, error = _bounded(lambda: download_adapters("org/lora"))
    assert error is None and value == folder and took < 5, (took, error)


def test_a_head_that_never_answers_times_out(hub, repo: Path, hf_env: Path, monkeypatch) -> None:
    monkeypatch.setenv(TIMEOUT_ENV, "1")
    hub.hang.add("head")

    took, _, error = _bounded(lambda: download_adapter("org/lora"))
    assert isinstance(error, HubError), error
    assert "hf://org/lora: no progress for" in str(error) and f"while downloading {CONFIG}" in str(error), error
    assert took < 6, took
    _cache_is_sound(hf_env)


def test_a_trickling_body_is_a_stall(hub, repo: Path, hf_env: Path, monkeypatch) -> None:
    """One byte every 0.2 s is "progress" to a read timeout, never to the watchdog (64 KiB is)."""
    monkeypatch.setenv(TIMEOUT_ENV, "1")
    hub.trickle[WEIGHTS] = 0.2

    took, _, error = _bounded(lambda: download_adapter("org/lora"))
    assert isinstance(error, HubError), error
    assert f"s (timeout 1 s) while downloading {WEIGHTS}; an unfinished file is not kept" in str(error), error
    assert "fix: retry; on a slow connection raise timeout= (or ADAPTERSPEC_HUB_TIMEOUT" in str(error)
    assert took < 4, took
    _cache_is_sound(hf_env)
    assert not list(hf_env.glob(f"models--org--lora/snapshots/*/{WEIGHTS}"))


def test_the_timeout_variable_is_the_documented_one() -> None:
    from adapterspec import hub

    assert hub.TIMEOUT_ENV == TIMEOUT_ENV and hub.DEFAULT_TIMEOUT == 20.0
    assert f"`{TIMEOUT_ENV}`" in (Path(__file__).parents[2] / "README.md").read_text("utf-8")


def test_timeout_argument_overrides_the_environment(hub, repo: Path, monkeypatch) -> None:
    monkeypatch.setenv(TIMEOUT_ENV, "300")
    hub.hang.add("api")
    took, _, error = _bounded(lambda: download_adapter("org/lora", timeout=0.5))
    assert isinstance(error, HubError) and "within 0.5 s" in str(error), error
    assert took < 4, took


@pytest.mark.parametrize(("env", "kwargs", "text"), [
    (None, {"timeout": 0}, "timeout=0 is not a positive number of seconds"),
    (None, {"timeout": -1.0}, "timeout=-1.0 is not"),
    (None, {"timeout": float("nan")}, "timeout=nan is not"),
    (None, {"timeout": True}, "timeout=True is not"),
    ("soon", {}, f"{TIMEOUT_ENV}='soon' is not a positive number of seconds"),
    ("inf", {}, f"{TIMEOUT_ENV}='inf' is not"),
])
def test_bad_timeouts_are_refused(hub, repo: Path, monkeypatch, env: str | None, kwargs: dict, text: str) -> None:
    if env is not None:
        monkeypatch.setenv(TIMEOUT_ENV, env)
    with pytest.raises(HubError, match="fix: pass timeout= in seconds") as info:
        download_adapter("org/lora", **kwargs)
    assert text in str(info.value)
    assert not hub.requests  # refused before any request


def test_downloads_still_show_progress_bars(hub, repo: Path, monkeypatch, capfd) -> None:
    monkeypatch.setenv("TQDM_POSITION", "-1")  # huggingface_hub's switch: bars on even without a terminal
    size = len((repo / WEIGHTS).read_bytes())
    download_adapter("org/lora")
    err = capfd.readouterr().err
    assert "Fetching 2 files: 100%" in err and "2/2" in err, err[-2000:]  # the files
    assert WEIGHTS in err and f"{size}/{size}" in err, err[-2000:]  # the bytes of each (on a terminal)


# -- the hardening suite's count ------------------------------------------------------------------------------
def _generated_faults(weights: bytes, config: bytes) -> dict[str, tuple[str, Callable[[Any], None]]]:
    """label -> (expected refusal, how to break the server): every body corruption, truncation and stall mode."""
    def body(path: str, fault: Callable[[bytes], bytes]) -> Callable[[Any], None]:
        return lambda hub: hub.body_faults.__setitem__(path, fault)

    def flip(at: int) -> Callable[[bytes], bytes]:
        return lambda data: data[:at] + bytes([data[at] ^ 0x80]) + data[at + 1:]

    faults: dict[str, tuple[str, Callable[[Any], None]]] = {}
    for at in range(0, len(weights), max(1, len(weights) // 12)):
        faults[f"weights byte {at} flipped"] = ("IntegrityError", body(WEIGHTS, flip(at)))
    for at in (0, len(config) // 2, len(config) - 1):
        faults[f"config byte {at} flipped"] = ("IntegrityError", body(CONFIG, flip(at)))
    for keep in (0, 1, 8, len(weights) // 2, len(weights) - 1):
        faults[f"weights cut to {keep} B"] = ("HubError", body(WEIGHTS, lambda data, keep=keep: data[:keep]))
    faults["weights 100 B too long"] = ("HubError", body(WEIGHTS, lambda data: data + bytes(100)))
    faults["config cut in half"] = ("HubError", body(CONFIG, lambda data: data[: len(data) // 2]))
    faults["weights redirect loop"] = ("HubError", lambda hub: hub.redirect_loop.add(WEIGHTS))
    faults["config redirect loop"] = ("HubError", lambda hub: hub.redirect_loop.add(CONFIG))
    faults["api hangs"] = ("HubError", lambda hub: hub.hang.add("api"))
    faults["HEAD hangs"] = ("HubError", lambda hub: hub.hang.add("head"))
    faults["weights trickle"] = ("HubError", lambda hub: hub.trickle.__setitem__(WEIGHTS, 0.2))
    return faults


def test_hub_faults_group_of_the_hardening_summary(hub, repo: Path, tmp_path: Path, monkeypatch) -> None:
    """Every fault mode ends in its typed error within the harness deadline, leaving a sound cache each time.

    Counted in the ``adapterspec hardening`` summary line as the group ``hub faults``.
    """
    from hardening_harness import STATS, expect_clean, probe

    monkeypatch.setenv(TIMEOUT_ENV, "0.5")
    faults = _generated_faults((repo / WEIGHTS).read_bytes(), (repo / CONFIG).read_bytes())
    outcomes = []
    for i, (label, (expected, breaking)) in enumerate(faults.items()):
        cache = tmp_path / f"cache-{i}"
        breaking(hub)
        outcome = probe(f"hub fault: {label}", lambda cache=cache: download_adapter("org/lora", cache_dir=cache),
                        seconds=BOUND_S)
        hub.body_faults.clear(), hub.redirect_loop.clear(), hub.hang.clear(), hub.trickle.clear()
        outcomes.append(outcome)
        assert outcome.kind != "typed" or type(outcome.error).__name__ == expected, (label, outcome.error)
        if cache.exists():
            _cache_is_sound(cache)
    STATS.count("hub faults", len(faults))
    expect_clean(outcomes, allow_ok=False)


def test_a_hub_gone_mid_download_gives_up_within_the_timeout(hub, repo: Path, hf_env: Path, monkeypatch) -> None:
    """The server stops after answering model_info: huggingface_hub's retries (with a new HTTP client after the
    connection error) stop at the timeout too, instead of its own 1+2+4+8+8 s backoff."""
    from huggingface_hub import HfApi

    model_info = HfApi.model_info

    def then_stop(self: HfApi, *args: Any, **kwargs: Any) -> Any:
        info = model_info(self, *args, **kwargs)
        hub.stop()
        return info

    monkeypatch.setattr(HfApi, "model_info", then_stop)
    monkeypatch.setenv(TIMEOUT_ENV, "1")
    took, _, error = _bounded(lambda: download_adapter("org/lora"), seconds=40)
    assert isinstance(error, HubError), error
    assert took < 5, (took, error)
    _cache_is_sound(hf_env)
