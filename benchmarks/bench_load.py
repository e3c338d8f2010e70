"""Load, save and switch timings: adapterspec against raw safetensors and PEFT, on one synthetic Llama.

Run it (not a test)::

    .venv/bin/python benchmarks/bench_load.py                  # torch only
    .venv/bin/python benchmarks/bench_load.py --backends torch,keras --repeats 7

The model is a random Llama (hidden 1024, 16 layers, intermediate 2816) built on the meta device and
materialised without initialisation; the adapter is a PEFT-written LoRA, r=16 on q,k,v,o,gate,up,down
(~20 MB fp32). Every timing is wall time (``time.perf_counter``; ``--clock cpu`` for process time on a shared machine),
best-of-N and median; the implementations of one operation are timed in alternation
(:func:`measure_side_by_side`), so that a busy neighbour slows them alike:

* load: ``safetensors.torch.load_file`` (since safetensors 0.8 it maps the file and reads no data: its pages
  are read at first use), the same plus a copy of each tensor (``raw+copy``: the data in the process, as a
  load that must not change with the file needs), ``adapterspec.load_adapter``
  (read + check the folder, inject, load; the adapter is deleted again between runs) and
  ``PeftModel.from_pretrained`` (unloaded between runs); and ``load_adapter`` of an adapterspec-saved copy
  (``own file``), which records the base's fingerprint (SPEC.md 9.1; PEFT's file has none), so the load
  computes the model's and compares them;
* save: ``safetensors.torch.save_file``, ``adapterspec.save_adapter`` (atomic, with checksum; and with
  ``durable=True``: every file fsynced), PEFT's ``save_pretrained``;
* switch: ``adapterspec.set_active_adapters`` between two loaded adapters, per switch.

Another backend adds a column through a module ``benchmarks/_<backend>_bench.py`` exposing
``bench_<backend>(setup: BenchSetup, repeats: int) -> list[Timing]`` (see :func:`run_backend`).
"""

from __future__ import annotations

import argparse
import gc
import importlib
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["BenchSetup", "Timing", "main", "measure", "measure_side_by_side", "run_backend",
           "save_rows"]


@dataclass
class Timing:
    """The wall times of one operation by one implementation, in seconds."""

    operation: str  # "load", "save", "switch"
    implementation: str  # "raw", "adapterspec", "peft", ...
    backend: str  # "torch", "keras"
    times: list[float] = field(default_factory=list)
    note: str = ""

    @property
    def best(self) -> float:
        return min(self.times)

    @property
    def median(self) -> float:
        return statistics.median(self.times)


@dataclass
class BenchSetup:
    """What every backend's benchmark gets: the PEFT-written adapter folders and the model's shape."""

    folder: Path  # adapter "a" (PEFT-written LoRA)
    folder_b: Path  # adapter "b", same shape, other values
    work: Path  # a scratch folder for saves
    model_config: dict[str, Any]
    adapter_mb: float


#: The clock every measurement uses: wall time by default; ``--clock cpu`` (process time) on a machine
#: other jobs share, where wall time mostly measures the neighbours.
CLOCK: Callable[[], float] = time.perf_counter


def measure(fn: Callable[[], Any], repeats: int, *, after: Callable[[], Any] | None = None, warmup: int = 1) -> list[float]:
    """Time ``fn`` ``repeats`` times (after ``warmup`` untimed runs); ``after`` runs untimed after each call.

    As :mod:`timeit` does, the garbage collector is off while ``fn`` runs (and runs between calls), so
    that no call pays for a collection of the whole process's heap.
    """
    times = []
    for i in range(warmup + repeats):
        gc.collect()
        gc.disable()
        try:
            start = CLOCK()
            fn()
            elapsed = CLOCK() - start
        finally:
            gc.enable()
        if after is not None:
            after()
        if i >= warmup:
            times.append(elapsed)
    return times


def measure_side_by_side(calls: dict[str, tuple[Callable[[], Any], Callable[[], Any] | None]],
                         repeats: int) -> dict[str, list[float]]:
    """Time several implementations of one operation in alternation: run ``i`` of each comes before run
    ``i + 1`` of any, so that a neighbour slowing the machine down for a while hits them all alike.

    :param calls: label -> (function, ``after`` or ``None``), as for :func:`measure` (one warm-up each).
    """
    times: dict[str, list[float]] = {label: [] for label in calls}
    for i in range(repeats + 1):
        for label, (fn, after) in calls.items():
            elapsed = measure(fn, 1, after=after, warmup=0)[0]
            if i:
                times[label].append(elapsed)
    return times


