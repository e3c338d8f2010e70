"""What ``download_adapter`` does against a misbehaving Hub: how long each fault takes and how it ends.

Runs the test Hub server (``tests/hub/hubserver.py``) on 127.0.0.1 -- nothing touches the internet --
with one fault at a time, and prints one row per fault: seconds, the exception (or ``returned``), and
for the corrupting faults whether the bad bytes stayed in the cache (a second download, from the healed
server, returns them: ``poisoned``). Each call runs on a daemon thread and is abandoned after ``--cap``
seconds (``still blocked``)::

    PYTHONPATH=sdk:plugins .venv/bin/python benchmarks/hub_faults.py [--cap 45] [--only trickle,api-hangs]

``ADAPTERSPEC_HUB_TIMEOUT`` (seconds without progress before a download gives up) is read as usual.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "hub"))

from hubdata import TOKEN, lora_config, lora_tensors  # noqa: E402
from hubserver import HubServer  # noqa: E402

WEIGHTS = "adapter_model.safetensors"


def _flip_last(data: bytes) -> bytes:
    return data[:-1] + bytes([data[-1] ^ 0x01])


def _bad_header(data: bytes) -> bytes:
    return b"\xff" * 8 + data[8:]


FAULTS: dict[str, Callable[[HubServer], None]] = {
    "corrupt weights": lambda hub: hub.body_faults.__setitem__(WEIGHTS, _flip_last),
    "corrupt header": lambda hub: hub.body_faults.__setitem__(WEIGHTS, _bad_header),
    "body 100 B short": lambda hub: hub.body_faults.__setitem__(WEIGHTS, lambda d: d[:-100]),
    "redirect loop": lambda hub: hub.redirect_loop.add(WEIGHTS),
    "api hangs": lambda hub: hub.hang.add("api"),
    "HEAD hangs": lambda hub: hub.hang.add("head"),
    "trickle 1 B/3 s": lambda hub: hub.trickle.__setitem__(WEIGHTS, 3.0),
}


def _call(fn: Callable[[], Any], cap: float) -> tuple[float, str, Any]:
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - reported, that is the point
            out["error"] = exc

    start = time.perf_counter()
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(cap)
    took = time.perf_counter() - start
    if thread.is_alive():
        return took, f"still blocked after {cap:.0f} s", None
    if "error" in out:
        exc = out["error"]
        return took, f"{type(exc).__module__}.{type(exc).__name__}: {str(exc).splitlines()[0][:150]}", None
    return took, "returned", out["value"]


def run_fault(name: str, cap: float, root: Path) -> tuple[str, float, str, str]:
    import os

    from huggingface_hub import constants

    import adapterspec
    from adapterspec.hub import download_adapter

    cache = root / name.replace(" ", "-").replace("/", "-")
    constants.HF_HUB_CACHE = str(cache)
    constants.HF_HUB_DISABLE_XET = True
    constants.HF_HUB_OFFLINE = False
    local = adapterspec.write_adapter(cache.with_suffix(".src"), lora_config(), lora_tensors())
    good = hashlib.sha256((local / WEIGHTS).read_bytes()).hexdigest()
    with HubServer(tokens={TOKEN}) as hub:
        os.environ["HF_ENDPOINT"] = hub.url
        hub.commit("org/lora", {n: (local / n).read_bytes() for n in ("adapter_config.json", WEIGHTS)})
        FAULTS[name](hub)
        took, outcome, folder = _call(lambda: adapterspec.read_adapter(download_adapter("org/lora")).path, cap)
        hub.body_faults.clear(), hub.redirect_loop.clear(), hub.hang.clear(), hub.trickle.clear()
        if outcome.startswith("still blocked"):
            return name, took, outcome, "-"
        _, _, again = _call(lambda: download_adapter("org/lora"), cap)
        cached = hashlib.sha256((again / WEIGHTS).read_bytes()).hexdigest() if again is not None else None
        state = "poisoned" if cached is not None and cached != good else "clean"
    return name, took, outcome, state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cap", type=float, default=45.0, help="abandon a call after this many seconds")
    parser.add_argument("--only", help="comma-separated fault names (default: all)")
    args = parser.parse_args()
    os_env = __import__("os").environ
    os_env["HF_TOKEN"], os_env["HF_HUB_DISABLE_TELEMETRY"] = TOKEN, "1"
    os_env.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # before huggingface_hub is imported
    names = [n for n in FAULTS if not args.only or n in args.only.split(",")]
    print(f"{'fault':<18} {'seconds':>8}  {'cache after':<11} outcome")
    with tempfile.TemporaryDirectory(prefix="hub-faults-") as tmp:
        for name in names:
            name, took, outcome, state = run_fault(name, args.cap, Path(tmp))
            print(f"{name:<18} {took:8.2f}  {state:<11} {outcome}", flush=True)


if __name__ == "__main__":
    main()
