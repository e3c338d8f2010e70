"""GPU load, save and forward timings on a 7B-shaped Llama: adapterspec beside the floor and PEFT.

Run it (not a test)::

    python benchmarks/bench_gpu.py                         # CUDA, 7B shape, bf16 (~1-2 min on an H200)
    python benchmarks/bench_gpu.py --device cpu --tiny     # a smoke run of every section, anywhere

The model is a ``LlamaForCausalLM`` shaped like a 7B model (hidden 4096, 32 layers, intermediate 11008),
built straight on the device in bf16 with random weights (no download); the adapter is a LoRA, r=16 on
the 7 projections (448 tensors, 80 MB bf16), written with PEFT's config and random tensors. Rows:

* load: host->device copy of the file's size (pinned / pageable), ``safetensors`` ``load_file`` to the
  CPU and to the device, the *ideal* path (read the file once into pinned memory, one copy to the
  device, views), ``adapterspec.load_adapter`` (model on the device) and PEFT's ``from_pretrained``;
* save: ``safetensors`` ``save_file`` of the tensors in CPU memory (raw), ``adapterspec.save_adapter``
  from the model on the device, PEFT's ``save_pretrained``;
* forward: the whole model at prefill (no cache) and at 8 one-token rows: base, adapterspec's unmerged
  LoRA, PEFT's; and one Linear with LoRA: base, naive, ``addmm_``, adapterspec, PEFT.

Every timed call ends with ``torch.cuda.synchronize()``; implementations of one operation run in
alternation (run ``i`` of each before run ``i + 1`` of any). Each section that fails prints its
traceback and the script goes on (exit status 1 at the end), so one run gives every table it can.
"""

from __future__ import annotations

import argparse
import gc
import inspect
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Row", "main", "side_by_side"]

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SHAPES = {  # LlamaConfig fields; forward shapes (batch, tokens); Linear micro-benchmark width and token counts
    "7b": {"config": {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                      "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000,
                      "max_position_embeddings": 2048},
           "prefill": (4, 512), "decode": (8, 1), "linear": 4096, "tokens": (8, 2048, 8192)},
    "tiny": {"config": {"hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4,
                        "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 512,
                        "max_position_embeddings": 256},
             "prefill": (2, 64), "decode": (8, 1), "linear": 256, "tokens": (8, 256, 2048)},
}
RANK, ALPHA = 16, 32


@dataclass
class Row:
    """The times of one implementation of one operation, in seconds."""

    table: str
    label: str
    times: list[float] = field(default_factory=list)
    note: str = ""

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def best(self) -> float:
        return min(self.times)


class Bench:
    """The device, its synchronisation and the rows measured so far."""

    def __init__(self, device: str, repeats: int) -> None:
        import torch

        self.torch = torch
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        if self.cuda and self.device.index is None:  # cuda:0 is what tensors report: compare like with like
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.repeats = repeats
        self.rows: list[Row] = []
        self.failed: list[str] = []

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize(self.device)

    def add(self, table: str, label: str, times: list[float], note: str = "") -> Row:
        row = Row(table, label, times, note)
        self.rows.append(row)
        return row

    def find(self, table: str, label: str) -> Row | None:
        return next((r for r in self.rows if r.table == table and r.label == label), None)


def side_by_side(bench: Bench, calls: dict[str, tuple[Callable[[], Any], Callable[[], Any] | None]],
                 repeats: int, *, inner: int = 1) -> dict[str, list[float]]:
    """Time each call ``repeats`` times in alternation (one untimed warm-up each), synchronised, GC off.

    :param calls: label -> (function, ``after`` or ``None``: untimed, after each call).
    :param inner: calls per timing (for sub-millisecond work); the time given is per call.
    """
    times: dict[str, list[float]] = {label: [] for label in calls}
    for i in range(repeats + 1):
        for label, (fn, after) in calls.items():
            gc.collect()
            gc.disable()
            try:
                bench.sync()
                start = time.perf_counter()
                for _ in range(inner):
                    fn()
                bench.sync()
                elapsed = (time.perf_counter() - start) / inner
            finally:
                gc.enable()
            if after is not None:
                after()
            if i:
                times[label].append(elapsed)
    return times


