"""Peak memory per rank of loading a LoRA adapter into a sharded model (issue #19, SPEC.md 16).

Run it (not a test; CPU, gloo, each configuration in fresh processes)::

    PYTHONPATH=sdk:plugins .venv/bin/python benchmarks/bench_distributed.py            # 256 MB adapter
    PYTHONPATH=sdk:plugins .venv/bin/python benchmarks/bench_distributed.py --mb 64    # a smaller one

The base model: 8 ``Linear(4096, 4096)`` layers created on the meta device, sharded (FSDP2 ``fully_shard``
per layer, or tensor parallelism ``ColwiseParallel``) and then given memory (``to_empty``), so that no rank
ever holds a whole base weight. The adapter: LoRA on the 8 layers, its rank chosen to give ``--mb`` MB of
float32 (r = 1024: 256 MB). Per rank, the table shows the process's peak RSS during the load less its RSS
before it (Linux ``VmHWM`` after ``/proc/self/clear_refs`` was reset, minus ``VmRSS``) for

* ``adapterspec``: ``load_adapter(model, folder)``: each rank reads only its slices from the file;
* ``naive``: what a loader that is not shard-aware does -- the whole file read into memory on every rank
  (as the unsharded load reads it), then each rank's slices copied into the sharded parameters.

The RSS growth of a rank should be about its share of the adapter (1/world of it for FSDP2, B's half plus A
whole for column-parallel layers) for adapterspec, and the whole adapter plus that share for the naive load.
"""

from __future__ import annotations

import argparse
import datetime
import os
import resource
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["main"]

LAYERS, WIDTH = 8, 4096


def _status_mb(field: str) -> float:
    """``VmRSS`` (resident now) or ``VmHWM`` (its peak) of this process, MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # not Linux: the peak of the whole run


def _reset_peak() -> None:
    """Make ``VmHWM`` the current RSS (Linux: ``echo 5 > /proc/self/clear_refs``)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _model(parallel: str) -> Any:
    import torch
    import torch.distributed as dist
    from torch import nn

    with torch.device("meta"):
        model = nn.Sequential(*[nn.Linear(WIDTH, WIDTH, bias=False) for _ in range(LAYERS)])
    if parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in model:
            fully_shard(layer)
        fully_shard(model)
    else:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        parallelize_module(model, mesh, {str(i): ColwiseParallel() for i in range(LAYERS)})
    model.to_empty(device="cpu")
    return model


def _naive(model: Any, folder: Path) -> None:
    """Not shard-aware: ``load_adapter`` with its slice reader replaced by a read of the whole file on every
    rank (``Adapter.load_tensors``, the unsharded load's one read into memory), each rank's slices copied out
    of it. (``safetensors.torch.load_file`` would not do: its tensors are views of a lazily read memory map,
    so only the pages of the slices copied would be read.)"""
    from torch.distributed.tensor import DTensor

    import adapterspec
    from adapterspec_torch import distributed

    def read_whole(adapter: Any, places: dict[str, Any], device: Any) -> dict[str, Any]:
        whole = adapter.load_tensors("pt")
        out = {}
        for key, (mesh, placements) in places.items():
            region = distributed._local_region(tuple(whole[key].shape), mesh, placements)
            out[key] = DTensor.from_local(whole[key][region].clone(), mesh, list(placements),
                                          shape=whole[key].shape, stride=whole[key].stride())
        return out

    distributed.read_slices = read_whole  # type: ignore[assignment]
    adapterspec.load_adapter(model, folder)


def worker(rank: int, world: int, port: int, folder: Path, parallel: str, mode: str) -> None:
    import torch
    import torch.distributed as dist

    import adapterspec

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=300))
    try:
        model = _model(parallel)
        dist.barrier()
        _reset_peak()
        before = _status_mb("VmRSS")
        if mode == "adapterspec":
            adapterspec.load_adapter(model, folder)
        else:
            _naive(model, folder)
        peak = _status_mb("VmHWM")
        dist.barrier()
        print(f"RESULT {rank} {peak - before:.0f} {before:.0f}", flush=True)
    finally:
        dist.destroy_process_group()


def _adapter(folder: Path, mb: int) -> int:
    import numpy as np

    import adapterspec

    r = max(1, mb * 2**20 // (4 * LAYERS * 2 * WIDTH))
    rng = np.random.default_rng(0)
    tensors = {}
    for i in range(LAYERS):
        tensors[f"base_model.model.{i}.lora_A.weight"] = rng.standard_normal((r, WIDTH), dtype=np.float32)
        tensors[f"base_model.model.{i}.lora_B.weight"] = rng.standard_normal((WIDTH, r), dtype=np.float32)
    config = {"peft_type": "LORA", "r": r, "lora_alpha": r, "target_modules": [str(i) for i in range(LAYERS)]}
    adapterspec.write_adapter(folder, config, tensors)
    return r


def _run(world: int, folder: Path, parallel: str, mode: str) -> list[tuple[float, float]]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, __file__, "--worker", str(rank), str(world), str(port), str(folder),
                               parallel, mode], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              env={**os.environ, "OMP_NUM_THREADS": "1"}) for rank in range(world)]
    rows: dict[int, tuple[float, float]] = {}
    try:
        for proc in procs:
            out, _ = proc.communicate(timeout=600)
            for line in out.decode(errors="replace").splitlines():
                if line.startswith("RESULT "):
                    _, rank, grew, base = line.split()
                    rows[int(rank)] = (float(grew), float(base))
            if proc.returncode:
                raise RuntimeError(out.decode(errors="replace")[-3000:])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    return [rows[r] for r in range(world)]


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] == "--worker":
        rank, world, port = int(args[1]), int(args[2]), int(args[3])
        worker(rank, world, port, Path(args[4]), args[5], args[6])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=int, default=256, help="adapter size, MB of float32 (default 256)")
    parser.add_argument("--worlds", default="2,4", help="process counts (default 2,4)")
    options = parser.parse_args(args)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "adapter"
        r = _adapter(folder, options.mb)
        size = (folder / "adapter_model.safetensors").stat().st_size / 2**20
        print(f"adapter: LoRA r={r} on {LAYERS} Linear({WIDTH}, {WIDTH}): {size:.0f} MB on disk\n")
        print("| parallelism | ranks | load | peak RSS growth per rank (MB) | RSS before (MB) |")
        print("|---|---|---|---|---|")
        for world in (int(w) for w in options.worlds.split(",")):
            for parallel in ("fsdp", "colwise"):
                for mode in ("adapterspec", "naive"):
                    rows = _run(world, folder, parallel, mode)
                    grew = ", ".join(f"{g:.0f}" for g, _ in rows)
                    base = max(b for _, b in rows)
                    print(f"| {parallel} | {world} | {mode} | {grew} | {base:.0f} |", flush=True)


if __name__ == "__main__":
    main()
