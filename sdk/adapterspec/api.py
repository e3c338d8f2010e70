"""The public, framework-neutral API: each call finds the backend that claims the model and defers to it.

>>> import adapterspec
>>> adapterspec.load_adapter(model, "path/to/adapter")               # doctest: +SKIP
['model.layers.0.self_attn.q_proj', ...]
>>> with adapterspec.disabled_adapters(model):                       # doctest: +SKIP
...     base_logits = model(inputs)
>>> adapterspec.save_adapter(model, "out/my-adapter")                 # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from .adapter import Adapter, check_adapter_name, read_adapter
from .config import AdapterConfig
from .errors import AdapterExistsError, AdapterNotFoundError, AdapterSpecError, BackendError, UnsafeFileError
from .folder import list_adapters, write_adapter, write_adapters
from .naming import PARAMETERS, make_key
from .options import LoadOptions, ModuleMap
from .plugins import get_plugin_manager, plugin_names

__all__ = [
    "active_adapters",
    "adapter_names",
    "backend_name",
    "delete_adapter",
    "disabled_adapters",
    "extract_adapter",
    "inject_adapter",
    "load_adapter",
    "merge_adapters",
    "read_adapters",
    "resolve_source",
    "save_adapter",
    "save_adapters",
    "set_active_adapters",
    "unload",
    "unmerge_adapters",
]


def _hook() -> Any:  # pluggy's HookRelay: its hooks' results are Any
    return get_plugin_manager().hook


def backend_name(model: Any) -> str:
    """The name of the backend plugin that handles ``model``.

    :raises BackendError: no installed backend claims it.
    """
    name: str | None = _hook().adapterspec_backend_name(model=model)
    if name is None:
        raise BackendError(
            f"no adapterspec backend handles {type(model).__module__}.{type(model).__qualname__} objects "
            f"(installed: {', '.join(plugin_names()) or 'none'})",
            hint="pass a torch.nn.Module or a Keras model, or install a backend plugin for your framework")
    return name


def _call(hook: str, model: Any, **kwargs: Any) -> Any:
    result = getattr(_hook(), hook)(model=model, **kwargs)
    if result is None:  # no backend claims the model (raises), or the one that does lacks this hook
        raise BackendError(f"the {backend_name(model)!r} backend does not implement {hook}",
                           hint="upgrade the backend plugin")
    return result


def resolve_source(source: Adapter | str | Path, *, subfolder: str | None = None, revision: str | None = None,
                   token: str | bool | None = None, cache_dir: str | Path | None = None) -> Path | Adapter:
    """Where an adapter comes from: an :class:`Adapter`, a local folder, or a Hub repo id (``org/name``, ``hf://org/name``).

    :returns: the adapter itself, or the local folder holding it (downloaded from the Hub if need be).
    """
    if isinstance(source, Adapter):
        return source
    text = str(source)
    local = Path(text)
    if not text.startswith("hf://") and (local.exists() or local.is_absolute() or text.startswith(".")):
        folder = local / subfolder if subfolder else local
        if subfolder:
            check_adapter_name(Path(subfolder).name)
            try:
                inside = folder.resolve().is_relative_to(local.resolve())
            except (OSError, RuntimeError):  # a symlink loop, a name too long
                inside = False
            if not inside:
                raise UnsafeFileError(f"subfolder {subfolder!r} leaves the folder or cannot be resolved", path=local,
                                      hint="name a real subfolder inside the adapter folder")
        return folder
    from .hub import download_adapter

    return download_adapter(text, subfolder=subfolder, revision=revision, token=token, cache_dir=cache_dir)


def load_adapter(model: Any, source: Adapter | str | Path, adapter_name: str = "default", *,
                 device: Any = None, dtype: Any = None, module_map: ModuleMap | None = None,
                 activate: bool = True, trainable: bool = False, allow_pickle: bool = False,
                 verify: bool = False, subfolder: str | None = None, revision: str | None = None,
                 token: str | bool | None = None, cache_dir: str | Path | None = None) -> list[str]:
    """Load an adapter into ``model`` under ``adapter_name`` -- all of it, or nothing.

    The adapter is read and checked first; then the backend injects its layers and loads the tensors
    straight onto their device. If any step fails, the adapter is removed again and the previously
    active adapters restored, so the model is exactly as before; the error names the key or module.

    :param model: a ``torch.nn.Module``, a Keras model, or any model an installed backend claims.
    :param source: an adapter folder, a Hub repo id (``"org/name"``, ``"hf://org/name"``) or an :class:`Adapter`.
    :param adapter_name: the name it gets in the model.
    :param device: where its tensors go; default: the device of each wrapped layer.
    :param dtype: cast its tensors to this dtype; default: the dtype of each wrapped layer.
    :param module_map: spec module path -> framework layer name (dict or callable), for models whose
        layer names differ from the spec's.
    :param activate: make it the (only) active adapter; otherwise the active set is unchanged.
    :param trainable: make its variables trainable (to fine-tune further).
    :param allow_pickle: read a legacy ``adapter_model.bin`` (``torch.load(weights_only=True)``).
    :param verify: check the tensor data against the recorded sha256 first.
    :param subfolder, revision, token, cache_dir: where in the folder or Hub repo the adapter is.
    :returns: the module paths that received the adapter.

    >>> load_adapter(model, "./my-lora", device="cuda:0")               # doctest: +SKIP
    """
    check_adapter_name(adapter_name)
    backend_name(model)
    where = resolve_source(source, subfolder=subfolder, revision=revision, token=token, cache_dir=cache_dir)
    with _gc_paused():
        return _load(model, where, adapter_name, allow_pickle=allow_pickle, verify=verify, activate=activate,
                     options=LoadOptions(device=device, dtype=dtype, module_map=module_map, trainable=trainable,
                                         initialize=False))


def _load(model: Any, where: Path | Adapter, adapter_name: str, *, allow_pickle: bool, verify: bool,
          activate: bool, options: LoadOptions) -> list[str]:
    adapter = where if isinstance(where, Adapter) else read_adapter(where, allow_pickle=allow_pickle, verify=verify,
                                                                    check_tensors=False)
    adapter.prefetch()  # a thread reads the file while the backend injects the layers
    try:
        with _spec_errors_first(adapter):
            if adapter_name in adapter_names(model):
                raise AdapterExistsError(f"the model already has an adapter named {adapter_name!r}", key=adapter_name,
                                         hint="delete_adapter() it first, or load under another adapter_name")
            previous = active_adapters(model)
            modules = _call("adapterspec_inject", model, config=adapter.config, adapter_name=adapter_name,
                            options=options)
            try:
                _call("adapterspec_load_state", model, adapter=adapter, adapter_name=adapter_name, options=options)
                if not adapter.tensors_checked and not _method_tensors_of(adapter, modules):
                    adapter.check_tensors()
                if activate:
                    set_active_adapters(model, [adapter_name])
            except BaseException:
                _call("adapterspec_delete", model, adapter_name=adapter_name)
                _call("adapterspec_set_active", model, adapter_names=previous)
                raise
    finally:
        adapter._prefetched = None  # a read the backend did not take (meta device, an error) is not kept
    return list(modules)


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector for the block (if it runs at all).

    Loading or deleting an adapter makes or drops thousands of objects (a layer and its dicts per
    module), which set off collections that each walk through the objects of the whole process -- a
    few hundred thousand once torch and a model are imported. One collection afterwards, if any is due,
    replaces them: 1.5-2 ms less per load and delete of the 112-module benchmark adapter (median).
    """
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


@contextlib.contextmanager
def _spec_errors_first(adapter: Adapter) -> Iterator[None]:
    """If the block fails and the adapter's tensor checks were left out (``read_adapter(check_tensors=False)``),
    run them: a tensor that breaks the spec is the error to report, rather than what it broke in the backend."""
    try:
        yield
    except Exception:
        if adapter.tensors_checked:
            raise
        try:
            adapter.check_tensors()
        except AdapterSpecError as spec_error:
            raise spec_error from None
        raise


def _method_tensors_of(adapter: Adapter, modules: list[str]) -> bool:
    """Whether every tensor is a method tensor of a module the backend adapted.

    The backend adapted those modules because the config targets them, with parameters of the shapes
    the config and the model give, and its ``load_state`` found every tensor of the file in its place,
    of its shape: then the spec's tensor checks hold (SPEC.md 10, checks 8-16), and need not run.
    """
    params = PARAMETERS.get(adapter.config.peft_type, ())
    return adapter.tensors.keys() <= {make_key(module, param) for module in modules for param in params}


def inject_adapter(model: Any, config: AdapterConfig | Mapping[str, Any], adapter_name: str = "default", *,
                   device: Any = None, dtype: Any = None, module_map: ModuleMap | None = None,
                   activate: bool = True, trainable: bool = True) -> list[str]:
    """Add a new, freshly initialised adapter (to train it), described by ``config``.

    >>> inject_adapter(model, {"peft_type": "LORA", "r": 8, "target_modules": ["q_proj", "v_proj"]})  # doctest: +SKIP
    """
    check_adapter_name(adapter_name)
    cfg = config if isinstance(config, AdapterConfig) else AdapterConfig.from_dict(config)
    if adapter_name in adapter_names(model):
        raise AdapterExistsError(f"the model already has an adapter named {adapter_name!r}", key=adapter_name,
                                 hint="delete_adapter() it first, or choose another adapter_name")
    options = LoadOptions(device=device, dtype=dtype, module_map=module_map, trainable=trainable)
    modules = _call("adapterspec_inject", model, config=cfg, adapter_name=adapter_name, options=options)
    if activate:
        set_active_adapters(model, [adapter_name])
    return list(modules)


def extract_adapter(model: Any, adapter_name: str = "default") -> Adapter:
    """The adapter ``adapter_name`` as an in-memory :class:`Adapter` (config + tensors in spec layout)."""
    config, tensors = _call("adapterspec_extract_state", model, adapter_name=adapter_name)
    return Adapter.from_tensors(config, tensors)


def save_adapter(model: Any, path: str | Path, adapter_name: str = "default", *, overwrite: bool = False,
                 durable: bool = False) -> Path:
    """Write ``adapter_name``'s config and tensors (only the adapter's) as a spec folder that PEFT loads.

    The write is atomic: the folder holds the old adapter or the new one, whatever happens to the process.

    :param durable: also fsync the files first, so that the adapter survives a power loss once this returns
        (see :mod:`adapterspec.folder`).
    :raises AdapterExistsError: an adapter is at ``path`` already and ``overwrite`` is false.

    >>> save_adapter(model, "out/my-lora")                                 # doctest: +SKIP
    PosixPath('out/my-lora')
    """
    config, tensors = _call("adapterspec_extract_state", model, adapter_name=adapter_name)
    return write_adapter(path, config, tensors, overwrite=overwrite, durable=durable)


def save_adapters(model: Any, path: str | Path, adapter_names_: list[str] | None = None, *,
                  overwrite: bool = False, durable: bool = False) -> Path:
    """Write several of the model's adapters into one folder with a manifest (``default`` in the root).

    :param durable: fsync every file first (see :func:`save_adapter`).
    """
    names = adapter_names_ if adapter_names_ is not None else adapter_names(model)
    states = {name: _call("adapterspec_extract_state", model, adapter_name=name) for name in names}
    return write_adapters(path, states, overwrite=overwrite, durable=durable)


def adapter_names(model: Any) -> list[str]:
    """The adapters loaded in ``model``, in load order."""
    return list(_call("adapterspec_adapter_names", model))


def active_adapters(model: Any) -> list[str]:
    """The adapters active in ``model``'s forward pass now."""
    return list(_call("adapterspec_active_adapters", model))


def set_active_adapters(model: Any, adapter_names_: str | list[str]) -> None:
    """Activate exactly these adapters (a name or a list; several add up; ``[]`` disables all).

    :raises AdapterNotFoundError: a name is not loaded (nothing changes).
    """
    names = [adapter_names_] if isinstance(adapter_names_, str) else list(adapter_names_)
    loaded = adapter_names(model)
    for name in names:
        if name not in loaded:
            raise AdapterNotFoundError(f"no adapter named {name!r} is loaded (loaded: {loaded})", key=name,
                                       hint="load_adapter() it first")
    _call("adapterspec_set_active", model, adapter_names=names)


@contextlib.contextmanager
def disabled_adapters(model: Any) -> Iterator[None]:
    """Run the base model alone inside the block; the active adapters come back after it.

    >>> with disabled_adapters(model):                                    # doctest: +SKIP
    ...     base_out = model(x)
    """
    previous = active_adapters(model)
    _call("adapterspec_set_active", model, adapter_names=[])
    try:
        yield
    finally:
        _call("adapterspec_set_active", model, adapter_names=previous)


def delete_adapter(model: Any, adapter_name: str) -> None:
    """Remove an adapter; when none is left on a layer, the layer is restored to the original object."""
    if adapter_name not in adapter_names(model):
        raise AdapterNotFoundError(f"no adapter named {adapter_name!r} is loaded", key=adapter_name,
                                   hint=f"loaded: {adapter_names(model)}")
    with _gc_paused():
        unmerge_adapters(model)
        _call("adapterspec_delete", model, adapter_name=adapter_name)


def merge_adapters(model: Any, adapter_names_: str | list[str] | None = None) -> None:
    """Add adapters' deltas into the base weights in place (default: the active ones)."""
    names = active_adapters(model) if adapter_names_ is None else (
        [adapter_names_] if isinstance(adapter_names_, str) else list(adapter_names_))
    for name in names:
        if name not in adapter_names(model):
            raise AdapterNotFoundError(f"no adapter named {name!r} is loaded", key=name, hint="load it first")
    _call("adapterspec_merge", model, adapter_names=names)


def unmerge_adapters(model: Any) -> None:
    """Subtract every merged adapter from the base weights again."""
    _call("adapterspec_unmerge", model)


def unload(model: Any, *, merge: bool = False) -> Any:
    """Remove every adapter, restoring the original layers; returns ``model``.

    :param merge: first merge the active adapters into the base weights (PEFT's ``merge_and_unload``),
        so the plain model keeps their effect.
    """
    if merge:
        merge_adapters(model)
    else:
        unmerge_adapters(model)
    for name in adapter_names(model):
        _call("adapterspec_delete", model, adapter_name=name)
    return model


def read_adapters(path: str | Path, **kwargs: Any) -> dict[str, Adapter]:
    """Read every adapter of a multi-adapter folder: name -> :class:`Adapter` (``kwargs`` as :func:`read_adapter`)."""
    return {name: read_adapter(folder, **kwargs) for name, folder in list_adapters(path).items()}
