"""One process of the sharded-model tests (tests/torch/test_distributed.py): FSDP2 and tensor parallelism
with the gloo backend on the CPU.

Run as ``python distributed_worker.py RANK WORLD PORT WORKDIR SCENARIO...``; each scenario reads its inputs
from WORKDIR (written by the test) and writes its results there (``<scenario>-rank<R>.pt``, saved folders).
The process group is always destroyed, and every collective has a timeout.
"""

from __future__ import annotations

import datetime
import sys
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

HIDDEN, FFN, HEADS = 16, 24, 4
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class Block(nn.Module):
    """A Llama-like block: multi-head attention (no rotary, no mask) and a gated MLP, all Linear layers.

    Heads are counted from the width of the local projections, so that a tensor-parallel block computes
    its own heads, as Llama's does under ``ColwiseParallel`` q/k/v and ``RowwiseParallel`` o.
    """

    def __init__(self) -> None:
        super().__init__()
        self.q_proj = nn.Linear(HIDDEN, HIDDEN, bias=False)
        self.k_proj = nn.Linear(HIDDEN, HIDDEN, bias=False)
        self.v_proj = nn.Linear(HIDDEN, HIDDEN, bias=False)
        self.o_proj = nn.Linear(HIDDEN, HIDDEN, bias=True)
        self.gate_proj = nn.Linear(HIDDEN, FFN, bias=False)
        self.up_proj = nn.Linear(HIDDEN, FFN, bias=True)
        self.down_proj = nn.Linear(FFN, HIDDEN, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        head_dim = HIDDEN // HEADS
        q, k, v = (p(x) for p in (self.q_proj, self.k_proj, self.v_proj))
        b, t = q.shape[:2]  # the whole sequence under sequence parallelism, whose x is this rank's part
        heads = q.shape[-1] // head_dim
        q, k, v = (z.view(b, t, heads, head_dim).transpose(1, 2) for z in (q, k, v))
        att = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, heads * head_dim)
        x = x + self.o_proj(att)
        return x + self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Tiny(nn.Module):
    """Two blocks (``layers.0``, ``layers.1``) and an output projection that is not adapted."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(HIDDEN, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        out: torch.Tensor = self.head(x)
        return out


def base_model(workdir: Path) -> Tiny:
    model = Tiny()
    model.load_state_dict(torch.load(workdir / "base.pt", weights_only=True))
    return model.eval()


def _fsdp(model: nn.Module) -> None:
    from torch.distributed.fsdp import fully_shard

    for layer in model.layers:  # type: ignore[union-attr]
        fully_shard(layer)
    fully_shard(model)


def _tp(model: nn.Module) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    plan = {"q_proj": ColwiseParallel(), "k_proj": ColwiseParallel(), "v_proj": ColwiseParallel(),
            "o_proj": RowwiseParallel(), "gate_proj": ColwiseParallel(), "up_proj": ColwiseParallel(),
            "down_proj": RowwiseParallel()}
    for layer in model.layers:  # type: ignore[union-attr]
        parallelize_module(layer, mesh, plan)


def _tp_plan(model: nn.Module, plan: str) -> None:
    """Other plans torch's styles allow: ``"sequence"`` (sequence parallel, torchtitan's Llama plan: inputs and outputs
    sharded on the sequence) or ``"replicated"`` (every output gathered whole, every input taken whole)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    if plan == "sequence":
        col, row = ColwiseParallel(input_layouts=Shard(1)), RowwiseParallel(output_layouts=Shard(1))
    else:
        col, row = ColwiseParallel(output_layouts=Replicate()), RowwiseParallel(input_layouts=Replicate())
    styles = {"q_proj": col, "k_proj": col, "v_proj": col, "o_proj": row, "gate_proj": col, "up_proj": col,
              "down_proj": row}
    for layer in model.layers:  # type: ignore[union-attr]
        parallelize_module(layer, mesh, styles)


def tp_plans(workdir: Path, rank: int) -> dict[str, Any]:
    """Load the PEFT folder into models under the other plans; each one's output, gathered whole."""
    import adapterspec

    x = torch.load(workdir / "inputs.pt", weights_only=True)[0][:, :4]
    out = {}
    for plan in ("sequence", "replicated"):
        model = base_model(workdir)
        _tp_plan(model, plan)
        adapterspec.load_adapter(model, workdir / "peft", "default")
        local = x.chunk(dist.get_world_size(), dim=1)[rank] if plan == "sequence" else x
        with torch.no_grad():
            y = model(local)
        if plan == "sequence":
            parts = [torch.empty_like(y) for _ in range(dist.get_world_size())]
            dist.all_gather(parts, y.contiguous())
            y = torch.cat(parts, dim=1)
        out[plan] = y
    return out