def save_rows(backend: str, model: Any, tensors: dict[str, Any], raw_save: Callable[..., Any], out: Path,
              repeats: int) -> list[Timing]:
    """The save rows of one backend, timed side by side: ``raw_save`` (a safetensors ``save_file``) of
    ``tensors``, and ``adapterspec.save_adapter`` of ``model``'s loaded adapter, plain and ``durable=True``."""
    import adapterspec
    from adapterspec._safetensors import start_checksum

    def raw_hashed() -> None:  # the floor of a file that carries the spec's sha256: the hash on a second core
        checksum = start_checksum(tensors)
        raw_save(tensors, str(out / "raw_hashed.safetensors"), metadata={"format": "pt"})
        assert checksum is not None
        checksum.result()

    save = measure_side_by_side({
        "raw": (lambda: raw_save(tensors, str(out / "raw.safetensors"), metadata={"format": "pt"}), None),
        "raw+sha256": (raw_hashed, None),
        "adapterspec": (lambda: adapterspec.save_adapter(model, out / backend, overwrite=True), None),
        "durable": (lambda: adapterspec.save_adapter(model, out / "durable", overwrite=True, durable=True), None)},
        repeats)
    raw_name = "raw" if backend == "torch" else "raw (numpy)"
    return [Timing("save", raw_name, backend, save["raw"], f"{raw_save.__module__}.save_file"),
            Timing("save", RAW_HASHED, backend, save["raw+sha256"], "... while a thread takes the data's sha256"),
            Timing("save", "adapterspec", backend, save["adapterspec"], "atomic write + sha256"),
            Timing("save", "  durable=True", backend, save["durable"], "... + fsync of every file")]


#: The label of the load row that copies what ``safetensors.torch.load_file`` maps: since safetensors 0.8 its tensors
#: are views of the mapped file, read page by page at first use (and changed by an in-place rewrite of the file);
#: adapterspec reads the data into the process once, so that the model never changes with the file (SPEC.md 10).
RAW_COPIED = "  raw+copy"

#: The label of the save row that adds the spec's checksum to the raw save (a sha256 runs at ~1 GB/s on one core, often
#: slower than the write itself: the floor of any save that records it, SPEC.md 8).
RAW_HASHED = "  raw+sha256"

#: The label of the load row of an adapterspec-saved copy of the adapter: unlike PEFT's file, it records the base's
#: fingerprint (SPEC.md 9.1), which a load computes from the model and compares.
OWN = "  own file"


def own_copy(model: Any, setup: BenchSetup, backend: str) -> Path:
    """The PEFT-written adapter ``setup.folder`` loaded into ``model`` and saved again by adapterspec (so with
    the base's fingerprint), under ``setup.work``; the model is left without it."""
    import adapterspec
    from adapterspec.identity import FINGERPRINT_KEY

    out = setup.work / f"own-{backend}"
    setup.work.mkdir(parents=True, exist_ok=True)
    adapterspec.load_adapter(model, setup.folder)
    try:
        adapterspec.save_adapter(model, out, overwrite=True)
    finally:
        adapterspec.delete_adapter(model, "default")
    assert FINGERPRINT_KEY in adapterspec.read_adapter(out).metadata  # else the row measures no fingerprint check
    return out


def model_config() -> dict[str, Any]:
    return {"hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 16, "num_attention_heads": 16,
            "num_key_value_heads": 16, "vocab_size": 256, "max_position_embeddings": 256}


