"""The Flax backend under ``adapterspec conformance --impl flax``: builds each case's tiny model in NNX.

A case's model is a tree of ``nnx.Dict`` holding ``nnx.Linear``/``nnx.Embed`` layers at the case's
module paths, base weights loaded from the case's file (torch layout, transposed into Flax kernels).
Adapters go in through :func:`adapterspec.load_adapter` and come out through
:func:`adapterspec.save_adapter` -- the public API only. Cases with other layer kinds (convolutions,
GPT-2 ``Conv1D``), whole decoders (prefix/prompt tuning, PEFT's default targets for a null ``target_modules``) or
other methods are reported UNSUPPORTED.

>>> from adapterspec.conformance.runner import run_suite                 # doctest: +SKIP
>>> run_suite(FlaxImplementation()).counts()["failed"]                    # doctest: +SKIP
0
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import adapterspec

__all__ = ["FlaxImplementation", "build_model", "run_modules"]

#: Layer kinds of the corpus this backend builds, and methods it adapts them with.
LAYER_KINDS = ("linear", "embedding")
METHODS = ("LORA", "IA3")


def _folder_method(path: Path) -> str | None:
    """The ``peft_type`` of a folder case's adapter when it is a portable method (SPEC 14.1), else ``None``."""
    import json

    from adapterspec._rules import PORTABLE_METHODS

    try:
        method = json.loads((path / "adapter_config.json").read_text(encoding="utf-8")).get("peft_type")
    except (OSError, ValueError, AttributeError):
        return None
    return method if isinstance(method, str) and method in PORTABLE_METHODS else None


def build_model(model: Mapping[str, Any]) -> Any:
    """An NNX module holding a case's layers at their module paths (nested ``nnx.Dict``), in its dtype.

    Weights start deterministic (a sine of the element index); load the case's base weights over them.

    >>> m = build_model({"modules": {"layers.0.q": {"kind": "linear", "in_features": 4, "out_features": 2}}})
    >>> type(m["layers"]["0"]["q"]).__name__
    'Linear'
    """
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    dtype = jnp.dtype(model.get("dtype", "float32"))
    count = iter(range(1 << 30))

    def init(key: Any, shape: tuple[int, ...], dtype_: Any) -> Any:
        # NumPy on the host: no XLA compile per shape (random initialisers cost seconds on CPU)
        j = next(count)
        return jnp.asarray((np.sin(np.arange(np.prod(shape)) * 0.7 + j) * 0.3).reshape(shape).astype(dtype_))

    if model.get("decoder") is not None:
        raise adapterspec.UnsupportedError("whole decoders are not built by the flax conformance driver")
    root = nnx.Dict()
    rngs = nnx.Rngs(0)
    for path, spec in model.get("modules", {}).items():
        parent = root
        *parents, leaf = path.split(".")
        for name in parents:
            if name not in parent:
                parent[name] = nnx.Dict()
            parent = parent[name]
        kind = spec["kind"]
        if kind == "linear":
            layer = nnx.Linear(spec["in_features"], spec["out_features"], use_bias=spec.get("bias", True),
                               dtype=dtype, param_dtype=dtype, kernel_init=init, bias_init=init, rngs=rngs)
        elif kind == "embedding":
            layer = nnx.Embed(spec["num_embeddings"], spec["embedding_dim"], dtype=dtype, param_dtype=dtype,
                              embedding_init=init, rngs=rngs)
        else:
            raise adapterspec.UnsupportedError(f"layer kind {kind!r} has no NNX counterpart here", key=path)
        parent[leaf] = layer
    return root


def _layer(model: Any, path: str) -> Any:
    node = model
    for name in path.split("."):
        node = node[name]
    return node


