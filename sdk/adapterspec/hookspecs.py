"""The hooks a backend plugin implements -- the whole contract between adapterspec and a framework.

A backend is a module (or object) with functions marked ``@adapterspec.hookimpl`` whose names match
the hooks below, registered through the ``adapterspec`` entry-point group::

    [project.entry-points.adapterspec]
    myframework = "my_package.plugin"

Every model-level hook is *first-result*: pluggy calls the plugins in turn and stops at the first one
that returns something other than ``None``. A backend therefore returns ``None`` for a model it does
not handle (see :func:`adapterspec_backend_name`) and a value -- even ``True`` or ``[]`` -- for one it does.

Names used throughout:

* *module path* -- the spec's name of a module, as PEFT and transformers name it
  (``"model.layers.0.self_attn.q_proj"``); a backend maps it onto its own layers.
* *canonical key* -- a tensor key exactly as stored in the file
  (``"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"``), see :mod:`adapterspec.naming`.
* *spec layout* -- tensors in the orientation SPEC.md fixes (PEFT/torch: ``lora_A`` is ``[r, in]``);
  a backend whose kernels are ``[in, out]`` transposes when loading and when extracting.

A hook raises :mod:`adapterspec.errors` only and returns what its specification says: any other exception
escaping it, or a result of another type, reaches the user as a :class:`~adapterspec.errors.BackendError` naming
the plugin and the hook (:mod:`adapterspec._dispatch`).

The hooks must be transactional: one that raises leaves the model exactly as it was.
:func:`adapterspec.load_adapter` relies on that and on :func:`adapterspec_delete` to roll back an
injection whose state failed to load.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from .adapter import Adapter
    from .config import AdapterConfig
    from .options import LoadOptions

__all__ = ["hookimpl", "hookspec"]

hookspec = pluggy.HookspecMarker("adapterspec")
hookimpl = pluggy.HookimplMarker("adapterspec")


@hookspec(firstresult=True)
def adapterspec_backend_name(model: Any) -> str | None:
    """Claim a model object: return this backend's name if it handles ``model``. Stops at first non-None result.

    Must be cheap and must not import a framework the user has not imported (check
    ``sys.modules`` first), so that claiming never costs a framework import.

    :param model: any object the user passed to :func:`adapterspec.load_adapter` and friends.
    :returns: the backend's name (``"torch"``, ``"keras"``), or ``None`` if not this backend's model.
    """


@hookspec(firstresult=True)
def adapterspec_inject(model: Any, config: AdapterConfig, adapter_name: str, options: LoadOptions) -> list[str] | None:
    """Add adapter layers named ``adapter_name`` to every module ``config`` targets. Stops at first non-None result.

    New layers are initialised as the config says (``init_lora_weights``: LoRA's B is zero, so the
    model's output is unchanged), placed on ``options.device`` or else the wrapped layer's device,
    in ``options.dtype`` or else the wrapped layer's dtype (float32 on a half-precision layer, SPEC.md 7.5),
    and are trainable only if ``options.trainable``; with ``options.trainable`` and ``options.freeze_base``, every variable of the
    model that belongs to no adapter is made untrainable (restored when the last such adapter is deleted).
    Injection does not activate the adapter (see :func:`adapterspec_set_active`).
    With ``options.initialize`` false (``load_adapter``: the state is loaded next) the initialisation
    may be skipped: the variables only need their shape, dtype and device.

    :param config: the validated adapter config; its target matching is in :meth:`AdapterConfig.matches`.
    :param options: device, dtype, module-name mapping, trainability.
    :returns: the module paths (spec names) that received an adapter, in model order.
    :raises AdapterExistsError: ``adapter_name`` is already loaded.
    :raises TargetNotFoundError: no module matches, or a target has no mapping onto this model.
    :raises UnsupportedError: a target is a layer kind this backend cannot adapt with this method.
    """


@hookspec(firstresult=True)
def adapterspec_load_state(model: Any, adapter: Adapter, adapter_name: str, options: LoadOptions) -> list[str] | None:
    """Copy ``adapter``'s tensors into the layers injected for ``adapter_name``. Stops at first non-None result.

    Reads the tensors itself (``adapter.load_tensors(framework, device)``) so that they go from the file
    straight to their device. Every key must find its place and every place must be filled, each
    tensor of its parameter's shape: all checks run before the first assignment, so a raise leaves
    the adapter's tensors unchanged. :func:`adapterspec.load_adapter` relies on these checks: when
    they pass and every tensor is a method tensor of a module the backend adapted, it skips the
    spec's own tensor checks (``adapter.tensors_checked`` is then ``False``; the tensors' dtypes are
    checked). Auxiliary tensors (SPEC.md 5.3) come only in adapters whose tensors were checked.

    :returns: the canonical keys that were loaded.
    :raises MissingTensorError: an injected parameter has no tensor in the file.
    :raises UnexpectedTensorError: a tensor has no injected parameter to go to.
    :raises ShapeMismatchError: a tensor's shape does not fit its layer.
    """


@hookspec(firstresult=True)
def adapterspec_extract_state(model: Any, adapter_name: str) -> tuple[AdapterConfig, dict[str, Any]] | None:
    """Return ``adapter_name``'s config and tensors, canonical keys, spec layout. Stops at first non-None result.

    Tensors may be framework tensors or NumPy arrays; :func:`adapterspec.write_adapter` accepts both.
    The config is the one the adapter was injected with (so a save/load round trip is exact).

    :raises AdapterNotFoundError: no adapter of that name is loaded.
    """


@hookspec(firstresult=True)
def adapterspec_adapter_names(model: Any) -> list[str] | None:
    """List the adapters loaded in ``model``, in load order. Stops at first non-None result.

    :returns: the names, ``[]`` for a model this backend handles that has none.
    """


@hookspec(firstresult=True)
def adapterspec_active_adapters(model: Any) -> list[str] | None:
    """List the adapters that take part in ``model``'s forward pass now. Stops at first non-None result.

    :returns: the active names, ``[]`` when adapters are disabled or none is loaded.
    """


@hookspec(firstresult=True)
def adapterspec_set_active(model: Any, adapter_names: list[str]) -> bool | None:
    """Make exactly ``adapter_names`` active (several at once add up; ``[]`` disables all). Stops at first non-None result.

    Switching must not copy base weights. If adapters are merged, they are unmerged first.

    :returns: ``True``.
    :raises AdapterNotFoundError: a name is not loaded; nothing changes then.
    :raises UnsupportedError: adapters without a defined result together on one layer (SPEC.md 8.9,
        :func:`adapterspec.config.mix_refusal`); nothing changes then.
    """


@hookspec(firstresult=True)
def adapterspec_delete(model: Any, adapter_name: str, unloading: bool) -> bool | None:
    """Remove ``adapter_name``'s layers and tensors from ``model``. Stops at first non-None result.

    When the last adapter on a module goes, the module is restored to the very object it was
    before injection, so ``load`` followed by ``delete`` leaves the model as it was.

    :param unloading: ``True`` from :func:`adapterspec.unload`, which deletes every adapter (the unmerged ones
        first): a merged adapter's delta stays in the base weights, and while any adapter is merged so does whatever
        else the forward pass used (the copy of a module saved whole that ran, base tensors an adapter's file
        replaced) -- that is how ``unload(merge=True)`` works. ``False`` from :func:`adapterspec.delete_adapter` and
        a failed load's rollback: the other adapters stay as they are (merged ones merged, their weights bit for
        bit) and the base tensors the adapter's file replaced come back; deleting a merged adapter unmerges every
        merged adapter first (as :func:`adapterspec_unmerge`).
    :returns: ``True``.
    :raises AdapterNotFoundError: no adapter of that name is loaded.
    :raises UnsupportedError: (``unloading`` false) a base tensor the adapter's file replaced belongs to a module
        another, merged adapter is merged into: it cannot come back exactly (nothing changes).
    """


@hookspec(firstresult=True)
def adapterspec_merge(model: Any, adapter_names: list[str]) -> bool | None:
    """Add the adapters' weight deltas into the base weights, in place. Stops at first non-None result.

    The adapter layers stay (so :func:`adapterspec_unmerge` can subtract them again); the forward
    pass then skips them. Methods without a weight delta (prefix and prompt tuning) raise.

    :returns: ``True``.
    :raises AdapterNotFoundError: a name is not loaded.
    :raises UnsupportedError: a method or layer cannot be merged, or adapters without a defined result together on
        one layer would be merged or active (SPEC.md 8.9, :func:`adapterspec.config.mix_refusal`).
    """


@hookspec(firstresult=True)
def adapterspec_unmerge(model: Any) -> bool | None:
    """Subtract every merged adapter from the base weights again. Stops at first non-None result.

    :returns: ``True`` (also when nothing was merged).
    """


@hookspec(firstresult=True)
def adapterspec_read_buffer(model: Any, nbytes: int, options: LoadOptions) -> Any | None:
    """Where :func:`adapterspec.load_adapter` should read the adapter's file to, when not into ordinary
    memory. Stops at first non-None result.

    Optional: called before :func:`adapterspec_inject`, as the file's read starts (on a thread, while the
    layers are injected). A backend that copies the tensors to an accelerator returns page-locked host
    memory (torch: pinned memory for a model on a GPU), which the copy reads at the bus's speed.

    :param nbytes: the file's size.
    :returns: a writable, C-contiguous NumPy ``uint8`` array of ``nbytes`` elements; ``None``: NumPy's.
    """


@hookspec(firstresult=True)
def adapterspec_reads_slices(model: Any, options: LoadOptions) -> bool | None:
    """Whether this process of ``model`` reads only its slices of the adapter's tensors.
    Stops at first non-None result.

    Optional: asked by :func:`adapterspec.load_adapter` before it starts reading the file. ``True`` (a model
    sharded over several processes, SPEC.md 16): the file is not read ahead (nor is
    :func:`adapterspec_read_buffer` asked); the backend's :func:`adapterspec_load_state` reads the slices
    its process holds from ``adapter.weights_file``. ``None`` or ``False``: the whole file is read ahead.
    """


@hookspec(firstresult=True)
def adapterspec_write(model: Any, write: Callable[[], Path]) -> Path | None:
    """Run ``write`` (which writes the adapter folder and returns its path) the way ``model``'s processes
    must. Stops at first non-None result.

    Optional: called by :func:`adapterspec.save_adapter` and :func:`adapterspec.save_adapters` after
    :func:`adapterspec_extract_state` (which, for a sharded model, gathered every tensor whole on every
    process). A backend whose model is sharded over several processes runs ``write`` on one of them
    and makes every process return its outcome (the path, or an error). ``None``: this process writes.

    :returns: the folder written.
    """


@hookspec(firstresult=True)
def adapterspec_base_identity(model: Any, adapter_name: str) -> dict[str, str] | None:
    """Tell what is known about the base model ``adapter_name`` sits on. Stops at first non-None result.

    Saving records it in the adapter (SPEC.md 9.1); loading compares the fingerprint with the one recorded.

    :returns: any of ``base_model_name_or_path`` (the model's Hub id or folder), ``task_type`` (PEFT's task
        type of the model) and ``fingerprint`` (:func:`adapterspec.identity.fingerprint` of the base weights
        of the modules the adapter adapts, or of the input embedding for prefix/prompt tuning), ``{}`` when
        none is known. A backend without this hook records and checks nothing.
    :raises AdapterNotFoundError: no adapter of that name is loaded.
    """


@hookspec
# a spec: pluggy runs the plugins' implementations, never this body
def adapterspec_conformance_implementations() -> list[Any]:  # type: ignore[empty-body]
    """Offer implementations for ``adapterspec conformance`` to test. Called on every plugin; results are collected.

    :returns: objects following :class:`adapterspec.conformance.Implementation` (usually one per plugin).
    """
