"""The module mapping derived from keras-hub's own transformers converters: index maps, coverage per
architecture (logits equal to PEFT's), no side effect on the model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

import adapterspec  # noqa: E402
from adapterspec_keras import converters, mapping  # noqa: E402
from keras_helpers import (  # noqa: E402
    ARCHS,
    ATOL,
    assert_near,
    keras_logits,
    keras_model,
    make_peft_adapter,
    peft_adapted_modules,
    torch_logits,
)


def test_gpt2_fused_qkv_splits_into_three_einsum_layers(checkpoints: Any) -> None:
    sites = mapping.spec_sites(keras_model("gpt2", checkpoints["gpt2"]))
    site = sites["transformer.h.1.attn.c_attn"]
    assert (site.in_features, site.out_features) == (64, 192)
    assert [p.layer.path.rsplit("/", 1)[-1] for p in site.pieces] == ["query", "key", "value"]
    for i, piece in enumerate(site.pieces):
        assert piece.kind == "einsum" and piece.out_shape == (4, 16)
        assert np.array_equal(piece.out_index.ravel(), np.arange(64 * i, 64 * (i + 1)))
        assert np.array_equal(piece.in_index, np.arange(64))
    assert sites["lm_head"].pieces[0].kind == "reverse" and sites["lm_head"].pieces[0].tied


def test_llama_attention_kernels_are_flattened_heads(checkpoints: Any) -> None:
    sites = mapping.spec_sites(keras_model("llama", checkpoints["llama"]))
    q, o = sites["model.layers.0.self_attn.q_proj"].pieces[0], sites["model.layers.0.self_attn.o_proj"].pieces[0]
    assert (q.in_shape, q.out_shape, o.in_shape, o.out_shape) == ((64,), (4, 16), (4, 16), (64,))
    assert np.array_equal(o.in_index.ravel(), np.arange(64))
    head = sites["lm_head"].pieces[0]
    assert head.kind == "reverse" and not head.tied
    assert list(sites)[-1] == "lm_head" and list(sites)[0] == "model.embed_tokens"


def test_backbone_names_drop_the_task_prefix(checkpoints: Any) -> None:
    import keras_hub

    backbone = keras_hub.models.Backbone.from_preset(str(checkpoints["gpt2"]))
    assert "h.0.attn.c_attn" in mapping.spec_sites(backbone)
    assert mapping.find_site(mapping.spec_sites(backbone), "transformer.h.0.attn.c_attn") is not None


def test_keras_hub_converters_are_all_discovered() -> None:
    import pkgutil

    import keras_hub.src.utils.transformers as package

    shipped = {m.name for m in pkgutil.iter_modules(package.__path__) if m.name.startswith("convert_")}
    found = {name.rsplit(".", 1)[-1] for name in converters._converters()}
    assert found == shipped


def test_base_model_prefixes_agree_with_transformers() -> None:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_MAPPING_NAMES

    checked = 0
    for model_type, prefix in mapping.BASE_MODEL_PREFIX.items():
        name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type) or MODEL_MAPPING_NAMES.get(model_type)
        cls = getattr(transformers, name, None) if isinstance(name, str) else None
        if cls is None:
            continue
        assert cls.base_model_prefix == prefix, model_type
        checked += 1
    assert checked >= 15


def test_index_probes_survive_hooks_that_cast() -> None:
    """A 5000-row weight through a hook that casts to float16 (exact only up to 2048) still decodes exactly."""
    hook = lambda x, shape: np.transpose(x.astype(np.float16))  # noqa: E731
    flat = converters._probe(hook, (5000, 3), (3, 5000))
    assert np.array_equal(flat, np.arange(15000).reshape(5000, 3).T)
    in_index, out_index = converters._decode(flat, 3, (0,), (1,), in_is_rows=False)
    assert np.array_equal(out_index, np.arange(5000)) and np.array_equal(in_index, np.arange(3))
    assert converters._probe(hook, (4999, 3), (3, 5000)) is None  # a wrong guess of the HF shape is refused


def test_index_probes_take_one_pass_where_the_hook_keeps_integers() -> None:
    """A hook that rearranges (keras-hub's transposes and reshapes) is probed once, over the indices themselves;
    one that casts, or computes, goes digit by digit and gives what it gave before."""
    calls: list[np.dtype] = []

    def rearranging(x: np.ndarray, shape: list[int]) -> np.ndarray:
        calls.append(x.dtype)
        return np.reshape(np.transpose(x), shape)

    flat = converters._probe(rearranging, (6, 20), (4, 5, 6))
    assert calls == [np.dtype(np.int32)]  # one pass
    assert np.array_equal(flat, np.arange(120).reshape(6, 20).T.reshape(4, 5, 6))
    in_index, out_index = converters._decode(flat, 20, (0, 1), (2,), in_is_rows=False)
    assert np.array_equal(in_index, np.arange(20).reshape(4, 5)) and np.array_equal(out_index, np.arange(6))
    # to float32 and back: exact below 2**24, so still one pass
    calls.clear()
    to_float = lambda x, shape: rearranging(x, shape).astype(np.float32)  # noqa: E731
    assert np.array_equal(converters._probe(to_float, (6, 20), (4, 5, 6)), flat) and len(calls) == 1
    # arithmetic is no rearrangement: the digits' answer, as before this fast path
    calls.clear()
    doubled = lambda x, shape: rearranging(x, shape) * 2  # noqa: E731
    assert np.array_equal(converters._probe(doubled, (6, 20), (4, 5, 6)), flat * 2)
    assert calls[0] == np.dtype(np.int32) and all(c == np.dtype(np.float32) for c in calls[1:]) and len(calls) == 2
    # a map that is no combination of an input and an output index does not decode
    shuffled = np.random.default_rng(0).permutation(120).reshape(4, 5, 6)
    assert converters._decode(shuffled, 20, (0, 1), (2,), in_is_rows=False) is None
    swapped = flat.copy()
    swapped[0, 0, 0], swapped[0, 0, 1] = swapped[0, 0, 1], swapped[0, 0, 0]
    assert converters._decode(swapped, 20, (0, 1), (2,), in_is_rows=False) is None
    # rows the input ([in, out], a transformers Conv1D): the same kernel decodes the other way
    conv1d = converters._probe(lambda x, shape: x, (20, 6), (20, 6))
    in_index, out_index = converters._decode(conv1d, 6, (0,), (1,), in_is_rows=True)
    assert np.array_equal(in_index, np.arange(20)) and np.array_equal(out_index, np.arange(6))


def test_decoding_a_kernel_without_input_or_output_axes_gives_arrays() -> None:
    """An EinsumDense kernel with no input axis (``bt,h->bth``: kin is empty) or no output axis decodes to a 0-d
    index array over the empty axes, as before the one-pass decoding (it gave a NumPy scalar, no ``np.ndarray``)."""
    in_index, out_index = converters._decode(np.arange(5), 1, (), (0,), in_is_rows=False)
    assert type(in_index) is np.ndarray and in_index.shape == () and int(in_index) == 0
    assert type(out_index) is np.ndarray and np.array_equal(out_index, np.arange(5))
    in_index, out_index = converters._decode(np.arange(5), 5, (0,), (), in_is_rows=False)
    assert type(out_index) is np.ndarray and out_index.shape == () and int(out_index) == 0
    assert type(in_index) is np.ndarray and np.array_equal(in_index, np.arange(5))
    probe = np.arange(120, dtype=np.int64).reshape(20, 6)  # the indices are copies: the cache keeps no probe alive
    assert not any(np.shares_memory(index, probe) for index in converters._decode(probe, 6, (0,), (1,), True))


def test_deriving_the_mapping_changes_nothing(tmp_path: Path) -> None:
    """Mixtral's converter assigns expert weights itself: replaying it must not touch the model."""
    import keras_hub
    import torch
    from keras import ops

    config = transformers.MixtralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=64,
                                        num_local_experts=2, num_experts_per_tok=1, head_dim=8)
    torch.manual_seed(0)
    transformers.MixtralForCausalLM(config).save_pretrained(tmp_path / "mixtral")
    backbone = keras_hub.models.Backbone.from_preset(str(tmp_path / "mixtral"))
    before = [ops.convert_to_numpy(v).copy() for v in backbone.variables]
    sites = mapping.spec_sites(backbone)
    assert "layers.0.self_attn.q_proj" in sites and "layers.0.block_sparse_moe.gate" in sites
    assert all(np.array_equal(a, ops.convert_to_numpy(v)) for a, v in zip(before, backbone.variables))