def build_llama() -> Any:
    """The synthetic Llama: built on meta, then given (uninitialised) CPU memory -- seconds, not minutes."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**model_config()))
    return model.to_empty(device="cpu").eval()


def write_adapters(base: Any, root: Path) -> BenchSetup:
    """Two PEFT-written LoRA folders (r=16 on all projections) for ``base``; ``base`` is left unchanged."""
    import torch
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                             "up_proj", "down_proj"], init_lora_weights=False)
    folders = []
    for name in ("a", "b"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peft_model = get_peft_model(base, config)
            with torch.no_grad():
                for i, (key, param) in enumerate(peft_model.named_parameters()):
                    if "lora_" in key:
                        param.copy_(torch.sin(torch.arange(param.numel(), dtype=torch.float32) * 0.01 + i
                                              + (name == "b")).reshape(param.shape) * 0.01)
            peft_model.save_pretrained(str(root / name))
            peft_model.unload()
    size = (root / "a" / "adapter_model.safetensors").stat().st_size / 1e6
    return BenchSetup(root / "a", root / "b", root / "work", model_config(), size)


def bench_torch(setup: BenchSetup, repeats: int, model: Any) -> list[Timing]:
    """The torch rows: raw safetensors, adapterspec, PEFT -- load, save, switch."""
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file, save_file

    import adapterspec

    weights = setup.folder / "adapter_model.safetensors"
    own = own_copy(model, setup, "torch")
    load = measure_side_by_side({
        "raw": (lambda: load_file(str(weights)), None),
        "raw+copy": (lambda: {k: v.clone() for k, v in load_file(str(weights)).items()}, None),
        "adapterspec": (lambda: adapterspec.load_adapter(model, setup.folder),
                        lambda: adapterspec.delete_adapter(model, "default")),
        "own": (lambda: adapterspec.load_adapter(model, own), lambda: adapterspec.delete_adapter(model, "default"))},
        repeats)
    rows = [Timing("load", "raw", "torch", load["raw"], "safetensors.torch.load_file (>= 0.8: maps the file, reads no data)"),
            Timing("load", RAW_COPIED, "torch", load["raw+copy"], "... + clone(): the data read into the process"),
            Timing("load", "adapterspec", "torch", load["adapterspec"], "read+check+inject+load"),
            Timing("load", OWN, "torch", load["own"], "... of an adapterspec-saved copy: + base fingerprint check")]
    # where the time goes: the core's read and check of the folder, then the backend's part
    rows.append(Timing("load", "  core read", "torch",
                       measure(lambda: adapterspec.read_adapter(setup.folder, check_tensors=False), repeats),
                       "read_adapter: config schema, header (tensors: by load_state)"))
    from adapterspec_torch.inject import inject
    from adapterspec_torch.state import load_state

    adapter = adapterspec.read_adapter(setup.folder)
    options = adapterspec.LoadOptions(initialize=False)

    def backend_part() -> None:
        inject(model, adapter.config, "default", options)
        load_state(model, adapter, "default", options)

    rows.append(Timing("load", "  torch part", "torch",
                       measure(backend_part, repeats, after=lambda: adapterspec.delete_adapter(model, "default")),
                       "inject (no init) + load_state (reads the file)"))

    def peft_load() -> None:
        holder["peft"] = PeftModel.from_pretrained(model, str(setup.folder))

    def peft_unload() -> None:
        holder.pop("peft").unload()

    holder: dict[str, Any] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rows.append(Timing("load", "peft", "torch", measure(peft_load, max(3, repeats // 2), after=peft_unload),
                           "PeftModel.from_pretrained"))

    tensors = load_file(str(weights))
    out = setup.work
    out.mkdir(parents=True, exist_ok=True)
    adapterspec.load_adapter(model, setup.folder)
    rows += save_rows("torch", model, tensors, save_file, out, repeats)
    adapterspec.delete_adapter(model, "default")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = PeftModel.from_pretrained(model, str(setup.folder))
        rows.append(Timing("save", "peft", "torch",
                           measure(lambda: peft_model.save_pretrained(str(out / "peft")), repeats),
                           "save_pretrained"))
        peft_model.unload()

    adapterspec.load_adapter(model, setup.folder, "a")
    adapterspec.load_adapter(model, setup.folder_b, "b")
    switches = 200
    names = ["a", "b"]

    def switch_many() -> None:
        for i in range(switches):
            adapterspec.set_active_adapters(model, names[i % 2])

    per_switch = [t / switches for t in measure(switch_many, repeats)]
    rows.append(Timing("switch", "adapterspec", "torch", per_switch, "set_active_adapters, per switch"))
    with torch.no_grad():  # the switch really changes the forward pass
        ids = torch.arange(8).reshape(1, 8)
        adapterspec.set_active_adapters(model, "a")
        out_a = model(input_ids=ids).logits
        adapterspec.set_active_adapters(model, "b")
        assert not torch.equal(out_a, model(input_ids=ids).logits)
    adapterspec.delete_adapter(model, "a")
    adapterspec.delete_adapter(model, "b")
    return rows


#: (module, attribute, label) of the functions ``--breakdown`` times inside ``load_adapter`` / ``save_adapter``;
#: indentation in the label shows nesting.
_LOAD_PARTS = (
    ("adapterspec.api", "read_adapter", "core read_adapter"),
    ("adapterspec.adapter", "_inside", "  _inside (resolve files, x2)"),
    ("adapterspec.config", "read_json_file", "  read_json_file"),
    ("adapterspec.config", "_check_json_value", "  _check_json_value"),
    ("adapterspec.config", "config_errors", "  config_errors (jsonschema)"),
    ("adapterspec.config", "regex_problems", "  regex_problems"),
    ("adapterspec.adapter", "_safetensors.read_header", "  _safetensors.read_header"),
    ("adapterspec.adapter", "tensor_errors", "  tensor_errors (only if load_state cannot check)"),
    ("adapterspec.checks", "parse_key", "    parse_key (per key)"),
    ("adapterspec.checks", "_dtype_error", "    _dtype_error (per key)"),
    ("adapterspec.checks", "_module_errors", "    _module_errors"),
    ("adapterspec.checks", "_auxiliary_error", "    _auxiliary_error"),
    ("adapterspec.api", "backend_name", "core api backend_name (pluggy)"),
    ("adapterspec.api", "adapter_names", "core api adapter_names"),
    ("adapterspec.api", "set_active_adapters", "core api set_active_adapters"),
    ("adapterspec.api", "_method_tensors_of", "core api _method_tensors_of"),
    ("adapterspec_torch.inject", "inject", "torch inject"),
    ("adapterspec_torch.state", "load_state", "torch load_state"),
    ("adapterspec.adapter", "Adapter.load_tensors", "  core Adapter.load_tensors (reads the data)"),
)
_SAVE_PARTS = (
    ("adapterspec_torch.state", "extract_state", "torch extract_state"),
    ("adapterspec.api", "write_adapter", "core write_adapter"),
    ("adapterspec.folder", "_prepare", "  _prepare (checks, serialise, sha256)"),
    ("adapterspec.folder", "tensor_errors", "    tensor_errors"),
    ("adapterspec.folder", "_tensor_infos", "    _tensor_infos"),
    ("adapterspec.folder", "_savable", "    _savable"),
    ("adapterspec.folder", "_install", "  _install (stage, write, fsync, swap, clean)"),
    ("adapterspec.folder", "_write_file", "    _write_file (x2)"),
    ("adapterspec._safetensors", "save_file", "      _safetensors.save_file"),
    ("safetensors.torch", "save_file", "        safetensors.torch.save_file (writes)"),
    ("adapterspec._safetensors", "sha256_of_file", "        sha256_of_file (only for tensors off the CPU)"),
    ("adapterspec.folder", "_fsync_dir", "    _fsync_dir"),
    ("shutil", "rmtree", "    shutil.rmtree (old folder)"),
)


def _patch_timers(parts: tuple[tuple[str, str, str], ...], spent: dict[str, list[int]]) -> list[tuple[Any, str, Any]]:
    """Wrap each function of ``parts`` to add its wall time (ns) and one call to ``spent[label]``; returns what
    to restore."""
    restore = []
    for module_name, attr, label in parts:
        owner: Any = importlib.import_module(module_name)
        *path, name = attr.split(".")
        for part in path:
            owner = getattr(owner, part)
        original = getattr(owner, name)

        def timed(*args: Any, __f: Any = original, __label: str = label, **kwargs: Any) -> Any:
            start = time.perf_counter_ns()
            try:
                return __f(*args, **kwargs)
            finally:
                entry = spent.setdefault(__label, [0, 0])
                entry[0] += time.perf_counter_ns() - start
                entry[1] += 1

        restore.append((owner, name, original))
        setattr(owner, name, timed)
    return restore


def breakdown(setup: BenchSetup, model: Any, repeats: int) -> str:
    """Where ``load_adapter`` and ``save_adapter`` spend their time: best and median per function over
    ``repeats`` calls (each timer adds ~0.1-1 us per call; GC off, as in :func:`measure`)."""
    import adapterspec

    lines = [f"{'part (load_adapter / save_adapter)':46s} {'best us':>9} {'median us':>10} {'calls':>6}"]
    for title, parts, run, after in (
            ("load_adapter", _LOAD_PARTS, lambda: adapterspec.load_adapter(model, setup.folder),
             lambda: adapterspec.delete_adapter(model, "default")),
            ("save_adapter", _SAVE_PARTS, lambda: adapterspec.save_adapter(model, setup.work / "bd", overwrite=True),
             None)):
        if title == "save_adapter":
            adapterspec.load_adapter(model, setup.folder)
        spent: dict[str, list[int]] = {}
        restore = _patch_timers(parts, spent)
        per_label: dict[str, list[int]] = {}
        calls: dict[str, int] = {}
        totals = []
        try:
            for i in range(repeats + 1):
                spent.clear()
                gc.collect()
                gc.disable()
                start = time.perf_counter_ns()
                try:
                    run()
                finally:
                    elapsed = time.perf_counter_ns() - start
                    gc.enable()
                if after is not None:
                    after()
                if i:
                    totals.append(elapsed)
                    for label, (ns, n) in spent.items():
                        per_label.setdefault(label, []).append(ns)
                        calls[label] = n
        finally:
            for owner, name, original in reversed(restore):
                setattr(owner, name, original)
        lines.append(f"{title + ' (total)':46s} {min(totals) / 1e3:9.0f} {statistics.median(totals) / 1e3:10.0f}")
        for _, _, label in parts:
            if label in per_label:
                values = per_label[label]
                lines.append(f"{label:46s} {min(values) / 1e3:9.0f} {statistics.median(values) / 1e3:10.0f} "
                             f"{calls[label]:6d}")
        if title == "save_adapter":
            adapterspec.delete_adapter(model, "default")
    return "\n".join(lines)


def run_backend(backend: str, setup: BenchSetup, repeats: int) -> list[Timing]:
    """The rows of another backend: ``benchmarks/_<backend>_bench.py``'s ``bench_<backend>(setup, repeats)``."""
    sys.path.insert(0, str(Path(__file__).parent))
    try:
        module = importlib.import_module(f"_{backend}_bench")
    except ImportError as exc:
        print(f"[{backend}] skipped: benchmarks/_{backend}_bench.py not available ({exc})")
        return []
    return list(getattr(module, f"bench_{backend}")(setup, repeats))