def load_base(model: Any, weights: Path | None) -> None:
    """Load a case's base weights (torch layout, keys ``<path>.weight``/``<path>.bias``) into the NNX layers.

    :raises ValueError: a key names no layer, or a shape does not fit.
    """
    if weights is None:
        return
    import jax.numpy as jnp
    from flax import nnx
    from safetensors.flax import load_file

    for key, value in load_file(str(weights)).items():
        path, _, param = key.rpartition(".")
        layer = _layer(model, path)
        if isinstance(layer, nnx.Embed) and param == "weight":
            variable, value = layer.embedding, value
        elif isinstance(layer, nnx.Linear) and param == "weight":
            variable, value = layer.kernel, value.T
        elif isinstance(layer, nnx.Linear) and param == "bias" and layer.bias is not None:
            variable = layer.bias
        else:
            raise ValueError(f"base weight {key!r} fits no layer of the model")
        old = variable.get_value()
        if tuple(value.shape) != tuple(old.shape):
            raise ValueError(f"base weight {key!r}: shape {value.shape} does not fit {old.shape}")
        variable.set_value(jnp.asarray(value, dtype=old.dtype))


def run_modules(model: Any, inputs: Mapping[str, Any]) -> dict[str, Any]:
    """Each module's output on its own input (input key = module path), as NumPy arrays.

    Each call is one ``nnx.jit`` (one XLA compile instead of one per eager operation).
    """
    import numpy as np
    from flax import nnx

    from .graph import get_node

    apply = nnx.jit(lambda layer, x: layer(x))
    out = {}
    for path, x in inputs.items():
        layer = get_node(model, tuple(path.split(".")))
        out[path] = np.asarray(apply(layer, x), dtype=np.float64)
    return out


class FlaxImplementation:
    """The Flax NNX backend, driven through :mod:`adapterspec`'s public API."""

    name = "flax"
    checks_error_class = True

    def supports(self, case: Any) -> bool | str:
        """Linear and embedding layers, LoRA and IA3; needs jax and flax."""
        try:
            import flax.nnx  # noqa: F401
        except ImportError:
            return "jax/flax are not installed"
        source = case.source if case.kind == "roundtrip" else case
        if source is None:
            return True
        model = getattr(source, "model", None) or {}
        decoder = model.get("decoder")
        if decoder:  # prefix/prompt tuning, and PEFT's default targets for a null target_modules (SPEC 14.2)
            architecture = decoder.get("architecture", "transformers")
            return (f"the case's model is a whole {architecture} decoder, which the flax driver does not build "
                    f"(it builds {' and '.join(LAYER_KINDS)} layers at the case's module paths)")
        kinds = {m["kind"] for m in model.get("modules", {}).values()}
        if kinds - set(LAYER_KINDS):
            return f"layer kinds {sorted(kinds - set(LAYER_KINDS))} are not supported (only {', '.join(LAYER_KINDS)})"
        method = source.data.get("method")
        if method is None and case.kind == "folder" and case.error == "UnsupportedError" and case.key is not None:
            method = _folder_method(case.path)  # a layer's refusal (check 18) of a method this backend lacks
        if method is not None and method.upper() not in METHODS:
            return f"{method} is not implemented by the flax backend"
        return True

    def validate_config(self, config: Mapping[str, Any]) -> None:
        """The core SDK's validation (the backend adds none)."""
        adapterspec.validate_config(config)

    def load_folder(self, case: Any, path: Path) -> None:
        """Build the case's model and load the folder (every adapter of it when ``case.multi``)."""
        model = build_model(case.model)
        options = case.options
        folders = adapterspec.list_adapters(path) if case.multi else {"default": path}
        for name, folder in folders.items():
            adapterspec.load_adapter(model, folder, adapter_name=name, verify=bool(options.get("verify")),
                                     allow_pickle=bool(options.get("allow_pickle")))

    def _loaded(self, case: Any, adapter: Path) -> Any:
        model = build_model(case.model)
        load_base(model, case.weights)
        adapterspec.load_adapter(model, adapter)
        return model

    def run_numeric(self, case: Any, case_dir: Path) -> dict[str, Any]:
        """Load the case's adapter and run each module on its input."""
        if case.compute != "modules":
            raise adapterspec.UnsupportedError(f"compute={case.compute!r} needs a whole decoder")
        from safetensors.flax import load_file

        model = self._loaded(case, case.adapter)
        return run_modules(model, load_file(str(case.inputs)) if case.inputs else {})

    def roundtrip(self, case: Any, src: Path, dst: Path) -> None:
        """Load ``src`` into the source case's model and save it to ``dst``."""
        model = self._loaded(case.source, src)
        adapterspec.save_adapter(model, dst)
