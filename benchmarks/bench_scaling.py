"""Scaling: time against input size, where a quadratic step would show (issues #14 and #20).

Run it (not a test)::

    .venv/bin/python benchmarks/bench_scaling.py             # every table
    .venv/bin/python benchmarks/bench_scaling.py --quick     # the small sizes only

Tables (wall time, best of ``--repeats``; ``x`` is the ratio to the smallest size: linear growth shows the
size ratio, quadratic its square):

* ``target_modules`` entries (2k, 20k; one LoRA module per entry): ``write_adapter`` against the raw
  ``safetensors.numpy.save_file`` of the same tensors, and the torch ``inject_adapter`` into a model
  with those modules;
* model modules (3k, 30k, targeted by one entry): torch ``load_adapter`` against the raw
  ``safetensors.torch.load_file`` + ``load_state_dict``, and ``save_adapter`` against the raw ``save_file``;
* adapter size (2 MB to 2 GB of float32 LoRA on 64 ``Linear(4096, 4096)``, rank 1 to 1000: the same 128
  tensors, growing): torch ``load_adapter`` against ``safetensors.torch.load_file`` (which since 0.8 maps
  the file and reads nothing until first use) and against it plus a copy of each tensor, and ``save_adapter``
  against ``save_file``, with the ratio at each size (``--max-mb`` caps it; the base weights are left
  uninitialised, so only the adapter's pages are touched);
* ``rank_pattern`` keys (200, 2k, literal module names): ``validate_adapter``;
* manifest entries (500 to 4k): ``list_adapters``;
* a regular expression ``[a-z0-9._]*`` x k + ``X`` on a 60-character path: ``re`` against
  ``adapterspec._regex`` (``re`` is skipped past k = 8: seconds, then minutes).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["main"]


def best_of(call: Callable[[], Any], repeats: int, setup: Callable[[], Any] | None = None) -> float:
    """The shortest wall time of ``repeats`` calls (``setup`` runs before each, untimed)."""
    times = []
    for _ in range(repeats):
        if setup is not None:
            setup()
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return min(times)


def table(title: str, rows: list[tuple[str, int, float]]) -> None:
    """Print ``(operation, size, seconds)`` rows, with each operation's ratio to its smallest size."""
    print(f"\n{title}\n{'operation':<38}{'size':>8}{'seconds':>11}{'x':>8}")
    first: dict[str, float] = {}
    for operation, size, seconds in rows:
        base = first.setdefault(operation, seconds)
        print(f"{operation:<38}{size:>8}{seconds:>11.4f}{seconds / base:>8.1f}")


def lora_tensors(modules: list[str]) -> dict[str, np.ndarray]:
    a, b = np.ones((1, 4), np.float32), np.ones((4, 1), np.float32)
    out = {}
    for module in modules:
        out[f"base_model.model.{module}.lora_A.weight"] = a
        out[f"base_model.model.{module}.lora_B.weight"] = b
    return out


def torch_model(modules: list[str]) -> Any:
    """A torch model holding a ``Linear(4, 4)`` at each dotted path (built on the meta device, then emptied)."""
    import torch

    root = torch.nn.Module()
    with torch.device("meta"):
        for path in modules:
            parent = root
            *parents, leaf = path.split(".")
            for name in parents:
                child = parent._modules.get(name)
                if child is None:
                    child = torch.nn.Module()
                    parent.add_module(name, child)
                parent = child
            parent.add_module(leaf, torch.nn.Linear(4, 4))
    return root.to_empty(device="cpu")


def bench_target_entries(sizes: list[int], repeats: int, tmp: Path) -> list[tuple[str, int, float]]:
    import adapterspec
    from safetensors.numpy import save_file

    rows = []
    for n in sizes:
        modules = [f"model.layers.{i // 8}.block.{i % 8}.proj" for i in range(n)]
        config = {"peft_type": "LORA", "r": 1, "lora_alpha": 1, "target_modules": modules}
        tensors = lora_tensors(modules)
        rows.append(("raw save_file", n, best_of(lambda: save_file(tensors, str(tmp / "raw.safetensors")), repeats)))
        rows.append(("write_adapter", n, best_of(
            lambda: adapterspec.write_adapter(tmp / f"t{n}", config, tensors, overwrite=True), repeats)))
        try:
            model = torch_model(modules)
        except ImportError:
            continue
        rows.append(("inject_adapter (torch)", n, best_of(
            lambda: adapterspec.inject_adapter(model, config), repeats,
            setup=lambda: adapterspec.adapter_names(model) and adapterspec.delete_adapter(model, "default"))))
    return rows


