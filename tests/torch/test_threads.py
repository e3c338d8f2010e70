"""One torch model, several threads: adapterspec's calls on it are serialised (``adapterspec.model_lock``).

Eight threads load, merge, unmerge, switch and delete their own adapters on one tiny Llama at once (the
interpreter switching threads every 10 us); afterwards the model holds exactly the adapters a sequential
run leaves, in every layer, with the sequential run's outputs, and unloads to the base model.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

import adapterspec  # noqa: E402
from tolerance import fp32_tolerance  # noqa: E402
from torch_helpers import LENGTH, assert_close, fresh, logits, unique_values  # noqa: E402

THREADS = 8
ROUNDS = 4
TIMEOUT_S = 120
PREFIX = "base_model.model."


def _targets(i: int) -> list[str]:
    return ["q_proj", "v_proj"] if i % 2 else ["k_proj", "o_proj", "up_proj"]


@pytest.fixture(scope="module")
def folders(llama: Any, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """One LoRA folder per thread, element-unique values; odd and even threads adapt different modules."""
    root = tmp_path_factory.mktemp("threads")
    modules = dict(llama.named_modules())
    out = []
    for i in range(THREADS):
        tensors = {}
        for name, module in modules.items():
            if name.rpartition(".")[2] in _targets(i):
                tensors[f"{PREFIX}{name}.lora_A.weight"] = unique_values((2, module.in_features), 10 * i + 1)
                tensors[f"{PREFIX}{name}.lora_B.weight"] = unique_values((module.out_features, 2), 10 * i + 2)
        config = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": _targets(i)}
        out.append(adapterspec.write_adapter(root / f"t{i}", config, tensors))
    return out


@pytest.fixture
def fast_switching() -> Iterator[None]:
    """Make the interpreter switch threads every 10 us, so that unserialised calls interleave."""
    previous = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    try:
        yield
    finally:
        sys.setswitchinterval(previous)


def _run_threads(work: Callable[[int], None]) -> list[BaseException]:
    """Run ``work(i)`` on THREADS threads started together; every thread must finish within TIMEOUT_S."""
    errors: list[BaseException] = []
    barrier = threading.Barrier(THREADS)

    def run(i: int) -> None:
        try:
            barrier.wait(timeout=TIMEOUT_S)
            work(i)
        except BaseException as exc:  # noqa: BLE001 - collected and asserted on by the test
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,), daemon=True, name=f"adapterspec-test-{i}")
               for i in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=TIMEOUT_S)
    assert not any(t.is_alive() for t in threads), "a thread did not finish in time (deadlock?)"
    return errors


def test_eight_threads_on_one_model_end_as_a_sequential_run(llama: Any, folders: list[Path],
                                                            token_inputs: dict[str, Any],
                                                            fast_switching: None) -> None:
    model = fresh(llama)
    names = [f"t{i}" for i in range(THREADS)]

    def work(i: int) -> None:
        name = names[i]
        for last in [False] * (ROUNDS - 1) + [True]:
            adapterspec.load_adapter(model, folders[i], name, activate=False)
            assert name in adapterspec.adapter_names(model)
            with adapterspec.model_lock(model):  # merging the active adapters: no other thread's switch in between
                adapterspec.set_active_adapters(model, [name])
                adapterspec.merge_adapters(model, name)
            adapterspec.unmerge_adapters(model)
            with adapterspec.model_lock(model):  # a step of several calls: no other thread's call in between
                others = [n for n in adapterspec.adapter_names(model) if n != name]
                adapterspec.set_active_adapters(model, [name, *others])
                active = adapterspec.active_adapters(model)
            assert active == [name, *others]
            if not last:
                adapterspec.delete_adapter(model, name)

    errors = _run_threads(work)
    assert not errors, errors

    reference = fresh(llama)
    for i, folder in enumerate(folders):
        adapterspec.load_adapter(reference, folder, names[i])
    adapterspec.set_active_adapters(reference, names)
    assert sorted(adapterspec.adapter_names(model)) == names
    adapterspec.set_active_adapters(model, names)
    for name, module in model.named_modules():  # every adapter in every layer it targets
        if hasattr(module, "adapter_names") and hasattr(module, "base_layer"):
            expected = [n for i, n in enumerate(names) if name.rpartition(".")[2] in _targets(i)]
            assert sorted(module.adapter_names()) == expected, name
    # every merge was undone by a subtraction: each base weight is within 2 roundings per merge of its own
    assert_close(logits(model, token_inputs), logits(reference, token_inputs), length=LENGTH + 2 * THREADS * ROUNDS)
    adapterspec.unload(model)
    assert not hasattr(model, "_adapterspec_state")
    assert [(n, type(m)) for n, m in model.named_modules()] == [(n, type(m)) for n, m in llama.named_modules()]
    base = llama.state_dict()
    for key, value in model.state_dict().items():
        assert_close(value, base[key], atol=fp32_tolerance(base[key], 2 * THREADS * ROUNDS))


def test_readers_see_a_consistent_state(llama: Any, folders: list[Path], fast_switching: None) -> None:
    """While threads load and delete, list_adapters / active adapter queries never see half a change:
    every active adapter is loaded, and every loaded adapter is in every layer it targets."""
    model = fresh(llama)
    stop = threading.Event()

    def work(i: int) -> None:
        if i < THREADS // 2:
            for _ in range(ROUNDS):
                adapterspec.load_adapter(model, folders[i], f"t{i}")
                adapterspec.delete_adapter(model, f"t{i}")
            return
        while not stop.is_set():
            with adapterspec.model_lock(model):
                loaded, active = adapterspec.adapter_names(model), adapterspec.active_adapters(model)
                held = {n for m in model.modules() if hasattr(m, "base_layer") for n in m.adapter_names()}
            assert set(active) <= set(loaded) and held == set(loaded), (loaded, active, held)

    def run(i: int) -> None:
        try:
            work(i)
        finally:
            if i < THREADS // 2:
                done.append(i)
                if len(done) == THREADS // 2:
                    stop.set()

    done: list[int] = []
    errors = _run_threads(run)
    assert not errors, errors
    assert adapterspec.adapter_names(model) == []

