"""The public, framework-neutral API: each call finds the backend that claims the model and defers to it.

>>> import adapterspec
>>> adapterspec.load_adapter(model, "path/to/adapter")               # doctest: +SKIP
['model.layers.0.self_attn.q_proj', ...]
>>> with adapterspec.disabled_adapters(model):                       # doctest: +SKIP
...     base_logits = model(inputs)
>>> adapterspec.save_adapter(model, "out/my-adapter")                 # doctest: +SKIP

Threads: every function here that reads or changes a model's adapters holds that model's re-entrant lock
(:func:`model_lock`), so calls on one model from several threads run one after another and each sees
the state the previous one left. A forward pass is not serialised with them: hold ``model_lock(model)``
around it when another thread may change the model's adapters meanwhile.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import os
import importlib.util
import threading
import warnings
import weakref
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

from . import _access
from ._dispatch import call_hook, check_result, claimant, unanswered
from ._lora_init import init_refusals, init_warnings
from .adapter import Adapter, check_adapter_name, read_adapter
from .config import AdapterConfig
from .errors import (
    AdapterExistsError,
    AdapterNotFoundError,
    AdapterSpecError,
    AdapterSpecWarning,
    BackendError,
    ConfigError,
    FileFormatError,
    UnsafeFileError,
    UnsupportedError,
)
from .folder import check_set_names, hashing_ahead, list_adapters, read_set, write_adapter, write_adapters
from .identity import FINGERPRINT_KEY, check_base
from .naming import PARAMETERS, make_key
from .options import LoadOptions, ModuleMap
from .plugins import DISABLE_ENV, broken_plugins, get_plugin_manager, plugin_names
from .spec import METADATA_SAVE_ID

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
    "model_lock",
    "read_adapters",
    "resolve_source",
    "save_adapter",
    "save_adapters",
    "set_active_adapters",
    "unload",
    "unmerge_adapters",
]


#: model -> the adapters inject_adapter made in it (saving records the base's name and task in their configs;
#: a loaded adapter's config is saved back as it was, as PEFT does).
_INJECTED: weakref.WeakKeyDictionary[Any, set[str]] = weakref.WeakKeyDictionary()


def _forget_injected(model: Any, adapter_name: str) -> None:
    with contextlib.suppress(TypeError):
        _INJECTED.get(model, set()).discard(adapter_name)


#: id(model) -> (a weak reference to it, its lock); an entry goes with its model. Keyed by identity, not by
#: a weak-keyed dict, so that a model class defining ``__eq__`` still gets a lock of its own.
_LOCKS: dict[int, tuple[weakref.ref[Any], threading.RLock]] = {}
_LOCKS_GUARD = threading.Lock()
_SHARED_LOCK = threading.RLock()  # for the odd model object that cannot be weakly referenced


def model_lock(model: Any) -> threading.RLock:
    """The re-entrant lock that serialises adapterspec's calls on ``model`` (one per model object).

    Every function of this module that changes or reads a model's adapters holds it, so calls from
    several threads on one model run one after another. Hold it yourself around a forward pass that
    must not see another thread switch, merge, load or delete adapters halfway through. It is the lock of the
    object the adapters were loaded into: for adapters in ``task.backbone``, ``model_lock(task.backbone)``.

    >>> with model_lock(model):                                          # doctest: +SKIP
    ...     logits = model(inputs)
    """
    key = id(model)
    entry = _LOCKS.get(key)
    if entry is not None and entry[0]() is model:
        return entry[1]
    with _LOCKS_GUARD:
        entry = _LOCKS.get(key)
        if entry is not None and entry[0]() is model:
            return entry[1]
        try:
            ref = weakref.ref(model, functools.partial(_forget_lock, key))
        except TypeError:
            return _SHARED_LOCK
        lock = threading.RLock()
        _LOCKS[key] = (ref, lock)
        return lock


def _forget_lock(key: int, ref: weakref.ref[Any]) -> None:
    _LOCKS.pop(key, None)


_P = ParamSpec("_P")
_R = TypeVar("_R")


def _serialised(fn: Callable[_P, _R]) -> Callable[_P, _R]:
    """``fn(model, ...)`` run while holding :func:`model_lock` of ``model`` (passed first, or as ``model=``)."""
    @functools.wraps(fn)
    def locked(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        with model_lock(args[0] if args else kwargs["model"]):
            return fn(*args, **kwargs)
    return locked


def backend_name(model: Any) -> str:
    """The name of the backend plugin that handles ``model``.

    :raises BackendError: no installed backend claims it.
    """
    name: str | None = call_hook("adapterspec_backend_name", model=model)
    if name is None:
        what = f"{type(model).__module__}.{type(model).__qualname__}"
        broken = broken_plugins()
        if broken:  # one of them may be this model's backend
            raise BackendError(
                f"no adapterspec backend handles {what} objects (backends: {', '.join(plugin_names()) or 'none'}); "
                f"{len(broken)} installed plugin(s) failed to load and may be the one: " + "; ".join(broken.values()),
                hint="install what the plugin needs (or reinstall it), or set "
                     f"{DISABLE_ENV}={','.join(sorted(broken))} to leave it out")
        found = [f for f in _FRAMEWORKS if importlib.util.find_spec(f) is not None]
        missing = [f for f in _FRAMEWORKS if f not in found]
        raise BackendError(
            f"no adapterspec backend handles {what} objects "
            f"(backends: {', '.join(plugin_names()) or 'none'}; frameworks installed: {', '.join(found) or 'none'})",
            hint="pass a torch.nn.Module or a Keras model" + (
                "; to install a framework: " + " or ".join(_FRAMEWORKS[f] for f in missing) if missing else
                ", or install the backend plugin of your framework"))
    return name


#: Frameworks with a built-in backend -> the command that installs one with it.
_FRAMEWORKS = {"torch": 'pip install "adapterspec[torch]"', "keras": 'pip install "adapterspec[keras]"'}


def _call(hook: str, model: Any, *, checked: bool = True, **kwargs: Any) -> Any:
    """The result of a hook every backend implements, for ``model`` (see :mod:`adapterspec._dispatch`).

    :param checked: check the result's type (``False``: the caller checks it, to undo what the hook did first).
    :raises BackendError: no backend claims the model, its plugin lacks the hook or returned ``None``, raised an
        exception that is no :class:`AdapterSpecError`, or returned a result of the wrong type.
    """
    result = call_hook(hook, checked=checked, model=model, **kwargs)
    if result is None:  # no backend claims the model (raises), or the one that does lacks this hook
        raise unanswered(hook, model, backend_name(model))
    return result


def resolve_source(source: Adapter | str | Path, *, subfolder: str | None = None, revision: str | None = None,
                   token: str | bool | None = None, cache_dir: str | Path | None = None) -> Path | Adapter:
    """Where an adapter comes from: an :class:`Adapter`, a local folder, or a Hub repo id (``org/name``, ``hf://org/name``).

    :returns: the adapter itself, or the local folder holding it (downloaded from the Hub if need be).
    """
    if isinstance(source, Adapter):
        return source
    text = str(source)
    local = Path(text).expanduser() if text.startswith("~") else Path(text)
    if not text.startswith("hf://") and (isinstance(source, Path) or _looks_local(text, local)):
        if not _exists(local):
            raise FileFormatError("no such adapter folder", path=local, hint=_no_folder_hint(local))
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


def _looks_local(text: str, path: Path) -> bool:
    """Whether ``text`` names a local path rather than a Hub repo id (``org/name``): it exists, is absolute,
    starts with ``.`` or ``~``, has a separator a repo id has not (``\\``, or two ``/``), or its parent folder exists
    (``out/my-lroa`` with ``out/`` present is a typo'd folder, not a repo)."""
    try:
        return (_exists(path) or path.is_absolute() or text.startswith((".", "~")) or "\\" in text
                or text.count("/") != 1 or path.parent.is_dir())
    except (OSError, ValueError):  # a name too long, a NUL byte: no repo id either
        return True


def _exists(path: Path) -> bool:
    """Whether ``path`` exists; a look-up refused by permissions raises (not "no such adapter folder")."""
    return _access.exists(path)


def _no_folder_hint(path: Path) -> str:
    """Did-you-mean from the parent folder's entries, and how to name a Hub repo instead."""
    try:
        names = [p.name for p in path.parent.iterdir() if p.is_dir()] if path.parent.is_dir() else []
    except OSError:
        names = []
    close = difflib.get_close_matches(path.name, names, n=1)
    repo = "; a Hub repo is named hf://org/name" if len(path.parts) == 2 else ""
    return (f"did you mean {str(path.parent / close[0])!r}?" if close else "check the path") + repo


def load_adapter(model: Any, source: Adapter | str | Path, adapter_name: str = "default", *,
                 device: Any = None, dtype: Any = None, module_map: ModuleMap | None = None,
                 activate: bool = True, trainable: bool = False, allow_pickle: bool = False,
                 verify: bool = False, subfolder: str | None = None, revision: str | None = None,
                 token: str | bool | None = None, cache_dir: str | Path | None = None,
                 freeze_base: bool = True, strict: bool = False) -> list[str]:
    """Load an adapter into ``model`` under ``adapter_name`` -- all of it, or nothing.

    The adapter is read and checked first; then the backend injects its layers and loads the tensors
    straight onto their device. If any step fails, the adapter is removed again and the previously
    active adapters restored, so the model is exactly as before; the error names the key or module.

    :param model: a ``torch.nn.Module``, a Keras model, or any model an installed backend claims.
    :param source: an adapter folder, a Hub repo id (``"org/name"``, ``"hf://org/name"``) or an :class:`Adapter`.
    :param adapter_name: the name it gets in the model.
    :param device: where its tensors go; default: the device of each wrapped layer.
    :param dtype: cast its tensors to this dtype; default: the dtype of each wrapped layer, but float32 on a
        float16/bfloat16 layer (SPEC.md 7.5, PEFT's ``autocast_adapter_dtype``).
    :param module_map: spec module path -> framework layer name (dict or callable), for models whose
        layer names differ from the spec's.
    :param activate: make it the (only) active adapter; otherwise the active set is unchanged.
    :param trainable: make its variables trainable (to fine-tune further); every base parameter is then
        made untrainable unless ``freeze_base=False`` (see :func:`inject_adapter`).
    :param allow_pickle: read a legacy ``adapter_model.bin`` (``torch.load(weights_only=True)``).
    :param verify: check the tensor data against the sha256 adapterspec records (PEFT's files have none)
        first. Without it, the config, header, keys, shapes and dtypes are checked but not the values: a
        changed byte inside the data loads as it is. Costs a second pass over the data (2.8-3.1x the load
        of the 20 MB benchmark adapter, ``benchmarks/bench_verify.py``); worth it for downloaded files.
    :param subfolder, revision, token, cache_dir: where in the folder or Hub repo the adapter is.
    :param strict: refuse (:class:`~adapterspec.errors.BaseModelMismatchError`) a model that is not the base
        the adapter recorded it was trained on (SPEC.md 9.1); without it, a
        :class:`~adapterspec.errors.BaseModelMismatchWarning` is issued.
    :returns: the module paths that received the adapter.

    >>> load_adapter(model, "./my-lora", device="cuda:0")               # doctest: +SKIP
    """
    check_adapter_name(adapter_name, from_caller=True)
    backend_name(model)
    where = resolve_source(source, subfolder=subfolder, revision=revision, token=token, cache_dir=cache_dir)
    with model_lock(model):
        return _load(model, where, adapter_name, allow_pickle=allow_pickle, verify=verify, activate=activate,
                     strict=strict, options=LoadOptions(device=device, dtype=dtype, module_map=module_map, trainable=trainable,
                                         initialize=False, freeze_base=freeze_base))


def _load(model: Any, where: Path | Adapter, adapter_name: str, *, allow_pickle: bool, verify: bool,
          activate: bool, options: LoadOptions, strict: bool = False) -> list[str]:
    def allocate(nbytes: int) -> Any:  # the memory the file is read into, the backend's choice: pinned for a GPU
        return call_hook("adapterspec_read_buffer", model=model, nbytes=nbytes, options=options)

    # a thread reads the file while the checks run and the backend injects the layers -- unless the backend
    # reads only its slices of each tensor (a sharded model, SPEC.md 16)
    ahead = not call_hook("adapterspec_reads_slices", model=model, options=options)
    adapter = where if isinstance(where, Adapter) else read_adapter(where, allow_pickle=allow_pickle, verify=verify,
                                                                    check_tensors=False,
                                                                    prefetch=allocate if ahead else False)
    if ahead:
        adapter.prefetch(allocate)  # an Adapter passed in: its file is read now, while the backend injects the layers
    try:
        with _spec_errors_first(adapter):
            if adapter_name in adapter_names(model):
                raise AdapterExistsError(f"the model already has an adapter named {adapter_name!r}", key=adapter_name,
                                         hint="delete_adapter() it first, or load under another adapter_name")
            previous = active_adapters(model)
            modules = _call("adapterspec_inject", model, checked=False, config=adapter.config,
                            adapter_name=adapter_name, options=options)
            try:
                check_result("adapterspec_inject", modules, model=model)  # a wrong result: what it injected goes
                _check_base(model, adapter, adapter_name, strict=strict)
                _call("adapterspec_load_state", model, adapter=adapter, adapter_name=adapter_name, options=options)
                if not adapter.tensors_checked and not _method_tensors_of(adapter, modules):
                    adapter.check_tensors()
                if activate:
                    set_active_adapters(model, [adapter_name])
            except BaseException:
                _call("adapterspec_delete", model, adapter_name=adapter_name, unloading=False)
                _restore_active(model, previous)
                raise
    finally:
        adapter._prefetched = None  # a read the backend did not take (meta device, an error) is not kept
    return list(modules)


def _restore_active(model: Any, previous: list[str]) -> None:
    """Make ``previous`` the active set again after a refused load, if the rollback left another one.

    Only then: a backend's ``set_active`` unmerges every merged adapter first (:func:`adapterspec_set_active`), so
    calling it with the set the model has already took a merged adapter out of the base weights (and changed them by
    the unmerge's rounding), and a refused load did not leave the model as it was.
    """
    if active_adapters(model) != previous:
        _call("adapterspec_set_active", model, adapter_names=previous)


def _check_init(config: AdapterConfig, *, where: str) -> None:
    """For a new adapter: refuse an ``init_lora_weights`` it cannot start from here, warn of one that starts
    otherwise than meant (SPEC.md 8.1; a load's refusals are check 5, its warning comes with the config's read)."""
    for pointer, reason, hint in init_refusals(config):
        raise UnsupportedError(reason, pointer=pointer, hint=hint)
    for pointer, message in init_warnings(config, fresh=True):
        warnings.warn(f"{where}: {pointer}: {message}", AdapterSpecWarning, stacklevel=4)


def _check_base(model: Any, adapter: Adapter, adapter_name: str, *, strict: bool) -> None:
    """Compare the base fingerprint the adapter recorded with the model's (before its tensors replace any base weight)."""
    recorded = adapter.metadata.get(FINGERPRINT_KEY)
    if recorded is None:
        return
    identity = call_hook("adapterspec_base_identity", model=model, adapter_name=adapter_name) or {}
    where = str(adapter.weights_file or adapter.path or "the adapter")
    check_base(recorded, identity.get("fingerprint"), strict=strict, where=where,
               base_name=adapter.config.get("base_model_name_or_path"))


def _identified(model: Any, adapter_name: str, config: AdapterConfig,
                base_model_name_or_path: str | None) -> tuple[AdapterConfig, dict[str, str] | None]:
    """The config with ``base_model_name_or_path`` and ``task_type`` filled in, and the metadata with the base's
    fingerprint (SPEC.md 9.1): the caller's name first, then the config's own, then the model's (an absent name
    is filled as PEFT's ``save_pretrained`` fills it, for loaded adapters too); ``task_type`` is filled only for
    an adapter :func:`inject_adapter` made (a loaded config keeps its own, as PEFT keeps it)."""
    identity = call_hook("adapterspec_base_identity", model=model, adapter_name=adapter_name) or {}
    try:
        fresh = adapter_name in _INJECTED.get(model, ())
    except TypeError:
        fresh = False
    known = identity if fresh else {}
    changes: dict[str, Any] = {}
    base = base_model_name_or_path or config.get("base_model_name_or_path") or identity.get("base_model_name_or_path")
    if base and base != config.get("base_model_name_or_path"):
        changes["base_model_name_or_path"] = str(base)
    if config.get("task_type") is None and known.get("task_type"):
        changes["task_type"] = known["task_type"]
    fingerprint = identity.get("fingerprint")
    return (config.replace(**changes) if changes else config), ({FINGERPRINT_KEY: fingerprint} if fingerprint else None)


@contextlib.contextmanager
def _spec_errors_first(adapter: Adapter) -> Iterator[None]:
    """If the block fails and the adapter's tensor checks were left out (``read_adapter(check_tensors=False)``),
    run them: a tensor that breaks the spec is the error to report, rather than what it broke in the backend.

    Except an :class:`UnsupportedError`: the backend cannot apply the adapter to this model whatever the file
    holds (a layer kind it cannot adapt, such as ``nn.MultiheadAttention``), so that is the error to report.
    """
    try:
        yield
    except Exception as exc:
        if adapter.tensors_checked or isinstance(exc, UnsupportedError):
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


@_serialised
def inject_adapter(model: Any, config: AdapterConfig | Mapping[str, Any], adapter_name: str = "default", *,
                   device: Any = None, dtype: Any = None, module_map: ModuleMap | None = None,
                   activate: bool = True, trainable: bool = True, freeze_base: bool = True) -> list[str]:
    """Add a new, freshly initialised adapter (to train it), described by ``config``.

    As PEFT's ``get_peft_model``: with ``trainable``, exactly the adapters' parameters (LoRA matrices,
    ``modules_to_save`` copies, trainable token rows, trained biases) require gradients afterwards; every
    other parameter of the model is frozen, and gets its previous flag back when the last trainable
    adapter is deleted. ``freeze_base=False`` leaves the base's flags as they are.

    >>> inject_adapter(model, {"peft_type": "LORA", "r": 8, "target_modules": ["q_proj", "v_proj"]})  # doctest: +SKIP
    """
    check_adapter_name(adapter_name, from_caller=True)
    cfg = config if isinstance(config, AdapterConfig) else AdapterConfig.from_dict(config)
    if adapter_name in adapter_names(model):
        raise AdapterExistsError(f"the model already has an adapter named {adapter_name!r}", key=adapter_name,
                                 hint="delete_adapter() it first, or choose another adapter_name")
    options = LoadOptions(device=device, dtype=dtype, module_map=module_map, trainable=trainable,
                          freeze_base=freeze_base)
    _check_init(cfg, where=f"adapter {adapter_name!r}")
    # no garbage-collector pause (as for load_adapter): it is process-wide and stalled other threads' collections
    modules = _call("adapterspec_inject", model, checked=False, config=cfg, adapter_name=adapter_name,
                    options=options)
    try:
        check_result("adapterspec_inject", modules, model=model)
    except BackendError:  # the plugin injected something and said otherwise: what it injected goes
        _call("adapterspec_delete", model, adapter_name=adapter_name, unloading=False)
        raise
    with contextlib.suppress(TypeError):  # a model that cannot be weakly referenced records no base name
        _INJECTED.setdefault(model, set()).add(adapter_name)
    if activate:
        set_active_adapters(model, [adapter_name])
    return list(modules)


@_serialised
def extract_adapter(model: Any, adapter_name: str = "default") -> Adapter:
    """The adapter ``adapter_name`` as an in-memory :class:`Adapter` (config + tensors in spec layout)."""
    config, tensors = _call("adapterspec_extract_state", model, adapter_name=adapter_name)
    return Adapter.from_tensors(config, tensors)


@_serialised
def save_adapter(model: Any, path: str | Path, adapter_name: str = "default", *, overwrite: bool = False,
                 durable: bool = False, base_model_name_or_path: str | None = None) -> Path:
    """Write ``adapter_name``'s config and tensors (only the adapter's) as a spec folder that PEFT loads.

    The write is atomic: the folder holds the old adapter or the new one, whatever happens to the process.

    :param durable: also fsync the files first, so that the adapter survives a power loss once this returns
        (see :mod:`adapterspec.folder`).
    :param base_model_name_or_path: the base model's Hub id or folder, recorded in the config (default: the
        config's own, else what the backend knows: transformers' ``name_or_path``, the keras-hub preset).
        ``task_type`` and the base's fingerprint are recorded too where known (SPEC.md 9.1).
    :raises AdapterExistsError: an adapter is at ``path`` already and ``overwrite`` is false.

    >>> save_adapter(model, "out/my-lora")                                 # doctest: +SKIP
    PosixPath('out/my-lora')
    """
    config, tensors = _call("adapterspec_extract_state", model, adapter_name=adapter_name)
    tensors = hashing_ahead(tensors)  # the sha256 runs while the backend fingerprints the base
    config, metadata = _identified(model, adapter_name, config, base_model_name_or_path)
    return _written(model, path, functools.partial(write_adapter, path, config, tensors, overwrite=overwrite,
                                             durable=durable, metadata=metadata))


def _written(model: Any, path: str | Path, write: Callable[[], Path]) -> Path:
    """``write()`` into ``path``, run where the backend says (one process of a sharded model, SPEC.md 16), else here.

    :raises UnsupportedError: the process that wrote (rank 0) was given another path than this one (each process
        of a sharded model must name the same folder; this one's was never written).
    """
    done = call_hook("adapterspec_write", model=model, write=write)
    if done is None:
        return write()
    done = Path(done)
    if os.path.abspath(done) != os.path.abspath(path):
        raise UnsupportedError(f"the process that writes the sharded model's adapter wrote {str(done)!r}; this "
                               "process asked for another folder, which was not written", path=path,
                               hint="pass the same path to save_adapter on every process")
    return done


@_serialised
def save_adapters(model: Any, path: str | Path, adapter_names_: list[str] | None = None, *,
                  overwrite: bool = False, durable: bool = False, base_model_name_or_path: str | None = None) -> Path:
    """Write several of the model's adapters into one folder with a manifest (``default`` in the root).

    :param durable: fsync every file first (see :func:`save_adapter`).
    :param base_model_name_or_path: recorded in every config (see :func:`save_adapter`).
    :raises ConfigError: two names differ only in letter case (``Fr`` and ``fr``: on macOS and Windows one folder
        would replace the other, SPEC.md 3.3); nothing is written.
    """
    names = adapter_names_ if adapter_names_ is not None else adapter_names(model)
    check_set_names(names)
    states = {}
    for name in names:
        config, tensors = _call("adapterspec_extract_state", model, adapter_name=name)
        tensors = hashing_ahead(tensors)
        config, metadata = _identified(model, name, config, base_model_name_or_path)
        states[name] = (config, tensors, metadata)
    return _written(model, path, functools.partial(write_adapters, path, states, overwrite=overwrite, durable=durable))


@_serialised
def adapter_names(model: Any) -> list[str]:
    """The adapters loaded in ``model``, in load order."""
    return list(_call("adapterspec_adapter_names", model))


@_serialised
def active_adapters(model: Any) -> list[str]:
    """The adapters active in ``model``'s forward pass now."""
    return list(_call("adapterspec_active_adapters", model))


@_serialised
def set_active_adapters(model: Any, adapter_names_: str | list[str]) -> None:
    """Activate exactly these adapters (a name or a list; several add up; ``[]`` disables all).

    :raises AdapterNotFoundError: a name is not loaded (nothing changes).
    :raises ConfigError: a name is given twice (PEFT would apply that adapter twice; nothing changes).
    """
    names = _named_once([adapter_names_] if isinstance(adapter_names_, str) else list(adapter_names_))
    loaded = adapter_names(model)
    for name in names:
        if name not in loaded:
            raise AdapterNotFoundError(f"no adapter named {name!r} is loaded (loaded: {loaded})", key=name,
                                       hint="load_adapter() it first")
    _call("adapterspec_set_active", model, adapter_names=names)


def _named_once(names: list[str]) -> list[str]:
    """``names``, refused when one is there twice: PEFT's ``set_adapter(['a', 'a'])`` applies ``a`` twice, which
    no backend does (it dropped the second, silently).

    :raises ConfigError: naming the adapter.
    """
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise ConfigError(f"the list names adapter {name!r} twice (PEFT would apply it twice)", key=name,
                              hint="name each adapter once")
        seen.add(name)
    return names


@contextlib.contextmanager
def disabled_adapters(model: Any) -> Iterator[None]:
    """Run the base model alone inside the block; the active adapters come back after it.

    >>> with disabled_adapters(model):                                    # doctest: +SKIP
    ...     base_out = model(x)
    """
    with model_lock(model):
        previous = active_adapters(model)
        _call("adapterspec_set_active", model, adapter_names=[])
    try:
        yield
    finally:
        with model_lock(model):  # an adapter another thread deleted meanwhile is not brought back
            loaded = adapter_names(model)
            _call("adapterspec_set_active", model, adapter_names=[n for n in previous if n in loaded])


@_serialised
def delete_adapter(model: Any, adapter_name: str) -> None:
    """Remove an adapter; when none is left on a layer, the layer is restored to the original object.

    The other adapters stay as they are: merged ones stay merged, their weights bit for bit (as in PEFT), and the
    base tensors the adapter's file replaced (trained biases, embeddings) come back. Deleting a *merged* adapter
    (PEFT refuses) first unmerges every merged adapter, as :func:`unmerge_adapters` does: the base weights are back
    to floating-point rounding, and the other adapters run unmerged until merged again.

    :raises AdapterNotFoundError: no adapter of that name is loaded.
    :raises UnsupportedError: a base tensor the adapter's file replaced belongs to a module another, merged adapter
        is merged into, so it cannot come back exactly; nothing changes (unmerge first).

    >>> delete_adapter(model, "fr")                                       # doctest: +SKIP
    """
    if adapter_name not in adapter_names(model):
        raise AdapterNotFoundError(f"no adapter named {adapter_name!r} is loaded", key=adapter_name,
                                   hint=f"loaded: {adapter_names(model)}")
    if not _deletes_by_itself(model):
        unmerge_adapters(model)  # a plugin of the older contract: its delete leaves a merged delta in the weights
    _call("adapterspec_delete", model, adapter_name=adapter_name, unloading=False)
    _forget_injected(model, adapter_name)


def _deletes_by_itself(model: Any) -> bool:
    """Whether the plugin claiming ``model`` implements ``adapterspec_delete`` with its ``unloading`` argument, so
    that it unmerges what a delete needs itself (and keeps the other merged adapters merged).

    A plugin written before the argument existed left a merged adapter's delta in the base weights on any delete
    (``delete_adapter`` unmerged every adapter before calling it): for such a plugin it still does, so that deleting
    a merged adapter never leaves its delta behind.
    """
    name = claimant(model)
    return any(impl.plugin_name == name and "unloading" in impl.argnames
               for impl in get_plugin_manager().hook.adapterspec_delete.get_hookimpls())


@_serialised
def merge_adapters(model: Any, adapter_names_: str | list[str] | None = None) -> None:
    """Add adapters' deltas into the base weights in place (default: the active ones).

    :raises ConfigError: a name is given twice (nothing changes).
    """
    names = active_adapters(model) if adapter_names_ is None else _named_once(
        [adapter_names_] if isinstance(adapter_names_, str) else list(adapter_names_))
    for name in names:
        if name not in adapter_names(model):
            raise AdapterNotFoundError(f"no adapter named {name!r} is loaded", key=name, hint="load it first")
    _call("adapterspec_merge", model, adapter_names=names)


@_serialised
def unmerge_adapters(model: Any) -> None:
    """Subtract every merged adapter from the base weights again."""
    _call("adapterspec_unmerge", model)


@_serialised
def unload(model: Any, *, merge: bool = False) -> Any:
    """Remove every adapter, restoring the original layers; returns ``model``.

    :param merge: first merge the active adapters into the base weights (PEFT's ``merge_and_unload``),
        so the plain model computes what the adapted one did: it keeps the copies of modules saved whole
        that ran, the trainable token rows, and the parameters (biases, embeddings) adapters replaced.
    """
    if merge:
        merge_adapters(model)
    else:
        unmerge_adapters(model)
    merged = active_adapters(model) if merge else []
    # the unmerged ones first: while merged adapters remain, a backend keeps what the forward pass used
    for name in sorted(adapter_names(model), key=lambda n: n in merged):
        _call("adapterspec_delete", model, adapter_name=name, unloading=True)
        _forget_injected(model, name)
    return model


def read_adapters(path: str | Path, **kwargs: Any) -> dict[str, Adapter]:
    """Read every adapter of a multi-adapter folder: name -> :class:`Adapter` (``kwargs`` as :func:`read_adapter`).

    The adapters are those of one save of the set: a save under way is waited for, and adapters of two saves (an
    interrupted save) are refused with :class:`~adapterspec.errors.IntegrityError` (see :func:`write_adapters`).

    >>> sorted(read_adapters("several"))                                 # doctest: +SKIP
    ['default', 'fr']
    """
    adapters, _ = read_set(path, functools.partial(read_adapter, **kwargs),
                           lambda adapter: adapter.metadata.get(METADATA_SAVE_ID))
    return adapters