def _layouts(model: nn.Module) -> dict[str, Any]:
    """Adapter parameter name -> (placements as text, local shape, global shape)."""
    from torch.distributed.tensor import DTensor

    out = {}
    for name, param in model.named_parameters():
        if "adapter_weights" in name:
            assert isinstance(param, DTensor), name
            out[name] = ([repr(p) for p in param.placements], tuple(param.to_local().shape), tuple(param.shape))
    return out


def _no_whole_reads() -> None:
    """Make any read of the whole adapter file fail: a sharded load must read its slices only."""
    from adapterspec import _safetensors
    from adapterspec.adapter import Adapter

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the whole adapter file was read on a rank of a sharded model")

    Adapter.load_tensors = refuse  # type: ignore[method-assign]
    _safetensors.read_buffer = refuse
    _safetensors.read_buffer_in_background = refuse


def load_forward_save(workdir: Path, rank: int, parallel: str) -> dict[str, Any]:
    """Load the PEFT folder into the sharded model, run each rank's batch, save (every rank)."""
    import adapterspec

    model = base_model(workdir)
    (_fsdp if parallel == "fsdp" else _tp)(model)
    _no_whole_reads()
    adapterspec.load_adapter(model, workdir / "peft", "default")
    layouts = _layouts(model)
    inputs = torch.load(workdir / "inputs.pt", weights_only=True)
    x = inputs[rank] if parallel == "fsdp" else inputs[0]  # FSDP: data parallel; TP: the same batch
    with torch.no_grad():
        out = model(x)
    saved = adapterspec.save_adapter(model, workdir / f"saved-{parallel}-{dist.get_world_size()}")
    try:  # again, without overwrite: rank 0's error, and every other rank hears of it
        adapterspec.save_adapter(model, saved)
        again_error = ""
    except Exception as exc:  # noqa: BLE001 - its type is the result
        again_error = type(exc).__name__
    try:  # a path of each process's own: rank 0 writes its own; the others are told theirs was not written
        adapterspec.save_adapter(model, workdir / f"per-rank-{parallel}-{rank}")
        per_rank = ""
    except Exception as exc:  # noqa: BLE001 - its text is the result
        per_rank = f"{type(exc).__name__}: {exc}"
    # our own save back in, under another name (its recorded fingerprint is checked against the sharded base)
    adapterspec.load_adapter(model, saved, "again", strict=True)
    with torch.no_grad():
        again = model(x)
    return {"layouts": layouts, "out": out, "saved": str(saved), "again": again, "again_error": again_error,
            "per_rank": per_rank}


def refusals(workdir: Path, rank: int, parallel: str) -> dict[str, Any]:
    """DoRA and IA3 adapters on a sharded model are refused, so is merging, and the model is left as it was."""
    import adapterspec
    from adapterspec.errors import UnsupportedError

    model = base_model(workdir)
    (_fsdp if parallel == "fsdp" else _tp)(model)
    def whole(v: torch.Tensor) -> torch.Tensor:
        return v.full_tensor() if hasattr(v, "full_tensor") else v.clone()

    before = {k: whole(v) for k, v in model.state_dict().items()}
    errors = []
    for config in ({"peft_type": "LORA", "r": 2, "target_modules": ["q_proj"], "use_dora": True},
                   {"peft_type": "IA3", "target_modules": ["q_proj"], "feedforward_modules": []}):
        try:
            adapterspec.inject_adapter(model, config)
        except UnsupportedError as exc:
            errors.append(str(exc))
    adapterspec.inject_adapter(model, {"peft_type": "LORA", "r": 2, "target_modules": ["q_proj"]}, "plain")
    try:
        adapterspec.merge_adapters(model, "plain")
    except UnsupportedError as exc:
        errors.append(str(exc))
    adapterspec.delete_adapter(model, "plain")
    if parallel == "tp":  # dropout masks would differ between ranks holding the same activations
        adapterspec.inject_adapter(model, {"peft_type": "LORA", "r": 2, "target_modules": ["q_proj"],
                                           "lora_dropout": 0.1}, "dropping")
        model.train()
        try:
            model(torch.load(workdir / "inputs.pt", weights_only=True)[0])
        except UnsupportedError as exc:
            errors.append(str(exc))
        model.eval()
        adapterspec.delete_adapter(model, "dropping")
    after = {k: whole(v) for k, v in model.state_dict().items()}
    unchanged = list(before) == list(after) and all(torch.equal(before[k], after[k]) for k in before)
    return {"errors": errors, "unchanged": unchanged, "names": adapterspec.adapter_names(model)}


def _set_init(model: nn.Module, init: dict[str, torch.Tensor]) -> None:
    """Give the injected adapter the test's initial values (the same on every rank), by canonical key."""
    from adapterspec_torch.state import expected_params

    with torch.no_grad():
        for key, param in expected_params(model, "default").items():
            value = init[key]
            if hasattr(param, "device_mesh"):
                from torch.distributed.tensor import distribute_tensor

                param.to_local().copy_(distribute_tensor(value, param.device_mesh, param.placements).to_local())
            else:
                param.copy_(value)


