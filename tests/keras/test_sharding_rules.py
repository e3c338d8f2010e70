"""The rules of :mod:`adapterspec_keras.sharding`, in process (the SPMD runs are in ``test_distribution_jax.py``):
which split of a kernel's axes is a split of the module's flattened features, which stored axis of each adapter
tensor takes it, and that nothing changes without an active distribution (the single-device path)."""

from __future__ import annotations

import importlib.util
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

if importlib.util.find_spec("jax") is None:
    pytest.skip("needs JAX", allow_module_level=True)

import keras  # noqa: E402
from adapterspec_keras.sharding import Placement, _feature_entry, active, param_sharding, placement_of  # noqa: E402
from adapterspec_keras.sites import layer_site  # noqa: E402

MESH = SimpleNamespace(shape={"model": 4, "batch": 2})


@pytest.mark.parametrize(("spec", "axes", "shape", "expected"), [
    (("model", None, None), (0,), (64,), "model"),             # query [hidden, heads, head_dim]: hidden split
    ((None, "model", None), (1, 2), (4, 16), "model"),         # query's outputs split on heads (outermost)
    ((None, None, "model"), (1, 2), (4, 16), None),            # split on head_dim (inner): not a flattened split
    (("model", None, None), (0, 1), (4, 16), "model"),         # attention_output [heads, head_dim, hidden]: heads
    ((None, "model"), (0,), (64,), None),                      # the other axis split: these features whole
    (("model", "batch"), (0, 1), (8, 8), None),                # two axes split: whole
    ((("batch", "model"), None), (0,), (64,), ("batch", "model")),  # one axis over two mesh axes
    (("model", None), (0,), (6,), None),                       # 6 rows over 4 devices: whole
])
def test_a_kernel_split_is_a_feature_split_only_when_it_is_the_same(spec: tuple[Any, ...], axes: tuple[int, ...],
                                                                    shape: tuple[int, ...], expected: Any) -> None:
    index = np.arange(int(np.prod(shape))).reshape(shape)
    assert _feature_entry(spec, axes, index, MESH) == expected


def test_an_index_map_not_in_kernel_order_is_not_a_split() -> None:
    index = np.arange(64)[::-1].reshape(4, 16)  # a module whose features are the kernel's in another order
    assert _feature_entry(("model", None), (0, 1), index, MESH) is None


def _spec(sharding: Any) -> tuple[Any, ...] | None:
    return None if sharding is None else tuple(sharding.spec)


def test_each_adapter_tensor_takes_the_split_of_its_feature_axis() -> None:
    import jax

    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("model",))
    row, column = Placement(mesh, "model", None), Placement(mesh, None, "model")
    assert _spec(param_sharding(row, "LORA", "lora_A.weight", (4, 64))) == (None, "model")
    assert param_sharding(row, "LORA", "lora_B.weight", (64, 4)) is None
    assert _spec(param_sharding(column, "LORA", "lora_B.weight", (64, 4))) == ("model", None)
    assert _spec(param_sharding(column, "LORA", "lora_B.bias", (64,))) == ("model",)
    assert _spec(param_sharding(column, "LORA", "lora_magnitude_vector", (64,))) == ("model",)
    assert param_sharding(column, "LORA", "lora_A.weight", (4, 64)) is None
    assert _spec(param_sharding(row, "LORA", "lora_embedding_A", (4, 128))) == (None, "model")
    # a convolution's variables keep the Keras layout: A [*k, in, r], B [*1, r, out]
    assert _spec(param_sharding(row, "LORA", "lora_A.weight", (3, 3, 8, 4), conv=True)) == (None, None, "model", None)
    conv_b = param_sharding(column, "LORA", "lora_B.weight", (1, 1, 4, 8), conv=True)
    assert _spec(conv_b) == (None, None, None, "model")
    # IA3: its vector over outputs, or over inputs for a feedforward module
    assert _spec(param_sharding(column, "IA3", "ia3_l", (64,))) == ("model",)
    assert param_sharding(column, "IA3", "ia3_l", (64,), feedforward=True) is None
    assert _spec(param_sharding(row, "IA3", "ia3_l", (64,), feedforward=True)) == ("model",)
    # other methods: whole on every device
    assert param_sharding(row, "LOHA", "hada_w1_a", (64, 4)) is None
    assert param_sharding(None, "LORA", "lora_A.weight", (4, 64)) is None


def test_without_a_distribution_nothing_changes() -> None:
    layer = keras.layers.EinsumDense("btd,dnh->btnh", output_shape=(None, 4, 16))
    layer.build((None, None, 64))
    site = layer_site("q_proj", layer)
    assert site is not None
    assert not active() and placement_of(site) is None
