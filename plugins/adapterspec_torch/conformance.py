"""The torch backend under the conformance suite: builds each case's tiny model in torch and uses the public API.

Nothing here reaches into the backend: a case's model is built from plain ``torch.nn`` layers (and
transformers' GPT-2 ``Conv1D`` / a tiny Llama for prompt learning), the adapter goes in through
:func:`adapterspec.load_adapter` and comes out through :func:`adapterspec.save_adapter`. Features the
backend lacks raise :class:`adapterspec.UnsupportedError` (or ``NotImplementedError``) and are reported
UNSUPPORTED by the runner.

>>> from adapterspec.conformance import load_corpus, run_suite
>>> report = run_suite(TorchImplementation(), load_corpus())        # doctest: +SKIP

:func:`build_model` is also what the PEFT driver and the corpus generator build their models with.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import adapterspec

__all__ = ["TorchImplementation", "build_model", "capture_model_inputs", "prefix_tensor", "run_modules"]

_DTYPES = {"float32": "float32", "float16": "float16", "bfloat16": "bfloat16", "float64": "float64"}


def _torch_dtype(name: str) -> Any:
    import torch

    return getattr(torch, _DTYPES[name])


def _ints(value: int | list[int], n: int) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, list) else (int(value),) * n


def _experts_type() -> type:
    """A stack of expert weights ``[E, out, in]`` (a 3-D ``nn.Parameter``, as transformers 5's MoE experts): expert
    ``e`` maps ``x[e]`` ``[n, in]`` to ``[n, out]``."""
    import torch
    from torch import nn

    class Experts(nn.Module):
        def __init__(self, experts: int, fan_in: int, fan_out: int) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.empty(experts, fan_out, fan_in))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.bmm(x, self.weight.transpose(1, 2))

    return Experts


def _Experts(experts: int, fan_in: int, fan_out: int) -> Any:  # noqa: N802  # builds the class on first use
    global _EXPERTS
    if _EXPERTS is None:
        _EXPERTS = _experts_type()
    return _EXPERTS(experts, fan_in, fan_out)


_EXPERTS: Any = None


def _layer(spec: Mapping[str, Any]) -> Any:
    from torch import nn

    kind = spec["kind"]
    if kind == "linear":
        return nn.Linear(spec["in_features"], spec["out_features"], bias=spec.get("bias", True))
    if kind == "embedding":
        return nn.Embedding(spec["num_embeddings"], spec["embedding_dim"])
    if kind == "experts":
        return _Experts(spec["num_experts"], spec["in_features"], spec["out_features"])
    if kind == "layer_norm":
        return nn.LayerNorm(spec["normalized_shape"], eps=spec["eps"], bias=spec.get("bias", True))
    if kind in ("conv1d", "conv2d"):
        nd = 1 if kind == "conv1d" else 2
        cls = nn.Conv1d if kind == "conv1d" else nn.Conv2d
        # torch's stubs want a tuple of the conv's own length; _ints gives nd ints, which mypy cannot see
        return cls(spec["in_channels"], spec["out_channels"], _ints(spec["kernel_size"], nd),  # type: ignore[arg-type]
                   stride=_ints(spec.get("stride", 1), nd), padding=_ints(spec.get("padding", 0), nd),  # type: ignore[arg-type]
                   bias=spec.get("bias", True))
    if kind == "gpt2_conv1d":
        from transformers.pytorch_utils import Conv1D

        layer = Conv1D(spec["out_features"], spec["in_features"])  # type: ignore[no-untyped-call]  # unannotated there
        if not spec.get("bias", True):
            layer.register_parameter("bias", None)
        return layer
    raise adapterspec.UnsupportedError(f"layer kind {kind!r} is unknown to this test harness", key=kind)


def build_model(model: Mapping[str, Any]) -> Any:
    """A ``torch.nn.Module`` holding a case's modules at their paths (or a tiny transformers decoder).

    Parameters are filled with deterministic values; load the case's base weights over them.

    >>> m = build_model({"modules": {"layers.0.q": {"kind": "linear", "in_features": 4, "out_features": 2}}})
    >>> type(m.layers.get_submodule("0.q")).__name__
    'Linear'
    """
    import torch
    from torch import nn

    dtype = _torch_dtype(model.get("dtype", "float32"))
    decoder = model.get("decoder")
    if decoder is not None:
        if decoder.get("architecture") != "llama":
            raise adapterspec.UnsupportedError(f"decoder architecture {decoder.get('architecture')!r}")
        from transformers import LlamaConfig, LlamaForCausalLM

        fields = {k: v for k, v in decoder.items() if k != "architecture"}
        torch.manual_seed(0)
        root = LlamaForCausalLM(LlamaConfig(**fields)).eval()  # type: ignore[no-untyped-call]  # unannotated there
        return root.to(dtype)
    root = nn.Module()
    for path, spec in model.get("modules", {}).items():
        parent = root
        *parents, leaf = path.split(".")
        for name in parents:
            if not hasattr(parent, name):
                parent.add_module(name, nn.Module())
            parent = getattr(parent, name)
        parent.add_module(leaf, _layer(spec))
    with torch.no_grad():
        for i, p in enumerate(root.parameters()):
            p.copy_(torch.sin(torch.arange(p.numel(), dtype=torch.float64) * 0.7 + i).reshape(p.shape) * 0.3)
    return root.eval().to(dtype)


def _load_base(model: Any, weights: Path | None) -> None:
    if weights is None:
        return
    from safetensors.torch import load_file

    state = load_file(str(weights))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if k in dict(model.named_parameters())]:
        raise ValueError(f"base weights do not fit the model: missing {missing}, unexpected {unexpected}")


def _inputs(path: Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    from safetensors.torch import load_file

    return load_file(str(path))


def run_modules(model: Any, inputs: Mapping[str, Any]) -> dict[str, Any]:
    """Each module's output on its own input (input key = module path).

    >>> run_modules(model, {"layers.0.q": torch.ones(1, 4)})["layers.0.q"].shape      # doctest: +SKIP
    torch.Size([1, 2])
    """
    import torch

    with torch.no_grad():
        return {path: model.get_submodule(path)(x) for path, x in inputs.items()}


class _Captured(Exception):  # noqa: N818 - control flow: stop the forward once its inputs are seen
    pass


def capture_model_inputs(model: Any, via: Any = None, **kwargs: Any) -> dict[str, Any]:
    """The keyword arguments ``model``'s forward receives (after every pre-hook, an adapter's included).

    The forward itself is not run: a last pre-hook records its arguments and stops it.

    :param via: call this instead of ``model`` (a wrapper such as a ``PeftModel`` that calls ``model``).

    >>> capture_model_inputs(llama, inputs_embeds=x)["inputs_embeds"].shape            # doctest: +SKIP
    torch.Size([2, 7, 8])
    """
    import torch

    seen: dict[str, Any] = {}

    def hook(module: Any, args: tuple[Any, ...], kw: dict[str, Any]) -> None:
        seen.update(kw)
        raise _Captured

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            (via if via is not None else model)(**kwargs)
    except _Captured:
        pass
    finally:
        handle.remove()
    return seen


def prefix_tensor(cache: Any) -> Any:
    """A decoder cache's contents as ``[layers, 2, heads, nvt, head_dim]`` (batch item 0).

    >>> prefix_tensor(seen["past_key_values"]).shape                                  # doctest: +SKIP
    torch.Size([2, 2, 2, 3, 4])
    """
    import torch

    if hasattr(cache, "layers"):
        pairs = [(layer.keys, layer.values) for layer in cache.layers]
    else:
        pairs = [(k, v) for k, v in cache]
    return torch.stack([torch.stack([k[0], v[0]]) for k, v in pairs])


def _prompt_outputs(model: Any, case: Any, inputs: Mapping[str, Any]) -> dict[str, Any]:
    import torch

    if case.compute == "prefix_key_values":
        ids = torch.zeros((1, 1), dtype=torch.long)
        seen = capture_model_inputs(model, input_ids=ids)
        if seen.get("past_key_values") is None:
            raise AssertionError("the adapter passed no past_key_values to the model's forward")
        return {"past_key_values": prefix_tensor(seen["past_key_values"])}
    seen = capture_model_inputs(model, inputs_embeds=inputs["inputs_embeds"])
    return {"inputs_embeds": seen["inputs_embeds"]}


class TorchImplementation:
    """The built-in torch backend, driven through :mod:`adapterspec`'s public API."""

    name = "torch"
    checks_error_class = True

    def supports(self, case: Any) -> bool | str:
        """Everything the backend does not refuse as unsupported at run time; needs torch (and transformers
        for GPT-2 ``Conv1D`` layers and prompt learning)."""
        try:
            import torch  # noqa: F401
        except ImportError:
            return 'torch is not installed: pip install "adapterspec[torch]"'
        model = getattr(case, "model", None) if case.kind != "roundtrip" else case.source.model if case.source else None
        if model and (model.get("decoder") or any(m["kind"] == "gpt2_conv1d" for m in model.get("modules", {}).values())):
            try:
                import transformers  # noqa: F401
            except ImportError:
                return "needs transformers (GPT-2 Conv1D layers, decoder models): pip install transformers"
        return True

    def validate_config(self, config: Mapping[str, Any]) -> None:
        adapterspec.validate_config(config)

    def load_folder(self, case: Any, path: Path) -> None:
        model = build_model(case.model)
        options = case.options
        folders = adapterspec.list_adapters(path) if case.multi else {"default": path}
        for name, folder in folders.items():
            adapterspec.load_adapter(model, folder, adapter_name=name, verify=bool(options.get("verify")),
                                     allow_pickle=bool(options.get("allow_pickle")))

    def _loaded(self, case: Any, adapter: Path) -> Any:
        model = build_model(case.model)
        _load_base(model, case.weights)
        adapterspec.load_adapter(model, adapter)
        return model

    def run_numeric(self, case: Any, case_dir: Path) -> dict[str, Any]:
        model = self._loaded(case, case.adapter)
        inputs = _inputs(case.inputs)
        if case.compute == "modules":
            return run_modules(model, inputs)
        return _prompt_outputs(model, case, inputs)

    def roundtrip(self, case: Any, src: Path, dst: Path) -> None:
        model = self._loaded(case.source, src)
        adapterspec.save_adapter(model, dst)