def report(rows: list[Timing]) -> str:
    """The table: one line per (operation, implementation, backend), with the ratio to raw safetensors."""
    raw = {(r.backend, r.operation): r.best for r in rows if r.implementation.startswith("raw")}
    lines = [f"{'operation':<8} {'backend':<7} {'implementation':<14} {'best ms':>10} {'median ms':>10} "
             f"{'x raw':>7} {'x this':>7}  note"]
    lines.append("-" * len(lines[0]))
    for r in rows:
        base = raw.get((r.backend, r.operation))
        ratio = f"{r.best / base:.2f}" if base else "-"
        ours = next((o.best for o in rows if o.operation == r.operation and o.implementation == "adapterspec"
                     and o.backend == r.backend), None)
        versus = f"{r.best / ours:.1f}" if ours and r.implementation == "peft" else "-"
        lines.append(f"{r.operation:<8} {r.backend:<7} {r.implementation:<14} {r.best * 1e3:>10.3f} "
                     f"{r.median * 1e3:>10.3f} {ratio:>7} {versus:>7}  {r.note}")
    return "\n".join(lines)


#: Each backend's targets: (operation, kind, bound); "raw" ratios are to that backend's raw row (issue #20).
TARGETS_BY_BACKEND = {
    "torch": (("load", "raw", 1.3), ("load", "peft", 10.0), ("save", "raw", 1.3), ("switch", "ms", 1.0)),
    "keras": (("load", "raw", 1.5), ("save", "raw", 1.3), ("switch", "ms", 1.0)),
}