def bench_model_modules(sizes: list[int], repeats: int, tmp: Path) -> list[tuple[str, int, float]]:
    import adapterspec

    try:
        import torch
        from safetensors.torch import load_file, save_file
    except ImportError:
        return []
    rows = []
    for n in sizes:
        modules = [f"model.layers.{i // 10}.mlp.experts.{i % 10}.up_proj" for i in range(n)]
        config = {"peft_type": "LORA", "r": 1, "lora_alpha": 1, "target_modules": ["up_proj"]}
        adapterspec.write_adapter(tmp / f"m{n}", config, lora_tensors(modules), overwrite=True)
        model = torch_model(modules)

        def unload() -> None:
            if adapterspec.adapter_names(model):
                adapterspec.delete_adapter(model, "default")

        raw = {k.removeprefix("base_model.model."): torch.from_numpy(v.copy()) for k, v in lora_tensors(modules).items()}
        save_file(raw, str(tmp / f"raw{n}.safetensors"))
        rows.append(("raw load_file", n, best_of(lambda: load_file(str(tmp / f"raw{n}.safetensors")), repeats)))
        rows.append(("load_adapter (torch)", n, best_of(
            lambda: adapterspec.load_adapter(model, tmp / f"m{n}"), repeats, setup=unload)))
        rows.append(("raw save_file", n, best_of(lambda: save_file(raw, str(tmp / "raw_out.safetensors")), repeats)))
        rows.append(("save_adapter (torch)", n, best_of(
            lambda: adapterspec.save_adapter(model, tmp / f"s{n}", overwrite=True), repeats)))
        unload()
    return rows