EXTRA = ["mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "smollm3"]


def _adapter_effect_gap(peft_model: Any, model: Any, path: str) -> float:
    """Run one adapted module alone in torch (PEFT) and in Keras (each of its pieces) on the same input, and
    compare what the adapter adds (output with adapter - output without), so that a base conversion that rounds
    (keras-hub's Mistral converter casts to float16) does not hide or fake anything."""
    import torch
    from keras import ops

    from keras_helpers import unique_values

    torch_module = peft_model.get_submodule("base_model.model." + path)
    site = mapping.find_site(mapping.spec_sites(model), path)
    if site.kind == "embedding":
        x = (np.arange(6).reshape(1, 6) * 5) % site.in_features
    else:
        x = unique_values((1, 3, site.in_features), 11, scale=1.0)
    with torch.no_grad():
        t = torch.from_numpy(x)
        expected = (torch_module(t) - torch_module.base_layer(t)).numpy().reshape(1, x.shape[1], -1)
    # Gemma 2/3 scale inside the embedding module (PEFT scales the delta too); keras-hub scales after the layer
    expected = expected / float(getattr(torch_module.base_layer, "embed_scale", 1.0))
    worst = 0.0
    for piece in site.pieces:
        layer = piece.layer
        args = (x.reshape((1, 3) + piece.in_shape),) if piece.kind == "einsum" else (x,)
        kwargs = {"reverse": True} if piece.kind == "reverse" else {}
        with_adapter = ops.convert_to_numpy(layer(*args, **kwargs))
        with adapterspec.disabled_adapters(model):
            without = ops.convert_to_numpy(layer(*args, **kwargs))
        got = (with_adapter - without).reshape(1, x.shape[1], -1)
        worst = max(worst, float(np.abs(got - expected[..., piece.out_index.ravel()]).max()))
    assert np.abs(expected).max() > 1e-3  # the adapter does something here
    return worst


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("arch", EXTRA)
def test_more_architectures_match_peft_module_by_module(arch: str, checkpoints: Any, token_ids: np.ndarray,
                                                        tmp_path: Path) -> None:
    """Every adapted module adds what PEFT adds, to 1e-5. Whole-model logits are compared where keras-hub's own
    conversion is exact; it is not for Mistral (the converter casts weights to float16), Qwen3 and SmolLM3."""
    from keras_helpers import hf_model

    config = peft.LoraConfig(r=2, lora_alpha=4, use_dora=arch == "qwen2",
                             target_modules=[*ARCHS[arch].linear_targets, "embed_tokens"])
    peft_model, folder = make_peft_adapter(checkpoints[arch], tmp_path / "a", config)
    model = keras_model(arch, checkpoints[arch])
    base_gap = float(np.abs(keras_logits(model, token_ids) - torch_logits(hf_model(checkpoints[arch]), token_ids)).max())
    modules = adapterspec.load_adapter(model, folder)
    assert set(modules) == peft_adapted_modules(peft_model)
    for path in modules:
        assert _adapter_effect_gap(peft_model, model, path) <= ATOL, path
    if base_gap <= ATOL:
        assert_near(keras_logits(model, token_ids), torch_logits(peft_model, token_ids))


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_bert_encoder_gives_peft_hidden_states(token_ids: np.ndarray, tmp_path: Path) -> None:
    import keras_hub
    import torch
    from keras import ops

    torch.manual_seed(5)
    config = transformers.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=128, vocab_size=128, max_position_embeddings=64)
    transformers.BertModel(config).eval().save_pretrained(tmp_path / "bert")
    pm = peft.get_peft_model(transformers.BertModel.from_pretrained(tmp_path / "bert").eval(), peft.LoraConfig(
        r=2, lora_alpha=4, use_dora=True, target_modules=["query", "key", "value", "dense", "word_embeddings"]))
    from keras_helpers import fill_adapter_weights

    fill_adapter_weights(pm)
    pm.save_pretrained(tmp_path / "a")
    ids = torch.from_numpy(token_ids)
    with torch.no_grad():
        expected = pm(input_ids=ids, token_type_ids=torch.zeros_like(ids)).last_hidden_state.numpy()
    backbone = keras_hub.models.Backbone.from_preset(str(tmp_path / "bert"))
    modules = adapterspec.load_adapter(backbone, tmp_path / "a")
    assert set(modules) == peft_adapted_modules(pm)
    out = backbone({"token_ids": token_ids, "segment_ids": np.zeros_like(token_ids),
                    "padding_mask": np.ones_like(token_ids)})["sequence_output"]
    assert_near(ops.convert_to_numpy(out), expected)