def verdicts(rows: list[Timing]) -> list[str]:
    """The targets, met or not, for every backend measured: a ratio to raw is met when it holds best-of-N against
    best-of-N and median against median (measured side by side); the load of an adapterspec-saved copy
    (:data:`OWN`, with the fingerprint check) is held to the load's bound too."""
    out = []
    for backend, targets in TARGETS_BY_BACKEND.items():
        ours = {r.operation: r for r in rows if r.backend == backend and r.implementation == "adapterspec"}
        raw = {r.operation: r for r in rows if r.backend == backend and r.implementation.startswith("raw")}
        peft = {r.operation: r for r in rows if r.implementation == "peft"}
        own = {r.operation: r for r in rows if r.backend == backend and r.implementation == OWN}
        hashed = {r.operation: r for r in rows if r.backend == backend and r.implementation in (RAW_HASHED, RAW_COPIED)}
        for operation, kind, bound in targets:
            mine = ours.get(operation)
            if mine is None:
                continue
            if kind == "raw" and operation in raw:
                floor = raw[operation]
                for label, timing in (("", mine), (" (own file)", own.get(operation))):
                    if timing is None:
                        continue
                    best, median = timing.best / floor.best, timing.median / floor.median
                    out.append(f"[{backend}] {operation}{label} <= {bound:g}x {floor.note}: best {best:.2f}x "
                               f"({timing.best * 1e3:.1f} vs {floor.best * 1e3:.1f} ms), median {median:.2f}x -> "
                               f"{'OK' if best <= bound and median <= bound else 'MISSED'}")
                if operation in hashed:
                    floor = hashed[operation]
                    why = "with a checksum" if floor.implementation == RAW_HASHED else "with the data read"
                    out.append(f"[{backend}] {operation} vs {floor.implementation.strip()} (the floor {why}): "
                               f"best {mine.best / floor.best:.2f}x, median {mine.median / floor.median:.2f}x")
            elif kind == "peft" and operation in peft:
                speedup = peft[operation].best / mine.best
                out.append(f"[{backend}] {operation} >= {bound:g}x faster than PEFT: {speedup:.1f}x -> "
                           f"{'OK' if speedup >= bound else 'MISSED'}")
            elif kind == "ms":
                ms = mine.median * 1e3
                out.append(f"[{backend}] {operation} < {bound:g} ms: {ms:.3f} ms -> {'OK' if ms < bound else 'MISSED'}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", default="torch", help="comma-separated: torch,keras")
    parser.add_argument("--repeats", type=int, default=9, help="timed runs per operation (best-of-N and median)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall: time.perf_counter (default); cpu: time.process_time, for a busy machine")
    parser.add_argument("--breakdown", action="store_true",
                        help="also time the functions inside load_adapter and save_adapter (torch)")
    args = parser.parse_args(argv)
    global CLOCK
    CLOCK = time.perf_counter if args.clock == "wall" else time.process_time
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    if args.repeats < 5:
        parser.error("--repeats must be at least 5")

    import torch

    torch.set_num_threads(max(1, torch.get_num_threads()))
    root = Path(tempfile.mkdtemp(prefix="adapterspec-bench-"))
    try:
        started = time.perf_counter()
        model = build_llama()
        setup = write_adapters(model, root)
        print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; clock: {args.clock} "
              f"({'perf_counter' if args.clock == 'wall' else 'process_time'})")
        print(f"model: Llama {setup.model_config['num_hidden_layers']} layers, hidden "
              f"{setup.model_config['hidden_size']}, intermediate {setup.model_config['intermediate_size']}; "
              f"adapter: LoRA r=16 x 7 modules x 16 layers = {setup.adapter_mb:.1f} MB fp32; "
              f"setup {time.perf_counter() - started:.1f}s; N={args.repeats}")
        rows: list[Timing] = []
        if "torch" in backends:
            rows += bench_torch(setup, args.repeats, model)
        for backend in backends:
            if backend != "torch":
                rows += run_backend(backend, setup, args.repeats)
        print(report(rows))
        print("\n".join(verdicts(rows)))
        if args.breakdown and "torch" in backends:
            print(breakdown(setup, model, args.repeats))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