def bench_adapter_size(sizes_mb: list[int], repeats: int, tmp: Path) -> list[tuple[str, int, float]]:
    """Load and save against raw safetensors as the adapter grows (fixed module count, growing rank); each size's
    ``ours / raw`` ratio is a row too (``x`` of a ratio row: how that ratio moves with size)."""
    import adapterspec

    try:
        import torch
        from safetensors.torch import load_file, save_file
    except ImportError:
        return []
    hidden, layers = 4096, 64
    modules = [f"model.layers.{i}.proj" for i in range(layers)]
    with torch.device("meta"):
        model = torch.nn.ModuleDict({"model": torch.nn.ModuleDict({"layers": torch.nn.ModuleList(
            torch.nn.ModuleDict({"proj": torch.nn.Linear(hidden, hidden, bias=False)}) for _ in range(layers))})})
    model = model.to_empty(device="cpu")  # uninitialised: 4 GiB of address space, no page touched
    rows: list[tuple[str, int, float]] = []
    for mb in sizes_mb:
        rank = max(1, round(mb * 2**20 / (2 * hidden * layers * 4)))
        generator = torch.Generator().manual_seed(rank)
        raw = {}
        for module in modules:
            raw[f"base_model.model.{module}.lora_A.weight"] = torch.rand(rank, hidden, generator=generator)
            raw[f"base_model.model.{module}.lora_B.weight"] = torch.rand(hidden, rank, generator=generator)
        size = round(sum(t.nbytes for t in raw.values()) / 2**20)
        folder = tmp / f"size{size}"
        adapterspec.write_adapter(folder, {"peft_type": "LORA", "r": rank, "lora_alpha": rank,
                                           "target_modules": ["proj"]}, raw, overwrite=True)
        weights = str(folder / "adapter_model.safetensors")
        del raw

        def unload() -> None:
            if adapterspec.adapter_names(model):
                adapterspec.delete_adapter(model, "default")

        reps = repeats if size < 1000 else max(1, repeats // 2)  # a 2 GB save takes seconds; a load does not
        load_raw = best_of(lambda: load_file(weights), repeats)
        load_copy = best_of(lambda: {k: v.clone() for k, v in load_file(weights).items()}, repeats)
        load_ours = best_of(lambda: adapterspec.load_adapter(model, folder), repeats, setup=unload)
        tensors = load_file(weights)
        out = tmp / "saved"
        save_raw = best_of(lambda: save_file(tensors, str(tmp / "raw_out.safetensors")), reps)
        save_ours = best_of(lambda: adapterspec.save_adapter(model, out, overwrite=True), reps)
        rows += [("raw load_file (maps, reads nothing)", size, load_raw), ("raw load_file + copy", size, load_copy),
                 ("load_adapter (torch)", size, load_ours),
                 ("  load ratio (ours / raw + copy)", size, load_ours / load_copy),
                 ("raw save_file", size, save_raw), ("save_adapter (torch)", size, save_ours),
                 ("  save ratio (ours / raw)", size, save_ours / save_raw)]
        del tensors
        unload()
        for leftover in (folder, out):
            shutil.rmtree(leftover, ignore_errors=True)
    return rows


def bench_rank_pattern(sizes: list[int], repeats: int, tmp: Path) -> list[tuple[str, int, float]]:
    import adapterspec

    rows = []
    for n in sizes:
        modules = [f"model.layers.{i}.self_attn.q_proj" for i in range(n)]
        config = {"peft_type": "LORA", "r": 1, "lora_alpha": 1, "target_modules": ["q_proj"],
                  "rank_pattern": {m: 1 for m in modules}}
        adapterspec.write_adapter(tmp / f"r{n}", config, lora_tensors(modules), overwrite=True)
        rows.append(("validate_adapter", n, best_of(lambda: adapterspec.validate_adapter(tmp / f"r{n}"), repeats)))
    return rows


def bench_manifest(sizes: list[int], repeats: int, tmp: Path) -> list[tuple[str, int, float]]:
    import adapterspec

    rows = []
    for n in sizes:
        folder = tmp / f"manifest{n}"
        for i in range(n):
            (folder / f"a{i}").mkdir(parents=True, exist_ok=True)
            (folder / f"a{i}" / "adapter_config.json").write_text("{}")
        entries = {f"a{i}": {"path": f"a{i}"} for i in range(n)}
        (folder / "adapterspec.json").write_text(json.dumps({"adapterspec_version": "1.0", "adapters": entries}))
        rows.append(("list_adapters", n, best_of(lambda: adapterspec.list_adapters(folder), repeats)))
    return rows


def bench_regex(groups: list[int], repeats: int) -> list[tuple[str, int, float]]:
    from adapterspec._regex import compile_pattern

    path = "model.layers.0.self_attn.q_proj.lora_A.weight.aaaaaaaaaaaaaaa"
    rows = []
    for k in groups:
        pattern = "[a-z0-9._]*" * k + "X"
        if k <= 8:
            rows.append(("re.fullmatch", k, best_of(lambda: re.fullmatch(pattern, path), repeats)))
        compiled = compile_pattern(pattern)
        rows.append(("adapterspec fullmatch (first)", k, best_of(lambda: compile_pattern.cache_clear() or
                                                                 compile_pattern(pattern).fullmatch(path), 1)))
        rows.append(("adapterspec fullmatch (again)", k, best_of(lambda: compiled.fullmatch(path), repeats)))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="the small sizes only")
    parser.add_argument("--max-mb", type=int, default=2048, help="the largest adapter of the size table (MB)")
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    quick = args.quick
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        table("target_modules entries (one LoRA module each)",
              bench_target_entries([2000] if quick else [2000, 20000], args.repeats, tmp))
        table("model modules (one target_modules entry)",
              bench_model_modules([3000] if quick else [3000, 30000], args.repeats, tmp))
        sizes = [mb for mb in ([2, 20] if quick else [2, 20, 200, 2048]) if mb <= args.max_mb]
        table("adapter size, MB (64 modules, rank grows; ratio rows: ours / raw at that size)",
              bench_adapter_size(sizes, args.repeats, tmp))
        table("rank_pattern keys (literal module names)",
              bench_rank_pattern([200] if quick else [200, 2000], args.repeats, tmp))
        table("manifest entries", bench_manifest([500] if quick else [500, 1000, 2000, 4000], args.repeats, tmp))
        table("[a-z0-9._]* x k + X on a 60-character path",
              bench_regex([4, 6, 8] if quick else [4, 6, 8, 16, 64], args.repeats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