# -- setup ----------------------------------------------------------------------------------------

def build_model(bench: Bench, shape: dict[str, Any], dtype: Any) -> Any:
    """A random ``LlamaForCausalLM`` built on the device in ``dtype`` (transformers' own init, no download)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**shape["config"])
    with bench.torch.device(bench.device):
        try:
            model = LlamaForCausalLM._from_config(config, dtype=dtype)
        except TypeError:  # transformers before 4.56 names it torch_dtype
            model = LlamaForCausalLM._from_config(config, torch_dtype=dtype)
    model.eval().requires_grad_(False)
    if {p.dtype for p in model.parameters()} != {dtype}:  # an older transformers that ignored dtype
        model.to(dtype)
    return model


def write_adapter(bench: Bench, model: Any, folder: Path, dtype: Any) -> dict[str, Any]:
    """A PEFT-shaped LoRA folder (PEFT's config, random non-zero A and B) for ``model``; returns its tensors (CPU)."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    torch = bench.torch
    LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=list(PROJECTIONS), task_type="CAUSAL_LM").save_pretrained(
        str(folder))
    generator = torch.Generator().manual_seed(0)
    tensors = {}
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in PROJECTIONS:
            out_f, in_f = module.weight.shape
            key = f"base_model.model.{name}"
            tensors[f"{key}.lora_A.weight"] = (torch.randn(RANK, in_f, generator=generator) / in_f ** 0.5).to(dtype)
            tensors[f"{key}.lora_B.weight"] = (torch.randn(out_f, RANK, generator=generator) * 0.02).to(dtype)
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    return tensors


def peft_kwargs() -> dict[str, Any]:
    """PEFT keeps the adapter in the file's (the model's) dtype, as adapterspec does (its default upcasts to fp32)."""
    from peft import PeftModel

    return {"autocast_adapter_dtype": False} if "autocast_adapter_dtype" in inspect.signature(
        PeftModel.from_pretrained).parameters else {}


# -- load -----------------------------------------------------------------------------------------

def ideal_load(bench: Bench, path: Path) -> dict[str, Any]:
    """The floor: the file read once into (pinned) host memory, one copy to the device, typed views."""
    torch = bench.torch
    size = os.path.getsize(path)
    host = torch.empty(size, dtype=torch.uint8, pin_memory=bench.cuda)
    with open(path, "rb", buffering=0) as fh:
        fh.readinto(host.numpy())
    n = int.from_bytes(host[:8].numpy().tobytes(), "little")
    header = json.loads(host[8 : 8 + n].numpy().tobytes())
    data = host[8 + n :].to(bench.device) if bench.cuda else host[8 + n :]
    dtypes = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
    out = {}
    for key, info in header.items():
        if key != "__metadata__":
            begin, end = info["data_offsets"]
            out[key] = data[begin:end].view(dtypes[info["dtype"]]).view(info["shape"])
    return out


