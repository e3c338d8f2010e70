"""Adapters on sharded torch models (SPEC.md 16): FSDP2 and tensor parallelism, 2 and 4 gloo processes on the CPU.

The processes run ``distributed_worker.py``; this module prepares their inputs -- a tiny Llama-like model, a
LoRA folder saved by PEFT with element-unique values, PEFT's outputs on every rank's batch, the
single-process save -- and compares their results with PEFT's and with the single-process ones. Every run
has a deadline (the workers' collectives time out after 60 s, the run after 120 s) and destroys its
process group.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")
if not torch.distributed.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)

import distributed_worker as worker  # noqa: E402
from torch_helpers import unique_values  # noqa: E402

import adapterspec  # noqa: E402
from adapterspec.naming import make_key  # noqa: E402

pytestmark = pytest.mark.distributed

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(worker.__file__).resolve()
RANK_SCENARIOS = ["fsdp", "tp", "refuse-fsdp", "refuse-tp", "train-before", "train-after", "train-tp", "fsdp1", "tp-plans"]
STEPS = 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run(workdir: Path, world: int, scenarios: list[str]) -> dict[str, list[dict[str, Any]]]:
    """Run the scenarios on ``world`` processes; their results by scenario, rank by rank."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "sdk"), str(ROOT / "plugins"),
                                                        os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(rank), str(world), str(port), str(workdir),
                               *scenarios], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for rank in range(world)]
    logs = []
    try:
        for proc in procs:
            out, _ = proc.communicate(timeout=120)
            logs.append(out.decode(errors="replace"))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    results: dict[str, list[dict[str, Any]]] = {}
    for name in scenarios:
        ranks = []
        for rank in range(world):
            path = workdir / f"{name}-{world}-rank{rank}.pt"
            assert path.exists(), f"{name} gave no result on rank {rank}:\n" + "\n".join(logs)
            result = torch.load(path, weights_only=True)
            assert "error" not in result, f"{name}, rank {rank}:\n{result['error']}"
            ranks.append(result)
        results[name] = ranks
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)
    return results


def _peft_folder(base: Any, folder: Path, r: int) -> Any:
    """A LoRA (with ``lora_bias``) on every Linear of the blocks, saved by PEFT with element-unique values."""
    import copy

    from peft import LoraConfig, get_peft_model
    from torch_helpers import fill_adapter_weights

    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=worker.TARGETS, lora_bias=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(copy.deepcopy(base), config)
    fill_adapter_weights(peft_model, salt=5, scale=0.2)
    peft_model.save_pretrained(str(folder))
    return peft_model.eval()


def _prepare(workdir: Path, world: int) -> dict[str, Any]:
    torch.manual_seed(0)
    base = worker.Tiny().eval()
    torch.save(base.state_dict(), workdir / "base.pt")
    peft_model = _peft_folder(base, workdir / "peft", r=3)
    inputs = torch.stack([unique_values((2, 5, worker.HIDDEN), 40 + rank, scale=1.0) for rank in range(world)])
    torch.save(inputs, workdir / "inputs.pt")
    with torch.no_grad():
        peft_out = [peft_model(x) for x in inputs]
    single = worker.base_model(workdir)
    adapterspec.load_adapter(single, workdir / "peft")
    with torch.no_grad():
        ours_out = [single(x) for x in inputs]
    adapterspec.save_adapter(single, workdir / "single")
    return {"peft_out": peft_out, "ours_out": ours_out, "peft_model": peft_model}


def _prepare_training(workdir: Path, world: int) -> dict[str, torch.Tensor]:
    """Initial adapter values, each rank's batches; the same training unsharded (full batch), saved."""
    import torch.nn.functional as F

    config = {"peft_type": "LORA", "r": 3, "lora_alpha": 6, "target_modules": worker.TARGETS}
    model = worker.base_model(workdir)
    adapterspec.inject_adapter(model, config)
    from adapterspec_torch.state import expected_params

    params = expected_params(model, "default")
    init = {key: unique_values(tuple(p.shape), i, scale=0.3) for i, (key, p) in enumerate(sorted(params.items()))}
    with torch.no_grad():
        for key, p in params.items():
            p.copy_(init[key])
    xs = torch.stack([torch.stack([unique_values((2, 5, worker.HIDDEN), 100 + 10 * s + r, scale=1.0)
                                   for r in range(world)]) for s in range(STEPS)])
    ys = torch.stack([torch.stack([unique_values((2, 5, 8), 300 + 10 * s + r, scale=1.0)
                                   for r in range(world)]) for s in range(STEPS)])
    torch.save({"init": init, "x": xs, "y": ys, "steps": STEPS}, workdir / "train.pt")
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=0.01)
    for s in range(STEPS):  # the full batch: every rank's, one mean (= the mean of the ranks' means)
        loss = F.mse_loss(model(xs[s].flatten(0, 1)), ys[s].flatten(0, 1))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    adapterspec.save_adapter(model, workdir / "trained-single")
    return init


