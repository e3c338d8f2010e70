"""The Keras backend under the conformance suite: builds each case's tiny model in Keras and uses the public API.

The mirror of :mod:`adapterspec_torch.conformance`. A case's modules become Keras layers holding the
case's base weights in Keras' layout (``Dense`` kernel = ``W.T``; GPT-2 ``Conv1D`` weight = the
``Dense`` kernel as stored; ``Conv1D``/``Conv2D`` kernels channels-last), inputs in the torch layout of
the corpus are transposed to channels-last (and zero-padded as the torch layer would) and outputs back.
The adapter goes in through :func:`adapterspec.load_adapter` with ``module_map={spec path: layer}`` and
comes out through :func:`adapterspec.save_adapter`. Decoder cases (prefix/prompt tuning) run a keras-hub
``Llama3CausalLM`` and read what its decoder layers receive: the key/value cache each layer is given (the
prefix), or the hidden states the first layer is given -- the prompt's, then the tokens' (their
concatenation is PEFT's ``inputs_embeds``). What the backend refuses as unsupported is reported UNSUPPORTED by
the runner.

>>> from adapterspec.conformance import load_corpus, run_suite
>>> report = run_suite(KerasImplementation(), load_corpus())        # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

import adapterspec

__all__ = ["KerasImplementation", "build_model", "load_base", "record_decoder_calls", "run_modules", "run_prompt"]


def _experts(experts: int, fan_in: int, fan_out: int, dtype: str) -> Any:
    """A stack of expert weights held as transformers 5 holds it, ``weight`` ``[E, out, in]`` (the mirror of the
    torch harness' ``Experts``): expert ``e`` maps ``x[e]`` ``[n, in]`` to ``[n, out]``. ``target_parameters``
    adapts ``weight`` (``adapterspec_keras.parameters.parameter_variables``)."""
    import keras

    class Experts(keras.layers.Layer):  # type: ignore[misc]  # keras ships no types: its classes are Any
        def __init__(self) -> None:
            super().__init__(dtype=dtype)
            self.weight = self.add_weight(shape=(experts, fan_out, fan_in), initializer="zeros", name="weight")

        def call(self, x: Any) -> Any:
            return keras.ops.einsum("eni,eoi->eno", x, self.weight)

    return Experts()


def _layer(spec: Mapping[str, Any], dtype: str) -> Any:
    import keras

    kind = spec["kind"]
    if kind == "experts":
        return _experts(spec["num_experts"], spec["in_features"], spec["out_features"], dtype)
    if kind in ("linear", "gpt2_conv1d"):
        layer = keras.layers.Dense(spec["out_features"], use_bias=spec.get("bias", True), dtype=dtype)
        layer.build((None, spec["in_features"]))
    elif kind == "embedding":
        layer = keras.layers.Embedding(spec["num_embeddings"], spec["embedding_dim"], dtype=dtype)
        layer.build((None,))
    elif kind in ("conv1d", "conv2d"):
        cls = keras.layers.Conv1D if kind == "conv1d" else keras.layers.Conv2D
        layer = cls(spec["out_channels"], tuple(spec["kernel_size"]), strides=tuple(spec["stride"]), padding="valid",
                    use_bias=spec.get("bias", True), dtype=dtype)
        layer.build((None, *([None] * len(spec["kernel_size"])), spec["in_channels"]))
    elif kind == "layer_norm":  # torch's nn.LayerNorm over the last axis: gamma = weight, beta = bias
        layer = keras.layers.LayerNormalization(epsilon=spec["eps"], center=spec.get("bias", True), dtype=dtype)
        layer.build((None, spec["normalized_shape"]))
    else:
        raise adapterspec.UnsupportedError(f"layer kind {kind!r} is unknown to this test harness", key=kind)
    return layer


def _keras_layout(kind: str, param: str, value: np.ndarray) -> np.ndarray:
    """A base tensor in the corpus' (torch) layout, as the Keras layer holds it."""
    if param == "bias" or kind in ("embedding", "gpt2_conv1d", "experts", "layer_norm"):
        return value
    if kind == "linear":
        return value.T
    return np.transpose(value, (*range(2, value.ndim), 1, 0))  # [out, in, *k] -> [*k, in, out]


def build_model(model: Mapping[str, Any]) -> tuple[Any, dict[str, Any]]:
    """A Keras model holding a case's layers, and the layers by spec module path (for ``module_map``).

    Weights start deterministic; :func:`load_base` puts the case's base weights in.

    >>> model, layers = build_model({"modules": {"q": {"kind": "linear", "in_features": 4, "out_features": 2}}})  # doctest: +SKIP
    >>> tuple(layers["q"].kernel.shape)                                                                         # doctest: +SKIP
    (4, 2)
    """
    import keras

    if model.get("decoder") is not None:
        return _decoder(model), {}
    dtype = model.get("dtype", "float32")
    layers = {path: _layer(spec, dtype) for path, spec in model.get("modules", {}).items()}
    for i, layer in enumerate(layers.values()):
        for j, variable in enumerate(layer.weights):
            n = int(np.prod(variable.shape))
            variable.assign((np.sin(np.arange(n) * 0.7 + i + j) * 0.3).reshape(tuple(variable.shape)))

    class Holder(keras.Model):  # type: ignore[misc]  # keras ships no types: its classes are Any
        def __init__(self) -> None:
            super().__init__(name="conformance_model")
            self.held = list(layers.values())

        def call(self, inputs: Any) -> Any:
            return inputs

    return Holder(), layers


def _decoder(model: Mapping[str, Any]) -> Any:
    try:
        import keras_hub
    except ImportError:
        raise adapterspec.UnsupportedError("decoder cases need keras-hub",
                                           hint='pip install "adapterspec[keras]"') from None
    d = model["decoder"]
    if d.get("architecture") != "llama":
        raise adapterspec.UnsupportedError(f"decoder architecture {d.get('architecture')!r}")
    # Llama3Backbone: the class keras-hub's from_preset gives a transformers "llama" checkpoint, so that the model
    # type is known (its converter's) and a null target_modules takes PEFT's default for it (SPEC.md 14.2)
    backbone = keras_hub.models.Llama3Backbone(
        vocabulary_size=d["vocab_size"], num_layers=d["num_hidden_layers"], num_query_heads=d["num_attention_heads"],
        hidden_dim=d["hidden_size"], intermediate_dim=d["intermediate_size"],
        num_key_value_heads=d.get("num_key_value_heads", d["num_attention_heads"]), dtype=model.get("dtype", "float32"))
    return keras_hub.models.Llama3CausalLM(backbone=backbone, preprocessor=None)


def load_base(layers: Mapping[str, Any], modules: Mapping[str, Mapping[str, Any]], weights: Path | None) -> None:
    """Assign a case's base weights (torch layout, ``<path>.weight``/``<path>.bias``) to the Keras layers.

    :raises ValueError: a key names no layer, or a shape does not fit.

    >>> load_base(layers, case.modules, case.weights)                                 # doctest: +SKIP
    """
    if weights is None:
        return
    from adapterspec.conformance._io import read_arrays

    for key, value in read_arrays(weights).items():
        path, _, param = key.rpartition(".")
        layer = layers[path]
        if modules[path]["kind"] == "layer_norm":
            variable = getattr(layer, "beta" if param == "bias" else "gamma", None)
        elif param == "bias":
            variable = getattr(layer, "bias", None)
        elif modules[path]["kind"] == "experts":
            variable = layer.weight
        else:
            variable = layer.embeddings if hasattr(layer, "embeddings") else getattr(layer, "kernel", None)
        value = _keras_layout(modules[path]["kind"], param, value)
        if variable is None or tuple(variable.shape) != value.shape:
            raise ValueError(f"base weight {key!r} {value.shape} does not fit the Keras layer")
        variable.assign(value)


def run_modules(layers: Mapping[str, Any], modules: Mapping[str, Mapping[str, Any]],
                inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Each module's output on its own input (corpus layout in, corpus layout out).

    >>> run_modules(layers, case.modules, inputs)["conv"].shape                        # doctest: +SKIP
    (1, 4, 3, 5)
    """
    import keras

    out = {}
    for path, x in inputs.items():
        spec, layer = modules[path], layers[path]
        if spec["kind"] == "embedding":
            y = layer(x.astype("int32"))
        elif spec["kind"] in ("conv1d", "conv2d"):
            pad = [(0, 0), (0, 0)] + [(p, p) for p in spec["padding"]]
            xs = np.transpose(np.pad(x, pad), (0, *range(2, x.ndim), 1))  # channels last
            y = layer(keras.ops.cast(xs, layer.compute_dtype))
            y = keras.ops.transpose(y, (0, y.ndim - 1, *range(1, y.ndim - 1)))
        else:
            y = layer(keras.ops.cast(x, layer.compute_dtype))
        out[path] = np.asarray(keras.ops.convert_to_numpy(keras.ops.cast(y, "float32")), dtype=np.float64)
    return out


def record_decoder_calls(model: Any) -> list[list[dict[str, Any]]]:
    """Record every call of ``model``'s decoder layers (their arguments by name), one list per layer.

    Install it before loading a prompt-learning adapter: the adapter's patches then call through it, so
    it sees what the layers really get.

    >>> calls = record_decoder_calls(causal_lm)                                       # doctest: +SKIP
    """
    import inspect

    calls: list[list[dict[str, Any]]] = []
    for layer in model.backbone.transformer_layers:
        seen: list[dict[str, Any]] = []
        calls.append(seen)
        original = type(layer).call.__get__(layer)
        names = list(inspect.signature(type(layer).call).parameters)[1:]

        def call(*args: Any, _original: Any = original, _names: list[str] = names, _seen: list[dict[str, Any]] = seen,
                 **kwargs: Any) -> Any:
            _seen.append({**dict(zip(_names, args)), **kwargs})
            return _original(*args, **kwargs)

        object.__setattr__(layer, "call", call)
    return calls


def run_prompt(model: Any, calls: list[list[dict[str, Any]]], compute: str,
               inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A decoder case's observable: ``past_key_values`` ``[layers, 2, heads, nvt, head_dim]`` (the prefix in
    each layer's cache) or ``inputs_embeds`` ``[batch, nvt + seq, dim]`` (what the first layer is given).

    >>> run_prompt(model, calls, "prompt_concat", {"inputs_embeds": x})["inputs_embeds"].shape  # doctest: +SKIP
    (2, 7, 8)
    """
    from keras import ops

    def numpy(x: Any) -> np.ndarray:
        return np.asarray(ops.convert_to_numpy(ops.cast(x, "float32")), dtype=np.float64)

    for seen in calls:
        seen.clear()
    if compute == "prefix_key_values":
        model({"token_ids": np.zeros((1, 1), "int32"), "padding_mask": np.ones((1, 1), "int32")})
        out = []
        for seen in calls:
            cache = numpy(seen[-1]["self_attention_cache"])[0]  # (2, nvt + 1, heads, head_dim)
            out.append(np.transpose(cache[:, :-1], (0, 2, 1, 3)))
        return {"past_key_values": np.stack(out)}
    embeds = inputs["inputs_embeds"]
    table = model.backbone.token_embedding
    own = table.__dict__.get("call")
    original = own if own is not None else type(table).call.__get__(table)

    def embed(ids: Any, reverse: bool = False) -> Any:  # the case's inputs_embeds instead of a lookup
        return original(ids, reverse=True) if reverse else ops.cast(embeds, table.compute_dtype)

    object.__setattr__(table, "call", embed)
    try:
        batch, length = embeds.shape[:2]
        model({"token_ids": np.zeros((batch, length), "int32"), "padding_mask": np.ones((batch, length), "int32")})
    finally:
        object.__delattr__(table, "call") if own is None else object.__setattr__(table, "call", own)
    first = [numpy(c["decoder_sequence"]) for c in calls[0]]  # the prompt's pass, then the tokens'
    prompt = np.broadcast_to(first[0], (embeds.shape[0], *first[0].shape[1:]))
    return {"inputs_embeds": np.concatenate([prompt, first[1]], axis=1)}


class KerasImplementation:
    """The built-in Keras backend, driven through :mod:`adapterspec`'s public API."""

    name = "keras"
    checks_error_class = True

    def supports(self, case: Any) -> bool | str:
        """Everything the backend does not refuse as unsupported at run time; needs keras."""
        try:
            import keras  # noqa: F401
        except ImportError:
            return 'keras is not installed: pip install "adapterspec[keras]"'
        return True

    def validate_config(self, config: Mapping[str, Any]) -> None:
        adapterspec.validate_config(config)

    def _load(self, model_spec: Mapping[str, Any], folder: Path, name: str = "default",
              options: Mapping[str, Any] | None = None, built: tuple[Any, dict[str, Any]] | None = None) -> tuple[Any, dict[str, Any]]:
        model, layers = built or build_model(model_spec)
        options = options or {}
        adapterspec.load_adapter(model, folder, adapter_name=name, module_map=layers or None,
                                 verify=bool(options.get("verify")), allow_pickle=bool(options.get("allow_pickle")))
        return model, layers

    def load_folder(self, case: Any, path: Path) -> None:
        built = build_model(case.model)
        folders = adapterspec.list_adapters(path) if case.multi else {"default": path}
        for name, folder in folders.items():
            self._load(case.model, folder, name, case.options, built)

    def _loaded(self, case: Any, adapter: Path) -> tuple[Any, dict[str, Any]]:
        model, layers = build_model(case.model)
        load_base(layers, case.modules, case.weights)
        return self._load(case.model, adapter, built=(model, layers))

    def run_numeric(self, case: Any, case_dir: Path) -> dict[str, np.ndarray]:
        from adapterspec.conformance._io import read_arrays

        inputs = read_arrays(case.inputs) if case.inputs else {}
        if case.compute in ("prefix_key_values", "prompt_concat"):
            model, layers = build_model(case.model)
            calls = record_decoder_calls(model)
            self._load(case.model, case.adapter, built=(model, layers))
            return run_prompt(model, calls, case.compute, inputs)
        if case.compute != "modules":
            raise adapterspec.UnsupportedError(f"{case.compute} is not observable on a Keras model here")
        model, layers = self._loaded(case, case.adapter)
        return run_modules(layers, case.modules, inputs)

    def roundtrip(self, case: Any, src: Path, dst: Path) -> None:
        model, _ = self._loaded(case.source, src)
        adapterspec.save_adapter(model, dst)
