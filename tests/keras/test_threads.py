"""One Keras model, several threads: adapterspec's calls on it are serialised (``adapterspec.model_lock``).

Eight threads load, merge, unmerge, switch and delete their own adapters on one small Keras model at once
(the interpreter switching threads every 10 us); afterwards the model holds exactly the adapters a
sequential run leaves, with the sequential run's outputs, and unloads to the base model.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import keras
import numpy as np
import pytest

import adapterspec
from keras_helpers import assert_near, unique_values

THREADS = 8
ROUNDS = 3
TIMEOUT_S = 120
SIZES = {"fc1": (6, 8), "fc2": (8, 7), "fc3": (7, 5)}


def _model() -> keras.Model:
    inputs = keras.Input((6,))
    x = inputs
    for i, (name, (n_in, n_out)) in enumerate(SIZES.items()):
        layer = keras.layers.Dense(n_out, name=name)
        x = layer(x)
        layer.set_weights([unique_values((n_in, n_out), 10 + i, scale=0.5), unique_values((n_out,), 20 + i)])
    return keras.Model(inputs, x)


def _targets(i: int) -> list[str]:
    return ["fc1", "fc2"] if i % 2 else ["fc2", "fc3"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("threads")
    out = []
    for i in range(THREADS):
        tensors = {}
        for name in _targets(i):
            n_in, n_out = SIZES[name]
            tensors[f"base_model.model.{name}.lora_A.weight"] = unique_values((2, n_in), 10 * i + 1)
            tensors[f"base_model.model.{name}.lora_B.weight"] = unique_values((n_out, 2), 10 * i + 2)
        config = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": _targets(i)}
        out.append(adapterspec.write_adapter(root / f"t{i}", config, tensors))
    return out


@pytest.fixture
def fast_switching() -> Iterator[None]:
    previous = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    try:
        yield
    finally:
        sys.setswitchinterval(previous)


def _run_threads(work: Callable[[int], None]) -> list[BaseException]:
    errors: list[BaseException] = []
    barrier = threading.Barrier(THREADS)

    def run(i: int) -> None:
        try:
            barrier.wait(timeout=TIMEOUT_S)
            work(i)
        except BaseException as exc:  # noqa: BLE001 - collected and asserted on by the test
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=TIMEOUT_S)
    assert not any(t.is_alive() for t in threads), "a thread did not finish in time (deadlock?)"
    return errors


def test_eight_threads_on_one_model_end_as_a_sequential_run(folders: list[Path], fast_switching: None) -> None:
    model = _model()
    x = unique_values((3, 6), 5, scale=1.0)
    base_out = keras.ops.convert_to_numpy(model(x))
    names = [f"t{i}" for i in range(THREADS)]

    def work(i: int) -> None:
        name = names[i]
        for last in [False] * (ROUNDS - 1) + [True]:
            adapterspec.load_adapter(model, folders[i], name, activate=False)
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

    reference = _model()
    for i, folder in enumerate(folders):
        adapterspec.load_adapter(reference, folder, names[i])
    adapterspec.set_active_adapters(reference, names)
    assert sorted(adapterspec.adapter_names(model)) == names
    adapterspec.set_active_adapters(model, names)
    expected = keras.ops.convert_to_numpy(reference(x))
    assert np.abs(expected - base_out).max() > 1e-2
    # every merge was undone by a subtraction: each base weight is within 2 roundings per merge of its own
    assert_near(keras.ops.convert_to_numpy(model(x)), expected, length=8 + 2 * THREADS * ROUNDS)
    adapterspec.unload(model)
    assert adapterspec.adapter_names(model) == []
    assert_near(keras.ops.convert_to_numpy(model(x)), base_out, length=8 + 2 * THREADS * ROUNDS)