def train(workdir: Path, rank: int, order: str) -> dict[str, Any]:
    """inject_adapter, then a few SGD steps under FSDP2 on this rank's batch, then save_adapter.

    :param order: ``"before"``: inject before ``fully_shard`` (FSDP2 manages the adapter), ``"after"``:
        inject into the sharded model (adapterspec shards the adapter and averages its gradients); ``"tp"``:
        inject into the tensor-parallel model, every rank on the whole batch.
    """
    import adapterspec

    spec = torch.load(workdir / "train.pt", weights_only=True)
    model = base_model(workdir)
    config = {"peft_type": "LORA", "r": 3, "lora_alpha": 6, "target_modules": TARGETS}
    if order == "before":
        adapterspec.inject_adapter(model, config)
        _set_init(model, spec["init"])
        _fsdp(model)
    elif order == "tp":
        _tp(model)
        adapterspec.inject_adapter(model, config)
        _set_init(model, spec["init"])
    else:
        _fsdp(model)
        adapterspec.inject_adapter(model, config)
        _set_init(model, spec["init"])
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.01)
    for step in range(spec["steps"]):
        x, y = spec["x"][step][rank], spec["y"][step][rank]
        if order == "tp":  # the same (whole) batch on every rank
            x, y = spec["x"][step].flatten(0, 1), spec["y"][step].flatten(0, 1)
        loss = F.mse_loss(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    saved = adapterspec.save_adapter(model, workdir / f"trained-{order}")
    return {"saved": str(saved), "trainable": len(params)}


def fsdp1(workdir: Path, rank: int) -> dict[str, Any]:
    """FSDP1 (``FullyShardedDataParallel``): an adapter added after wrapping is refused (FSDP1 would neither shard
    nor reduce it); one added before trains as FSDP1's own, but saving or merging its flat shards is refused outside
    ``summon_full_params``, and works inside it."""
    import adapterspec
    from adapterspec.errors import UnsupportedError
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    spec = torch.load(workdir / "train.pt", weights_only=True)
    config = {"peft_type": "LORA", "r": 3, "lora_alpha": 6, "target_modules": TARGETS}
    errors = []
    model = base_model(workdir)
    wrapped = FSDP(model, use_orig_params=True, device_id=torch.device("cpu"))
    try:
        adapterspec.inject_adapter(model, config)
    except UnsupportedError as exc:
        errors.append(str(exc))
    names_after_refusal = adapterspec.adapter_names(model)

    model = base_model(workdir)
    adapterspec.inject_adapter(model, config)
    _set_init(model, spec["init"])
    wrapped = FSDP(model, use_orig_params=True, device_id=torch.device("cpu"))
    x = spec["x"][0][rank]
    with torch.no_grad():
        before = wrapped(x)
    for call in (lambda: adapterspec.save_adapter(model, workdir / f"fsdp1-flat-{rank}"),
                 lambda: adapterspec.merge_adapters(model)):
        try:
            call()
        except UnsupportedError as exc:
            errors.append(str(exc))
    with torch.no_grad():
        after = wrapped(x)
    with FSDP.summon_full_params(wrapped):
        saved = str(adapterspec.save_adapter(model, workdir / "fsdp1-whole")) if rank == 0 else ""
    dist.barrier()
    return {"errors": errors, "names_after_refusal": names_after_refusal, "unchanged": bool(torch.equal(before, after)),
            "saved": saved, "flat_written": (workdir / f"fsdp1-flat-{rank}").exists()}


SCENARIOS = {
    "fsdp1": fsdp1,
    "tp-plans": tp_plans,
    "fsdp": lambda d, r: load_forward_save(d, r, "fsdp"),
    "tp": lambda d, r: load_forward_save(d, r, "tp"),
    "refuse-fsdp": lambda d, r: refusals(d, r, "fsdp"),
    "refuse-tp": lambda d, r: refusals(d, r, "tp"),
    "train-before": lambda d, r: train(d, r, "before"),
    "train-after": lambda d, r: train(d, r, "after"),
    "train-tp": lambda d, r: train(d, r, "tp"),
}


def main(argv: list[str]) -> int:
    rank, world, port, workdir = int(argv[0]), int(argv[1]), int(argv[2]), Path(argv[3])
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    status = 0
    try:
        for name in argv[4:]:
            try:
                result = SCENARIOS[name](workdir, rank)
            except BaseException:  # reported to the test, which shows it
                result = {"error": traceback.format_exc()}
                status = 1
            torch.save(result, workdir / f"{name}-{world}-rank{rank}.pt")
            if status:
                break
            dist.barrier()
    finally:
        dist.destroy_process_group()
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
