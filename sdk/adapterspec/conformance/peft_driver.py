"""PEFT itself under the conformance suite (``--impl peft``): where PEFT departs from the spec, the report shows it.

Every case runs through PEFT's own entry points on a torch model built from the case
(:func:`adapterspec_torch.conformance.build_model`): ``PeftConfig.from_pretrained`` for configs,
``PeftModel.from_pretrained`` (and ``load_adapter`` for PEFT's subfolder layout) for folders,
``save_pretrained`` for round trips. PEFT's exceptions are not the spec's classes, so refusals are
checked for having happened, not for their class (``checks_error_class = False``). PEFT only *warns*
about missing and unexpected keys -- those cases show up as accepted, which is the point.

torch, transformers and peft are imported when the first case runs, not before.

>>> from adapterspec.conformance import load_corpus, run_suite
>>> report = run_suite(PeftImplementation(), load_corpus(), include=["^numeric/lora"])   # doctest: +SKIP
"""

from __future__ import annotations

import json
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .contract import Unsupported

__all__ = ["PeftImplementation", "peft_outputs"]

_DTYPES = {"float32", "float16", "bfloat16", "float64"}


def _torch_dtype(name: str) -> Any:
    import torch

    return getattr(torch, name)


def _load(model_spec: Mapping[str, Any], adapter: Path, dtype: str, base: Mapping[str, Any] | None = None) -> Any:
    from peft import PeftModel

    from adapterspec_torch.conformance import build_model

    model = build_model({**model_spec, "dtype": dtype})
    if base:
        model.load_state_dict({k: v.to(_torch_dtype(dtype)) for k, v in base.items()}, strict=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = PeftModel.from_pretrained(model, str(adapter))
    if dtype == "float64":
        peft_model = peft_model.double()
    return peft_model.eval()


def peft_outputs(model_spec: Mapping[str, Any], compute: str, adapter: Path, base: Mapping[str, Any],
                 inputs: Mapping[str, Any], dtype: str) -> dict[str, np.ndarray]:
    """What PEFT computes for a numeric case (torch tensors in; float64 NumPy out), in ``dtype``.

    ``compute`` is the case's: ``"modules"`` runs each module of the PEFT-wrapped model on its input;
    ``"prefix_key_values"`` and ``"prompt_concat"`` read what ``PeftModelForCausalLM`` passes to the
    base model's forward (its ``past_key_values``, its ``inputs_embeds``).

    >>> peft_outputs(case.model, case.compute, case.adapter, base, inputs, "float64")   # doctest: +SKIP
    {'layer': array([[...]])}
    """
    import torch

    from adapterspec_torch.conformance import capture_model_inputs, prefix_tensor, run_modules

    def f64(t: Any) -> np.ndarray:
        array: np.ndarray = t.detach().to(torch.float64).numpy()
        return array

    peft_model = _load(model_spec, adapter, dtype, base)
    cast = {k: (v.to(_torch_dtype(dtype)) if v.is_floating_point() else v) for k, v in inputs.items()}
    inner = peft_model.get_base_model()
    if compute == "modules":
        return {k: f64(v) for k, v in run_modules(inner, cast).items()}
    if compute == "prefix_key_values":
        seen = capture_model_inputs(inner, via=peft_model, input_ids=torch.zeros((1, 1), dtype=torch.long))
        return {"past_key_values": f64(prefix_tensor(seen["past_key_values"]))}
    seen = capture_model_inputs(inner, via=peft_model, inputs_embeds=cast["inputs_embeds"])
    return {"inputs_embeds": f64(seen["inputs_embeds"])}


class PeftImplementation:
    """PEFT (with torch and transformers) driven through its public API; see the module docstring."""

    name = "peft"
    checks_error_class = False

    def supports(self, case: Any) -> bool | str:
        try:
            import peft  # noqa: F401
            import torch  # noqa: F401
            import transformers  # noqa: F401
        except ImportError as exc:
            return (f"needs peft, torch and transformers ({exc.name} is missing): "
                    'pip install "adapterspec[interop,torch]"')
        return True

    def validate_config(self, config: Any) -> None:
        """PEFT's own reading of ``adapter_config.json`` (``PeftConfig.from_pretrained``)."""
        from peft import PeftConfig

        with tempfile.TemporaryDirectory() as tmp:
            Path(tmp, "adapter_config.json").write_text(json.dumps(config), "utf-8")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                PeftConfig.from_pretrained(tmp)

    def load_folder(self, case: Any, path: Path) -> None:
        """``PeftModel.from_pretrained``; for several adapters, PEFT's layout (it has no manifest)."""
        if case.multi:
            peft_model = _load(case.model, path, case.dtype)
            for sub in sorted(p for p in Path(path).iterdir() if (p / "adapter_config.json").exists()):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    peft_model.load_adapter(str(sub), adapter_name=sub.name)
            return
        _load(case.model, path, case.dtype)

    def run_numeric(self, case: Any, case_dir: Path) -> dict[str, np.ndarray]:
        from safetensors.torch import load_file

        if case.dtype not in _DTYPES:
            raise Unsupported(f"dtype {case.dtype}")
        base = load_file(str(case.weights)) if case.weights else {}
        inputs = load_file(str(case.inputs)) if case.inputs else {}
        return peft_outputs(case.model, case.compute, case.adapter, base, inputs, case.dtype)

    def roundtrip(self, case: Any, src: Path, dst: Path) -> None:
        """Load with ``PeftModel.from_pretrained``, save with ``save_pretrained``."""
        from safetensors.torch import load_file

        source = case.source
        base = load_file(str(source.weights)) if source.weights else {}
        peft_model = _load(source.model, src, source.dtype, base)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peft_model.save_pretrained(str(dst))
