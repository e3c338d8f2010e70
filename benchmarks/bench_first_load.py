"""The first load of an adapter into a freshly built model, as a user meets it: time and peak memory against size.

Run it (not a test)::

    .venv/bin/python benchmarks/bench_first_load.py                   # hidden 1024, 2048, 4096
    .venv/bin/python benchmarks/bench_first_load.py --hidden 1024     # one size

``bench_load.py`` times loads into a model that has had one already (best-of-N after a warm-up): the figures of
a server switching adapters. The first load into a keras-hub model also finds where keras-hub's converter puts
each transformers weight (each distinct hook is probed once over the weight's indices: work that grows with the
weight's size, not the adapter's) and runs the model once on two tokens (:mod:`adapterspec_keras.reach`); both
are remembered per model. This script builds, for each size, a two-layer Llama (intermediate = 2.6875 x hidden,
as Llama-7B's 11008 / 4096), a PEFT-written LoRA r=16 on all seven projections, and prints, side by side:

* torch: ``PeftModel.from_pretrained`` and ``adapterspec.load_adapter``, each into a fresh model (first load);
* Keras (keras-hub ``Llama3CausalLM``): ``adapterspec.load_adapter``'s first load, the second load (after
  ``delete_adapter``), and the process's peak resident memory before and after the first load (a high-water
  mark of the whole process, torch's models included: its rise is a lower bound of what the first load took).

A first load is one run per size (it cannot be repeated on the same model): expect noise of some 10%.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

import bench_load  # noqa: E402

__all__ = ["main"]


def _config(hidden: int) -> dict[str, Any]:
    return {"hidden_size": hidden, "intermediate_size": hidden * 43 // 16, "num_hidden_layers": 2,
            "num_attention_heads": max(1, hidden // 128), "num_key_value_heads": max(1, hidden // 128),
            "vocab_size": 256, "max_position_embeddings": 256}


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def one_size(hidden: int, root: Path) -> dict[str, float]:
    """The first-load figures of one size (seconds, MB)."""
    import torch
    from peft import PeftModel
    from transformers import LlamaConfig, LlamaForCausalLM

    import _keras_bench
    import adapterspec

    config = _config(hidden)

    def fresh_torch() -> Any:
        with torch.device("meta"):
            model = LlamaForCausalLM(LlamaConfig(**config))
        return model.to_empty(device="cpu").eval()

    setup = bench_load.write_adapters(fresh_torch(), root / str(hidden))
    row: dict[str, float] = {"adapter_mb": setup.adapter_mb}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = fresh_torch()
        start = time.perf_counter()
        PeftModel.from_pretrained(model, str(setup.folder))
        row["peft"] = time.perf_counter() - start
    del model
    model = fresh_torch()
    start = time.perf_counter()
    adapterspec.load_adapter(model, setup.folder)
    row["torch"] = time.perf_counter() - start
    del model
    keras_model = _keras_bench.keras_llama(config)
    row["rss_before"] = _peak_mb()
    start = time.perf_counter()
    adapterspec.load_adapter(keras_model, setup.folder)
    row["keras_first"] = time.perf_counter() - start
    row["rss_after"] = _peak_mb()
    adapterspec.delete_adapter(keras_model, "default")
    start = time.perf_counter()
    adapterspec.load_adapter(keras_model, setup.folder)
    row["keras_second"] = time.perf_counter() - start
    del keras_model
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", default="1024,2048,4096", help="comma-separated hidden sizes")
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="adapterspec-first-load-"))
    print(f"{'hidden':>6} {'inter':>6} {'LoRA MB':>8} | {'torch: peft s':>13} {'adapterspec s':>13} | "
          f"{'keras: first s':>14} {'second s':>9} {'peak MB before':>14} {'after':>7}")
    try:
        for hidden in (int(h) for h in args.hidden.split(",")):
            r = one_size(hidden, root)
            print(f"{hidden:6d} {_config(hidden)['intermediate_size']:6d} {r['adapter_mb']:8.1f} | "
                  f"{r['peft']:13.3f} {r['torch']:13.3f} | {r['keras_first']:14.3f} {r['keras_second']:9.3f} "
                  f"{r['rss_before']:14.0f} {r['rss_after']:7.0f}", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