@pytest.fixture(scope="module")
def two(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    workdir = tmp_path_factory.mktemp("dist2")
    refs = _prepare(workdir, 2)
    init = _prepare_training(workdir, 2)
    return {"dir": workdir, "refs": refs, "init": init, "results": _run(workdir, 2, RANK_SCENARIOS)}


def _bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


@pytest.mark.parametrize("parallel", ["fsdp", "tp"])
def test_sharded_forward_equals_peft(two: dict[str, Any], parallel: str) -> None:
    """Every rank's output (FSDP2: its own batch; TP: the same batch) equals PEFT's on the unsharded model."""
    refs = two["refs"]
    for rank, result in enumerate(two["results"][parallel]):
        batch = rank if parallel == "fsdp" else 0
        print(f"{parallel} rank {rank}: max abs diff vs PEFT {_max_diff(result['out'], refs['peft_out'][batch]):.3g}")
        assert _max_diff(result["out"], refs["peft_out"][batch]) <= 1e-6
        assert _max_diff(result["out"], refs["ours_out"][batch]) <= 1e-6
        assert torch.equal(result["again"], result["out"])  # our sharded save, loaded back (strict base check)
        with torch.no_grad():
            plain = worker.base_model(two["dir"])(torch.load(two["dir"] / "inputs.pt")[batch])
        assert _max_diff(result["out"], plain) > 1e-2  # the adapter changes the output


def test_fsdp_adapter_parameters_are_sharded_like_fsdp2_shards(two: dict[str, Any]) -> None:
    """Shard(0) on the mesh, each rank its torch.chunk slice of dim 0 (r=3 on 2 ranks: 2 and 1 rows)."""
    for rank, result in enumerate(two["results"]["fsdp"]):
        layouts = result["layouts"]
        assert len(layouts) == 2 * 7 * 3  # 2 blocks, 7 Linear layers, A, B and B's bias (of "default")
        for name, (placements, local, shape) in layouts.items():
            assert placements == ["Shard(dim=0)"], name
            chunks = torch.empty(shape).chunk(2, dim=0)
            assert local == (tuple(chunks[rank].shape) if rank < len(chunks) else (0, *shape[1:])), name


def test_tp_adapter_parameters_follow_the_base_layout(two: dict[str, Any]) -> None:
    """Column-parallel base: lora_B (and its bias) Shard(0), lora_A replicated; row-parallel: lora_A Shard(1)."""
    colwise = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
    for result in two["results"]["tp"]:
        layouts = result["layouts"]
        assert len(layouts) == 2 * 7 * 3
        for name, (placements, local, shape) in layouts.items():
            is_b = "lora_B" in name
            if any(f".{m}." in name for m in colwise):
                expected = ["Shard(dim=0)"] if is_b else ["Replicate()"]
            else:
                expected = ["Replicate()"] if is_b else ["Shard(dim=1)"]
            assert placements == expected, name
            if expected == ["Shard(dim=1)"]:
                assert local == (shape[0], shape[1] // 2), name
            elif expected == ["Shard(dim=0)"]:
                assert local == (shape[0] // 2, *shape[1:]), name


@pytest.mark.parametrize("parallel", ["fsdp", "tp"])
def test_sharded_save_is_the_single_process_save_byte_for_byte(two: dict[str, Any], parallel: str) -> None:
    """Every rank called save_adapter; rank 0 wrote one folder, equal to the unsharded model's save."""
    results = two["results"][parallel]
    saved = {r["saved"] for r in results}
    assert len(saved) == 1
    # saving over it without overwrite: rank 0's AdapterExistsError, raised on every rank
    assert [r["again_error"] for r in results] == ["AdapterExistsError", "AdapterExistsError"]
    ours, single = _bytes(Path(saved.pop())), _bytes(two["dir"] / "single")
    assert list(ours) == list(single) and ours == single


@pytest.mark.parametrize("parallel", ["fsdp", "tp"])
def test_sharded_save_to_a_path_per_process_is_refused_where_not_written(two: dict[str, Any], parallel: str) -> None:
    """Rank 0 writes; a process that named another folder returned rank 0's path as if its own were written."""
    first, second = two["results"][parallel]
    assert first["per_rank"] == ""
    assert second["per_rank"].startswith("UnsupportedError") and "asked for another folder" in second["per_rank"]
    assert (two["dir"] / f"per-rank-{parallel}-0").is_dir() and not (two["dir"] / f"per-rank-{parallel}-1").exists()


def test_sharded_save_loads_in_peft_without_missing_keys(two: dict[str, Any]) -> None:
    """The folder saved from the sharded model loads in PEFT: no missing or unexpected key, the same outputs."""
    from peft import PeftModel, get_peft_model_state_dict

    base = worker.base_model(two["dir"])
    folder = two["dir"] / "saved-fsdp-2"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(base, str(folder)).eval()
    # PEFT warns that lora_bias on a layer without a bias cannot be merged: its own folder gets the same warning
    assert [str(w.message) for w in caught if "has no bias" not in str(w.message)] == []
    state = get_peft_model_state_dict(model)
    stored = adapterspec.read_adapter(folder).load_tensors("pt")
    assert sorted(state) == sorted(stored)
    assert all(torch.equal(state[k], stored[k]) for k in stored)
    inputs = torch.load(two["dir"] / "inputs.pt")
    with torch.no_grad():
        assert _max_diff(model(inputs[1]), two["refs"]["peft_out"][1]) == 0.0


@pytest.mark.parametrize("parallel", ["fsdp", "tp"])
def test_unsupported_adapters_are_refused_on_sharded_models(two: dict[str, Any], parallel: str) -> None:
    """DoRA, IA3 and merging are refused (the model left as it was); so is LoRA dropout while training under TP."""
    for result in two["results"][f"refuse-{parallel}"]:
        assert len(result["errors"]) == (4 if parallel == "tp" else 3), result["errors"]
        assert "DoRA" in result["errors"][0] and "q_proj" in result["errors"][0]
        assert "IA3" in result["errors"][1]
        assert "merging into a sharded layer" in result["errors"][2]
        if parallel == "tp":
            assert "dropout while training under tensor parallelism" in result["errors"][3]
        assert result["unchanged"] and result["names"] == []


@pytest.mark.parametrize("plan", ["sequence", "replicated"])
def test_tensor_parallel_plans_with_other_layouts_equal_peft(two: dict[str, Any], plan: str) -> None:
    """Plans whose layers take or hand on other layouts than the styles' defaults: sequence parallel
    (``ColwiseParallel(input_layouts=Shard(1))``, ``RowwiseParallel(output_layouts=Shard(1))``) and replicated
    outputs/inputs. The LoRA delta assumed the defaults: off PEFT by 1.45 silently, or a raw RuntimeError."""
    x = torch.load(two["dir"] / "inputs.pt", weights_only=True)[0][:, :4]
    with torch.no_grad():
        want = two["refs"]["peft_model"](x)
    for result in two["results"]["tp-plans"]:
        assert result[plan].shape == want.shape
        assert _max_diff(result[plan], want) < 1e-5, _max_diff(result[plan], want)


def test_fsdp1_adapters_are_refused_where_its_flat_shards_would_be_wrong(two: dict[str, Any]) -> None:
    """FSDP1 was not recognised: an adapter loaded after wrapping trained per process (the ranks' adapters 0.057
    apart after 3 AdamW steps); saving its flat shards failed with a wrong fix, a merge raised a raw RuntimeError and
    changed the outputs (0.11). Now refused, the model unchanged; inside ``summon_full_params`` the save is whole."""
    for result in two["results"]["fsdp1"]:
        adding, saving, merging = result["errors"]
        assert "FSDP1 (FullyShardedDataParallel) manages this layer" in adding and "layers.0.q_proj" in adding
        assert "flat shard of the adapter's tensors" in saving and "summon_full_params" in saving
        assert "merging into a weight FSDP1 (FullyShardedDataParallel) holds" in merging
        assert result["names_after_refusal"] == [] and result["unchanged"] and not result["flat_written"]
    saved = adapterspec.read_adapter(two["results"]["fsdp1"][0]["saved"]).load_tensors("torch")
    init = two["init"]
    assert sorted(saved) == sorted(init)
    for key, value in init.items():
        assert torch.equal(saved[key], value), key


@pytest.mark.parametrize("order", ["before", "after", "tp"])
def test_sharded_training_equals_unsharded_training(two: dict[str, Any], order: str) -> None:
    """inject_adapter + 3 SGD steps under FSDP2 (each rank its half of the batch; adapter injected before or
    after fully_shard) or tensor parallelism (the whole batch on each rank) + save_adapter gives the adapter
    the same steps give unsharded on the whole batch, within the reduction order's rounding."""
    from adapterspec import read_adapter

    trained = read_adapter(two["dir"] / f"trained-{order}").load_tensors("pt")
    single = read_adapter(two["dir"] / "trained-single").load_tensors("pt")
    assert sorted(trained) == sorted(single) == sorted(two["init"])
    moved = max(_max_diff(single[k], two["init"][k]) for k in single)
    assert moved > 1e-3  # the training changed the adapter
    worst = max(_max_diff(trained[k], single[k]) for k in single)
    print(f"max abs diff, {order}: {worst:.3g} (training moved the adapter by {moved:.3g})")
    assert worst <= 1e-5, worst
    assert two["results"][f"train-{order}"][0]["trainable"] > 0


def test_four_processes_uneven_shards(tmp_path: Path) -> None:
    """r=3 over 4 ranks: rank 3 holds an empty slice of every LoRA A; forward and save still exact."""
    refs = _prepare(tmp_path, 4)
    results = _run(tmp_path, 4, ["fsdp"])["fsdp"]
    for rank, result in enumerate(results):
        assert _max_diff(result["out"], refs["peft_out"][rank]) <= 1e-6
        a = next(v for k, v in result["layouts"].items() if "lora_A" in k)
        assert a[1][0] == (0 if rank == 3 else 1)
    assert _bytes(Path(results[0]["saved"])) == _bytes(tmp_path / "single")


def test_keys_cover_every_adapted_module(two: dict[str, Any]) -> None:
    """The saved folder has exactly PEFT's keys (A, B, B's bias of each of the 14 adapted layers)."""
    keys = set(adapterspec.read_adapter(two["dir"] / "saved-tp-2").tensors)
    expected = {make_key(f"layers.{i}.{m}", p) for i in range(2) for m in worker.TARGETS
                for p in ("lora_A.weight", "lora_B.weight", "lora_B.bias")}
    assert keys == expected


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_slices_are_read_alone_from_the_file(tmp_path: Path, dtype: Any) -> None:
    """Row blocks, column blocks, empty and whole regions of 1-D and 2-D tensors, read by offset, equal the
    tensor's slices (element-unique values: a wrong offset or stride cannot pass)."""
    from safetensors.torch import save_file

    from adapterspec_torch.distributed import _pread_region

    tensors = {"a": unique_values((5, 7), 1, scale=3.0).to(dtype), "b": unique_values((9,), 2, scale=3.0).to(dtype)}
    save_file(tensors, str(tmp_path / "t.safetensors"))
    header = adapterspec._safetensors.read_header(tmp_path / "t.safetensors")
    regions = {"a": [(slice(0, 5), slice(0, 7)), (slice(1, 4), slice(0, 7)), (slice(0, 5), slice(2, 6)),
                     (slice(3, 5), slice(6, 7)), (slice(2, 2), slice(0, 7))],
               "b": [(slice(0, 9),), (slice(4, 9),), (slice(9, 9),)]}
    with open(tmp_path / "t.safetensors", "rb") as fh:
        for key, cases in regions.items():
            for region in cases:
                got = _pread_region(fh.fileno(), header.spans[key][0], tuple(tensors[key].shape), dtype, region)
                assert got.dtype == dtype and torch.equal(got, tensors[key][region]), (key, region)