def bench_load(bench: Bench, model: Any, folder: Path) -> None:
    import adapterspec
    from peft import PeftModel
    from safetensors.torch import load_file

    torch = bench.torch
    path = folder / "adapter_model.safetensors"
    size = path.stat().st_size
    repeats = bench.repeats
    if bench.cuda:
        pinned = torch.empty(size, dtype=torch.uint8, pin_memory=True)
        pageable = torch.empty(size, dtype=torch.uint8)
        copies = side_by_side(bench, {"pinned": (lambda: pinned.to(bench.device), None),
                                      "pageable": (lambda: pageable.to(bench.device), None)}, repeats)
        bench.add("load", "h2d copy, pinned", copies["pinned"], f"{size / 1e6:.0f} MB, one copy")
        bench.add("load", "h2d copy, pageable", copies["pageable"], f"{size / 1e6:.0f} MB, one copy")
        del pinned, pageable

    def ours() -> None:
        adapterspec.load_adapter(model, folder)

    calls: dict[str, tuple[Callable[[], Any], Callable[[], Any] | None]] = {
        "raw cpu": (lambda: load_file(str(path)), None),
        "ideal": (lambda: ideal_load(bench, path), None),
        "adapterspec": (ours, lambda: adapterspec.delete_adapter(model, "default"))}
    if bench.cuda:
        calls["raw device"] = (lambda: load_file(str(path), device=str(bench.device)), None)
    times = side_by_side(bench, calls, repeats)
    bench.add("load", "load_file to cpu", times["raw cpu"], "safetensors.torch.load_file")
    if bench.cuda:
        bench.add("load", "load_file to device", times["raw device"], "load_file(device=...)")
    bench.add("load", "ideal", times["ideal"], "read into pinned memory, one copy, views")
    bench.add("load", "adapterspec", times["adapterspec"], "load_adapter, model on the device")

    # where the time goes: the core's read and check of the folder, then the backend's two steps
    from adapterspec_torch.inject import inject
    from adapterspec_torch.state import load_state

    adapter = adapterspec.read_adapter(folder)
    options = adapterspec.LoadOptions(initialize=False)

    def load_state_alone() -> None:
        inject(model, adapter.config, "default", options)
        bench.sync()
        start = time.perf_counter()
        load_state(model, adapter, "default", options)
        bench.sync()
        spent.append(time.perf_counter() - start)

    spent: list[float] = []
    parts = side_by_side(bench, {
        "read": (lambda: adapterspec.read_adapter(folder, check_tensors=False), None),
        "inject": (lambda: inject(model, adapter.config, "default", options),
                   lambda: adapterspec.delete_adapter(model, "default")),
        "inject+load_state": (load_state_alone, lambda: adapterspec.delete_adapter(model, "default"))}, repeats)
    bench.add("load", "  core read_adapter", parts["read"], "config, header (no data)")
    bench.add("load", "  torch inject", parts["inject"], "no init")
    bench.add("load", "  torch load_state", spent[1:], "read (not prefetched) + copy + views + assign")

    holder: dict[str, Any] = {}
    for label, extra in (("peft", {}), ("peft low_cpu_mem", {"low_cpu_mem_usage": True})):
        def peft_load(extra: dict[str, Any] = extra) -> None:
            holder["peft"] = PeftModel.from_pretrained(model, str(folder), **peft_kwargs(), **extra)

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peft_times = side_by_side(bench, {label: (peft_load, lambda: holder.pop("peft").unload())},
                                      max(3, repeats // 3))
        bench.add("load", label, peft_times[label], "PeftModel.from_pretrained")

    # the load is exact: every tensor bit for bit the file's, on the device
    adapterspec.load_adapter(model, folder)
    try:
        file = load_file(str(path))
        from adapterspec_torch.state import expected_params

        params = expected_params(model, "default")
        exact = params.keys() == file.keys() and all(p.device == bench.device for p in params.values()) and all(
            torch.equal(params[k].cpu(), file[k]) for k in file)
        print(f"load check: {len(params)} tensors on {bench.device}, bit-identical to the file: {exact}")
        if not exact:
            bench.failed.append("load check: not bit-identical")
    finally:
        adapterspec.delete_adapter(model, "default")


# -- save -----------------------------------------------------------------------------------------

def bench_save(bench: Bench, model: Any, folder: Path, work: Path) -> None:
    import adapterspec
    from peft import PeftModel
    from safetensors.torch import load_file, save_file

    cpu_tensors = load_file(str(folder / "adapter_model.safetensors"))
    adapterspec.load_adapter(model, folder)
    try:
        times = side_by_side(bench, {
            "raw": (lambda: save_file(cpu_tensors, str(work / "raw.safetensors"), metadata={"format": "pt"}), None),
            "adapterspec": (lambda: adapterspec.save_adapter(model, work / "ours", overwrite=True), None)},
            bench.repeats)
        from adapterspec import _safetensors
        from adapterspec_torch.state import extract_state

        on_device = extract_state(model, "default")[1]
        gather = side_by_side(bench, {"gather": (lambda: _safetensors._gathered_byte_views(on_device), None)},
                              bench.repeats)["gather"]
        saved = load_file(str(work / "ours" / "adapter_model.safetensors"))
        exact = saved.keys() == cpu_tensors.keys() and all(bench.torch.equal(saved[k], v)
                                                           for k, v in cpu_tensors.items())
        print(f"save check: the saved file holds the loaded tensors bit for bit: {exact}")
        if not exact:
            bench.failed.append("save check: not bit-identical")
    finally:
        adapterspec.delete_adapter(model, "default")
    bench.add("save", "raw save_file", times["raw"], "safetensors.torch.save_file of CPU tensors")
    bench.add("save", "adapterspec", times["adapterspec"], "save_adapter from the model on the device")
    bench.add("save", "  gather to host", gather, "one cat on the device, one copy to pinned memory (CPU: none)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = PeftModel.from_pretrained(model, str(folder), **peft_kwargs())
        try:
            peft_times = side_by_side(bench, {"peft": (lambda: peft_model.save_pretrained(str(work / "peft")), None)},
                                      max(3, bench.repeats // 3))
        finally:
            peft_model.unload()
    bench.add("save", "peft", peft_times["peft"], "save_pretrained")


# -- forward --------------------------------------------------------------------------------------

def bench_forward(bench: Bench, model: Any, folder: Path, shape: dict[str, Any]) -> None:
    import adapterspec
    from peft import PeftModel

    torch = bench.torch
    vocab = shape["config"]["vocab_size"]
    inputs = {name: (torch.arange(b * s, device=bench.device).reshape(b, s) * 7919) % vocab
              for name, (b, s) in (("prefill", shape["prefill"]), ("decode", shape["decode"]))}
    repeats = bench.repeats

    def forward(ids: Any) -> Callable[[], Any]:
        def run() -> Any:
            with torch.inference_mode():
                return model(input_ids=ids, use_cache=False).logits
        return run

    results: dict[str, dict[str, list[float]]] = {}
    outputs: dict[str, Any] = {}
    for impl in ("base", "adapterspec", "peft"):
        peft_model = None
        if impl == "adapterspec":
            adapterspec.load_adapter(model, folder)
        elif impl == "peft":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                peft_model = PeftModel.from_pretrained(model, str(folder), **peft_kwargs())
        try:
            results[impl] = side_by_side(bench, {name: (forward(ids), None) for name, ids in inputs.items()},
                                         repeats)
            outputs[impl] = forward(inputs["decode"])().float()
        finally:
            if impl == "adapterspec":
                adapterspec.delete_adapter(model, "default")
            elif peft_model is not None:
                peft_model.unload()
    for name in inputs:
        b, s = shape[name]
        for impl in ("base", "adapterspec", "peft"):
            bench.add(f"forward {name} {b}x{s}", impl, results[impl][name],
                      "unmerged LoRA" if impl != "base" else "no adapter")
    diff = (outputs["adapterspec"] - outputs["peft"]).abs().max().item()
    moved = (outputs["adapterspec"] - outputs["base"]).abs().max().item()
    print(f"forward check: |adapterspec - PEFT| max {diff:.3g} (bf16 rounding), |adapterspec - base| max {moved:.3g} "
          "(the adapter changes the logits)")


def bench_linear(bench: Bench, shape: dict[str, Any], dtype: Any) -> None:
    """One square Linear with a rank-16 LoRA: base, naive, ``addmm_``, adapterspec's layer, PEFT's layer."""
    import adapterspec
    from peft import LoraConfig, get_peft_model

    torch = bench.torch
    width = shape["linear"]
    scale = ALPHA / RANK

    class Holder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = torch.nn.Linear(width, width, bias=False, device=bench.device, dtype=dtype)

        def forward(self, x: Any) -> Any:
            return self.proj(x)

    generator = torch.Generator(device=bench.device).manual_seed(1)
    base = Holder().requires_grad_(False)
    a = (torch.randn(RANK, width, generator=generator, device=bench.device) / width ** 0.5).to(dtype)
    b = (torch.randn(width, RANK, generator=generator, device=bench.device) * 0.02).to(dtype)
    ours = Holder().requires_grad_(False)
    ours.load_state_dict(base.state_dict())
    adapterspec.inject_adapter(ours, {"peft_type": "LORA", "r": RANK, "lora_alpha": ALPHA, "target_modules": ["proj"]},
                               trainable=False)
    from adapterspec_torch.state import expected_params

    with torch.no_grad():
        params = expected_params(ours, "default")
        params["base_model.model.proj.lora_A.weight"].copy_(a)
        params["base_model.model.proj.lora_B.weight"].copy_(b)
    theirs = Holder().requires_grad_(False)
    theirs.load_state_dict(base.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        extra = {"autocast_adapter_dtype": False} if "autocast_adapter_dtype" in inspect.signature(
            get_peft_model).parameters else {}
        peft_model = get_peft_model(theirs, LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["proj"]), **extra)
    peft_layer = peft_model.base_model.model.proj
    with torch.no_grad():
        peft_layer.lora_A["default"].weight.copy_(a)
        peft_layer.lora_B["default"].weight.copy_(b)
    peft_model.eval()
    linear, our_layer = base.proj, ours.proj

    def naive(x: Any) -> Any:
        return linear(x) + (x @ a.T) @ b.T * scale

    def addmm(x: Any) -> Any:
        y = linear(x)
        y.view(-1, width).addmm_(x.view(-1, width) @ a.T, b.T, alpha=scale)
        return y

    impls = {"base": linear, "naive": naive, "addmm": addmm, "adapterspec": our_layer, "peft": peft_layer}
    inner = 50 if bench.cuda else 3
    for tokens in shape["tokens"]:
        x = torch.randn(tokens, width, generator=generator, device=bench.device).to(dtype)
        with torch.inference_mode():
            expected = naive(x).float()
            for label in ("addmm", "adapterspec", "peft"):
                diff = (impls[label](x).float() - expected).abs().max().item()
                if diff > 0.05:
                    print(f"linear check: {label} differs from the naive LoRA by {diff:.3g} at {tokens} tokens")
                    bench.failed.append(f"linear check {label}")

            def call(fn: Any) -> Callable[[], Any]:
                return lambda: fn(x)

            times = side_by_side(bench, {label: (call(fn), None) for label, fn in impls.items()},
                                 max(5, bench.repeats // 2), inner=inner)
        for label in impls:
            bench.add(f"linear {width}x{width} {tokens} tokens", label, times[label])


# -- report ---------------------------------------------------------------------------------------

def report(bench: Bench) -> str:
    lines = []
    tables = list(dict.fromkeys(r.table for r in bench.rows))
    for table in tables:
        rows = [r for r in bench.rows if r.table == table]
        ref_label = {"load": "ideal", "save": "raw save_file"}.get(table, "base")
        ref = bench.find(table, ref_label)
        lines.append(f"\n{table}  (x = median / median of '{ref_label}')")
        lines.append(f"  {'implementation':<22} {'median ms':>10} {'best ms':>10} {'x':>7}  note")
        for r in rows:
            ratio = f"{r.median / ref.median:.2f}" if ref is not None else "-"
            lines.append(f"  {r.label:<22} {r.median * 1e3:>10.3f} {r.best * 1e3:>10.3f} {ratio:>7}  {r.note}")
    return "\n".join(lines)


def verdicts(bench: Bench, shape: dict[str, Any]) -> list[str]:
    """The issue's targets, met or not (medians against medians of the same run)."""
    out = []

    def check(name: str, mine: Row | None, ref: Row | None, bound: float) -> None:
        if mine is None or ref is None:
            return
        for stat in ("median", "best"):
            ratio = getattr(mine, stat) / getattr(ref, stat)
            out.append(f"{name} <= {bound:.2f}x ({stat}): {ratio:.2f}x ({getattr(mine, stat) * 1e3:.2f} vs "
                       f"{getattr(ref, stat) * 1e3:.2f} ms) -> {'OK' if ratio <= bound else 'MISSED'}")

    check("load onto the device vs ideal", bench.find("load", "adapterspec"), bench.find("load", "ideal"), 1.25)
    check("save from the device vs raw save_file", bench.find("save", "adapterspec"),
          bench.find("save", "raw save_file"), 1.3)
    for name, bound in (("prefill", 1.10), ("decode", 1.35)):
        b, s = shape[name]
        table = f"forward {name} {b}x{s}"
        check(f"{table}: adapterspec vs base", bench.find(table, "adapterspec"), bench.find(table, "base"), bound)
        peft, base = bench.find(table, "peft"), bench.find(table, "base")
        if peft is not None and base is not None:
            out.append(f"{table}: PEFT vs base {peft.median / base.median:.2f}x (for comparison)")
    ours, peft = bench.find("load", "adapterspec"), bench.find("load", "peft")
    if ours is not None and peft is not None:
        out.append(f"load: {peft.median / ours.median:.1f}x faster than PEFT (median)")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:1, cpu")
    parser.add_argument("--tiny", action="store_true", help="a small model (hidden 256, 4 layers): a smoke run")
    parser.add_argument("--repeats", type=int, default=11, help="timed runs per operation (median and best)")
    parser.add_argument("--only", default="load,save,forward,linear", help="sections to run, comma-separated")
    args = parser.parse_args(argv)
    started = time.perf_counter()

    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("no CUDA device here: pass --device cpu (and --tiny)")
    bench = Bench(args.device, args.repeats)
    shape = SHAPES["tiny" if args.tiny else "7b"]
    dtype = torch.bfloat16
    sections = {s.strip() for s in args.only.split(",") if s.strip()}
    import adapterspec
    import peft
    import safetensors
    import transformers

    name = torch.cuda.get_device_name(bench.device) if bench.cuda else "cpu"
    print(f"device {bench.device} ({name}); python {sys.version.split()[0]}, torch {torch.__version__}, "
          f"transformers {transformers.__version__}, peft {peft.__version__}, safetensors {safetensors.__version__}, "
          f"adapterspec from {Path(adapterspec.__file__).parent}")
    root = Path(tempfile.mkdtemp(prefix="adapterspec-gpu-bench-"))
    try:
        model = build_model(bench, shape, dtype)
        folder, work = root / "adapter", root / "work"
        work.mkdir()
        tensors = write_adapter(bench, model, folder, dtype)
        print(f"model: Llama {shape['config']['num_hidden_layers']} layers, hidden {shape['config']['hidden_size']}, "
              f"intermediate {shape['config']['intermediate_size']}, {dtype}; adapter: LoRA r={RANK} on "
              f"{len(PROJECTIONS)} projections, {len(tensors)} tensors, "
              f"{(folder / 'adapter_model.safetensors').stat().st_size / 1e6:.1f} MB; "
              f"setup {time.perf_counter() - started:.1f} s; N={args.repeats}")
        del tensors
        for section, run in (("load", lambda: bench_load(bench, model, folder)),
                             ("save", lambda: bench_save(bench, model, folder, work)),
                             ("forward", lambda: bench_forward(bench, model, folder, shape)),
                             ("linear", lambda: bench_linear(bench, shape, dtype))):
            if section not in sections:
                continue
            begun = time.perf_counter()
            try:
                run()
            except Exception:  # reported, and the other sections still run: the device run is one try
                traceback.print_exc()
                bench.failed.append(section)
                for name_ in adapterspec.adapter_names(model):
                    adapterspec.delete_adapter(model, name_)
            print(f"[{section}: {time.perf_counter() - begun:.1f} s]", flush=True)
        print(report(bench))
        print()
        print("\n".join(verdicts(bench, shape)))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"\ntotal {time.perf_counter() - started:.1f} s" + (f"; FAILED: {bench.failed}" if bench.failed else ""))
    return 1 if bench.failed else 0


if __name__ == "__main__":
    sys.exit(main())
