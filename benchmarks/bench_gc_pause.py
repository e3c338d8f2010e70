"""What pausing Python's garbage collector around a load would buy, and what it costs other threads.

Run it (not a test)::

    .venv/bin/python benchmarks/bench_gc_pause.py --repeats 15

Until 2026-12 ``load_adapter`` and ``delete_adapter`` ran with ``gc.disable()`` (process-wide), to spare the
collections that the thousands of objects of one load set off. This script times, on the synthetic Llama
and LoRA of ``bench_load.py``, a load + delete as adapterspec does it now (collector on) against the same
calls inside ``gc.disable()``, in alternation, and counts the collections each run triggered (its own
timing loop: ``bench_load.measure`` turns the collector off while it times, as ``timeit`` does). Then it runs
4 threads loading in a loop with the pause, as before, and samples from another thread how often the
collector was off: the price an unrelated thread paid.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

from bench_load import build_llama, write_adapters  # noqa: E402

__all__ = ["main", "paused"]


@contextlib.contextmanager
def paused() -> Iterator[None]:
    """The pause ``load_adapter`` used to take: ``gc.disable()`` for the block, process-wide."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def _collections() -> int:
    return sum(s["collections"] for s in gc.get_stats())


def _off_fraction(model: Any, folder: Path, seconds: float) -> float:
    """Share of samples, taken by an unrelated thread, that found the collector off while 4 threads load."""
    import copy

    import adapterspec

    stop = threading.Event()
    models = [model] + [copy.deepcopy(model) for _ in range(3)]

    def loop(i: int) -> None:
        mine = models[i]
        while not stop.is_set():
            with paused():
                adapterspec.load_adapter(mine, folder, f"t{i}")
                adapterspec.delete_adapter(mine, f"t{i}")

    threads = [threading.Thread(target=loop, args=(i,), daemon=True) for i in range(4)]
    for t in threads:
        t.start()
    samples = off = 0
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        samples += 1
        off += not gc.isenabled()
        time.sleep(0.001)
    stop.set()
    for t in threads:
        t.join(timeout=60)
    gc.enable()
    return off / max(samples, 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=15, help="timed load+delete runs per variant")
    parser.add_argument("--seconds", type=float, default=3.0, help="length of the 4-thread sampling run")
    args = parser.parse_args(argv)

    import adapterspec

    model = build_llama()
    setup = write_adapters(model, Path(tempfile.mkdtemp(prefix="adapterspec-gc-")))
    counts: dict[str, list[int]] = {"collector on (now)": [], "gc.disable() (before)": []}
    times: dict[str, list[float]] = {label: [] for label in counts}
    # timed here, not with bench_load.measure: that one turns the collector off while it times, as timeit does
    for i in range(args.repeats + 1):
        for label in counts:
            gc.collect()
            before, start = _collections(), time.perf_counter()
            with paused() if "before" in label else contextlib.nullcontext():
                adapterspec.load_adapter(model, setup.folder)
                adapterspec.delete_adapter(model, "default")
            if i:  # the first round warms up
                times[label].append(time.perf_counter() - start)
                counts[label].append(_collections() - before)
    print(f"load + delete of the bench_load adapter (LoRA r=16 x 112 modules), N={args.repeats}")
    print(f"{'variant':<24}{'best ms':>10}{'median ms':>12}{'collections/run':>17}")
    for label, values in times.items():
        print(f"{label:<24}{min(values) * 1e3:>10.2f}{statistics.median(values) * 1e3:>12.2f}"
              f"{statistics.mean(counts[label]):>17.1f}")
    print(f"with the pause, 4 threads loading in a loop left the collector off for "
          f"{_off_fraction(model, setup.folder, args.seconds):.0%} of another thread's samples")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
