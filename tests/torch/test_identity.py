"""The torch base fingerprint (``adapterspec_torch.identity``) against SPEC.md 9.1's recipe, for weights in any layout."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

import adapterspec  # noqa: E402
from adapterspec.identity import fingerprint, sample_indices  # noqa: E402
from adapterspec_torch.identity import base_identity  # noqa: E402

LORA = {"peft_type": "LORA", "r": 2, "target_modules": ["0", "2"]}


def _model(weights: list[torch.Tensor]) -> torch.nn.Module:
    model = torch.nn.Sequential(torch.nn.Linear(12, 11), torch.nn.ReLU(), torch.nn.Linear(11, 12))
    for index, weight in zip((0, 2), weights):
        model[index].weight = torch.nn.Parameter(weight)
    return model


def _recipe(weights: list[torch.Tensor]) -> str:
    """SPEC.md 9.1 from the values alone (row-major over the logical [out, in] shape), through NumPy."""
    out = {}
    for path, weight in zip(("0", "2"), weights):
        values = weight.detach().float().contiguous().numpy().ravel()
        out[path] = (tuple(weight.shape), values[sample_indices(values.size)])
    return fingerprint(out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "transposed view"])
def test_fingerprint_follows_the_logical_layout(dtype: torch.dtype, layout: str) -> None:
    """A weight that is a transposed view (strides not row-major) is sampled by its logical indices, as a
    contiguous one; every dtype gives the recipe's value. Element-unique values: a stride mix-up changes it."""
    weights = [torch.sin(torch.arange(132, dtype=torch.float64) * 0.37 + k).reshape(shape).to(dtype)
               for k, shape in ((0, (11, 12)), (1, (12, 11)))]
    if layout == "transposed view":
        weights = [w.T.contiguous().T for w in weights]
        assert not any(w.is_contiguous() for w in weights)
    model = _model(weights)
    adapterspec.inject_adapter(model, LORA)
    expected = _recipe(weights)
    assert base_identity(model, "default")["fingerprint"] == expected
    assert 3 * 11 + 4 in sample_indices(132)
    with torch.no_grad():
        model[2].weight[3, 4] += 0.5  # a sampled element: the fingerprint must change
    assert base_identity(model, "default")["fingerprint"] != expected


def test_task_type_feature_extraction_only_for_models_that_read_token_ids(tmp_path: Path) -> None:
    """A bare text model records FEATURE_EXTRACTION; an image model records none, so that PEFT wraps the saved
    adapter in a plain ``PeftModel`` that runs the image model (FEATURE_EXTRACTION's wrapper passes ``input_ids=``)."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from adapterspec_torch.identity import task_type_of

    text = transformers.LlamaModel(transformers.LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                                            num_attention_heads=2, vocab_size=32))
    assert task_type_of(text) == "FEATURE_EXTRACTION"
    config = transformers.ViTConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                    image_size=8, patch_size=4)
    torch.manual_seed(0)
    vit = transformers.ViTModel(config).eval()
    assert task_type_of(vit) is None
    adapterspec.inject_adapter(vit, {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "init_lora_weights": False,
                                     "target_modules": ["q_proj", "v_proj"]})
    pixels = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8) / 384.0
    with torch.no_grad():
        ours = vit(pixel_values=pixels).last_hidden_state
    saved = adapterspec.save_adapter(vit, tmp_path / "vit")
    assert json.loads((saved / "adapter_config.json").read_text())["task_type"] is None
    torch.manual_seed(0)
    reloaded = peft.PeftModel.from_pretrained(transformers.ViTModel(config).eval(), saved)
    assert type(reloaded) is peft.PeftModel
    with torch.no_grad():
        theirs = reloaded(pixels).last_hidden_state  # positional, as an image model is called
    assert torch.allclose(ours, theirs, atol=1e-6), float((ours - theirs).abs().max())


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_dual_encoder_records_no_task_type_and_loads_in_peft(tmp_path: Path, kind: str) -> None:
    """A bare CLIPModel / SiglipModel records no task type, as PEFT's own save: PEFT's FEATURE_EXTRACTION wrapper
    passes ``inputs_embeds=`` to the model, which their forward has no parameter for (it failed, "got multiple
    values for keyword argument 'inputs_embeds'", on every folder adapterspec saved of them). PEFT loads the saved
    folder in a plain ``PeftModel`` and gives the adapted model's outputs."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from adapterspec_torch.identity import task_type_of

    tower = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    if kind == "clip":
        config: Any = transformers.CLIPConfig(text_config=dict(tower, vocab_size=40, max_position_embeddings=8),
                                              vision_config=dict(tower, image_size=8, patch_size=4),
                                              projection_dim=16)
        cls: Any = transformers.CLIPModel
    else:
        config = transformers.SiglipConfig(text_config=dict(tower, vocab_size=40, max_position_embeddings=8),
                                           vision_config=dict(tower, image_size=8, patch_size=4))
        cls = transformers.SiglipModel
    torch.manual_seed(0)
    model = cls(config).eval()
    assert task_type_of(model) is None
    adapterspec.inject_adapter(model, {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "init_lora_weights": False,
                                       "target_modules": ["q_proj", "v_proj"]})
    inputs = {"input_ids": (torch.arange(14).reshape(2, 7) * 5 + 3) % 40,
              "pixel_values": torch.sin(torch.arange(2 * 3 * 8 * 8, dtype=torch.float32)).reshape(2, 3, 8, 8)}
    with torch.no_grad():
        ours = model(**inputs).logits_per_image
    saved = adapterspec.save_adapter(model, tmp_path / kind)
    assert json.loads((saved / "adapter_config.json").read_text())["task_type"] is None
    torch.manual_seed(0)
    reloaded = peft.PeftModel.from_pretrained(cls(config).eval(), saved)
    assert type(reloaded) is peft.PeftModel
    with torch.no_grad():
        theirs = reloaded(**inputs).logits_per_image
    assert torch.allclose(ours, theirs, atol=1e-6), float((ours - theirs).abs().max())


def test_task_type_only_where_peft_class_calls_the_model() -> None:
    """The rule behind the task type (``adapterspec._rules.task_takes``): the main input is ``input_ids`` and the
    forward names ``input_ids`` and ``inputs_embeds``; the other keywords PEFT passes are named or taken by
    ``**kwargs``."""
    from adapterspec._rules import task_takes

    class Text:
        def forward(self, input_ids: Any = None, inputs_embeds: Any = None, **kwargs: Any) -> None: ...

    class Strict:
        def forward(self, input_ids: Any = None, inputs_embeds: Any = None, attention_mask: Any = None) -> None: ...

    class Image(Text):
        main_input_name = "pixel_values"

    class Dual:
        def forward(self, input_ids: Any = None, pixel_values: Any = None, **kwargs: Any) -> None: ...

    assert task_takes("FEATURE_EXTRACTION", Text) and task_takes("CAUSAL_LM", Text)
    assert not task_takes("CAUSAL_LM", Strict)  # PEFT passes labels=, output_attentions=, ...
    assert not task_takes("FEATURE_EXTRACTION", Image)
    assert not task_takes("FEATURE_EXTRACTION", Dual)
