"""The keras rows of ``bench_load.py``: loading a PEFT-written LoRA into a keras-hub Llama, against the raw read.

Called by ``benchmarks/bench_load.py --backends torch,keras`` as ``bench_keras(setup, repeats)``, or alone::

    .venv/bin/python benchmarks/_keras_bench.py ADAPTER_DIR HF_BASE_DIR [--repeats 7]

The model is keras-hub's ``Llama3CausalLM`` built from the transformers config (random weights, no
checkpoint read) -- or converted with ``from_preset`` when given a transformers checkpoint folder.
Rows (wall time, best-of-N and median):

* load ``raw (numpy)``: ``safetensors.numpy.load_file`` -- reading the tensors, the floor for Keras;
* load ``adapterspec``: ``adapterspec.load_adapter`` (read + check + inject + load; deleted between runs),
  with its parts: the core's ``read_adapter``, and the keras backend's inject + load_state;
* save ``adapterspec``: ``adapterspec.save_adapter`` (atomic, checksummed; and with ``durable=True``, fsynced);
* switch ``adapterspec``: ``set_active_adapters`` between two loaded adapters, per switch.

Targets (``bench_load.TARGETS_BY_BACKEND``): load + inject within 1.5x the raw read, save within 1.3x the raw write.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

sys.path.insert(0, str(Path(__file__).parent))

from bench_load import OWN, BenchSetup, Timing, measure, measure_side_by_side, own_copy, save_rows  # noqa: E402

__all__ = ["bench_keras", "keras_llama", "main"]


def keras_llama(base: str | Path | dict[str, Any]) -> Any:
    """keras-hub's Llama causal LM: converted from a transformers checkpoint folder, or built (random weights)
    from a transformers Llama config (a dict, or a folder holding only ``config.json``)."""
    import keras_hub

    if not isinstance(base, dict):
        folder = Path(base)
        if (folder / "model.safetensors").exists() or (folder / "model.safetensors.index.json").exists():
            return keras_hub.models.Llama3CausalLM.from_preset(str(folder), preprocessor=None)
        base = json.loads((folder / "config.json").read_text("utf-8"))
    backbone = keras_hub.models.Llama3Backbone(
        vocabulary_size=base["vocab_size"], num_layers=base["num_hidden_layers"],
        num_query_heads=base["num_attention_heads"], hidden_dim=base["hidden_size"],
        intermediate_dim=base["intermediate_size"],
        num_key_value_heads=base.get("num_key_value_heads", base["num_attention_heads"]),
        tie_word_embeddings=bool(base.get("tie_word_embeddings", False)))
    return keras_hub.models.Llama3CausalLM(backbone=backbone, preprocessor=None)


def bench_keras(setup_or_adapter: Any, base: Any = None, repeats: int | None = None) -> list[Timing]:
    """The keras rows. ``bench_keras(setup, repeats)`` (a ``bench_load.BenchSetup``) or
    ``bench_keras(adapter_dir, hf_base_dir_or_config, repeats)``.

    >>> rows = bench_keras("bench/a", {"hidden_size": 1024, ...}, 7)      # doctest: +SKIP
    """
    import numpy as np
    from safetensors.numpy import load_file, save_file

    import adapterspec
    from adapterspec_keras.inject import inject
    from adapterspec_keras.state import load_state

    if hasattr(setup_or_adapter, "folder"):  # bench_load's BenchSetup
        setup = setup_or_adapter
        folder, folder_b, work = Path(setup.folder), Path(setup.folder_b), Path(setup.work)
        base, repeats = setup.model_config, int(base if repeats is None else repeats)
    else:
        folder = Path(setup_or_adapter)
        folder_b, work = None, Path(tempfile.mkdtemp(prefix="adapterspec-keras-bench-"))
        repeats = int(repeats or 7)
    model = keras_llama(base)
    weights = folder / "adapter_model.safetensors"
    own = own_copy(model, BenchSetup(folder, folder, work, {}, 0.0), "keras")

    load = measure_side_by_side({
        "raw": (lambda: load_file(str(weights)), None),
        "adapterspec": (lambda: adapterspec.load_adapter(model, folder),
                        lambda: adapterspec.delete_adapter(model, "default")),
        "own": (lambda: adapterspec.load_adapter(model, own), lambda: adapterspec.delete_adapter(model, "default"))},
        repeats)
    rows = [Timing("load", "raw (numpy)", "keras", load["raw"], "safetensors.numpy.load_file"),
            Timing("load", "adapterspec", "keras", load["adapterspec"], "read+check+inject+load"),
            Timing("load", OWN, "keras", load["own"], "... of an adapterspec-saved copy: + base fingerprint check")]
    rows.append(Timing("load", "  core read", "keras",
                       measure(lambda: adapterspec.read_adapter(folder, check_tensors=False), repeats),
                       "read_adapter: config schema, header (tensors: by load_state)"))
    adapter = adapterspec.read_adapter(folder)
    options = adapterspec.LoadOptions(initialize=False) if "initialize" in adapterspec.LoadOptions.__dataclass_fields__ \
        else adapterspec.LoadOptions()

    def backend_part() -> None:
        inject(model, adapter.config, "default", options)
        load_state(model, adapter, "default", options)

    rows.append(Timing("load", "  keras part", "keras",
                       measure(backend_part, repeats, after=lambda: adapterspec.delete_adapter(model, "default")),
                       "inject (no init) + load_state (reads the file)"))

    work.mkdir(parents=True, exist_ok=True)
    tensors = load_file(str(weights))
    adapterspec.load_adapter(model, folder)
    rows += save_rows("keras", model, tensors, save_file, work, repeats)
    adapterspec.delete_adapter(model, "default")

    if folder_b is not None:
        adapterspec.load_adapter(model, folder, "a")
        adapterspec.load_adapter(model, folder_b, "b")
        switches, names = 200, ["a", "b"]

        def switch_many() -> None:
            for i in range(switches):
                adapterspec.set_active_adapters(model, names[i % 2])

        rows.append(Timing("switch", "adapterspec", "keras", [t / switches for t in measure(switch_many, repeats)],
                           "set_active_adapters, per switch"))
        ids = np.arange(8).reshape(1, 8) % base["vocab_size"]
        inputs = {"token_ids": ids, "padding_mask": np.ones_like(ids)}
        adapterspec.set_active_adapters(model, "a")
        out_a = np.asarray(model(inputs))
        adapterspec.set_active_adapters(model, "b")
        assert not np.array_equal(out_a, np.asarray(model(inputs)))  # the switch changes the forward pass
        adapterspec.delete_adapter(model, "a")
        adapterspec.delete_adapter(model, "b")

    return rows


def main(argv: list[str] | None = None) -> int:
    from bench_load import report

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("adapter_dir")
    parser.add_argument("hf_base", help="a transformers Llama checkpoint folder, or a folder with its config.json")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    print(report(bench_keras(args.adapter_dir, args.hf_base, args.repeats)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
