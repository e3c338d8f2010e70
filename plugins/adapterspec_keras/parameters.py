"""LoRA on parameters (``target_parameters``, SPEC.md 15.1) on keras-hub's MoE models: the mirror of
:mod:`adapterspec_torch.parameters`.

transformers 5 holds a MoE layer's experts as two 3-D parameters of one module, ``mlp.experts.gate_up_proj``
``[E, 2I, H]`` (gate rows first, then up) and ``mlp.experts.down_proj`` ``[E, H, I]``, and the router as
``mlp.gate.weight`` ``[E, H]``. keras-hub's converters stack them into an ``expert_bank`` with ``get_tensor`` +
``np.stack`` + ``assign`` -- which the recording loader of :mod:`~adapterspec_keras.converters` cannot see -- so
where each parameter lies in the Keras variables comes from a small table per ``model_type`` (:data:`EXPERT_TABLE`):
the Keras layer whose ``call`` reads it (from the decoder layer), and the variables that hold it, each the
transposed slice ``[lo:hi]`` of the parameter's output rows (Mixtral's ``gate_up_proj`` is split into the gate and
intermediate kernels; Qwen-MoE keeps one fused kernel ``[E, H, 2I]``). A ``target_parameters`` entry that selects
anything else -- or a model type not in the table -- is refused, typed, naming it: never skipped.

Unmerged, that Keras layer's ``call`` runs inside ``keras.StatelessScope`` mapping each of its variables to
``variable + sum of the running adapters' deltas`` (SPEC.md 15.1: the module's own forward with ``p`` replaced by
``p + delta``): the variables are never written, and gradients reach the adapters' factors. Merging adds the deltas
to the variables.

>>> EXPERT_TABLE["mixtral"][1].parts[0].variable
'_expert_feedforward_gate_dense'
>>> parameter_prefix(0, 2), parameter_prefix(1, 2)
('base_layer.', '')
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import keras
from keras import ops

from adapterspec import AdapterConfig, LoadOptions
from adapterspec.errors import UnsupportedError

from .bank import AdapterBank, GroupKey, Ref
from .devices import target_of
from .layers import Layout
from .reach import note_entry
from .mapping import BASE_MODEL_PREFIX, spec_name
from .sites import ModuleSite, parameter_variables, resolve_layer

__all__ = ["EXPERT_TABLE", "ExpertParameter", "ParameterLayer", "ParameterTarget", "Part", "find_parameter_targets",
           "parameter_prefix"]


@dataclass(frozen=True)
class Part:
    """One Keras variable holding rows ``[lo:hi]`` (of ``parts`` equal shares) of a parameter's output axis,
    transposed: ``variable[e] = parameter[e, rows].T`` (a 2-D parameter: ``variable = parameter[rows].T``)."""

    variable: str  # the attribute of the holder layer
    index: int = 0
    parts: int = 1


@dataclass(frozen=True)
class ExpertParameter:
    """A transformers parameter of decoder layer ``i`` (``model.layers.{i}.<module>.<param>``) and where it lies.

    :param module: the module path under the decoder layer (``mlp.experts``).
    :param param: the parameter's name on that module, as transformers registers it.
    :param holder: attributes from keras-hub's decoder layer to the layer whose ``call`` reads the variables.
    :param parts: the variables of the holder that hold the parameter.
    """

    module: str
    param: str
    holder: tuple[str, ...]
    parts: tuple[Part, ...]


_MIXTRAL_MOE = ("_sparse_moe_block",)
_QWEN_MOE = ("mlp",)


def _moe(block: tuple[str, ...], fused: bool) -> tuple[ExpertParameter, ...]:
    # the order of each module's parameters is transformers' registration order (it decides the key nesting)
    gate_up = (Part("_expert_feedforward_gate_dense"),) if fused else (
        Part("_expert_feedforward_gate_dense", 0, 2), Part("_expert_feedforward_intermediate_dense", 1, 2))
    return (
        ExpertParameter("mlp.gate", "weight", (*block, "_sparse_feedforward_gate_dense"), (Part("kernel"),)),
        ExpertParameter("mlp.experts", "gate_up_proj", (*block, "expert_bank"), gate_up),
        ExpertParameter("mlp.experts", "down_proj", (*block, "expert_bank"), (Part("_expert_feedforward_output_dense"),)),
    )


#: model_type -> transformers 5's MoE parameters of a decoder layer and their place in keras-hub 0.32's layers
#: (convert_mixtral.py, convert_qwen3_moe.py, convert_qwen_moe.py: transpose, stack, assign).
EXPERT_TABLE: Mapping[str, tuple[ExpertParameter, ...]] = MappingProxyType({
    "mixtral": _moe(_MIXTRAL_MOE, fused=False),
    "qwen3_moe": _moe(_QWEN_MOE, fused=True),
    "qwen2_moe": _moe(_QWEN_MOE, fused=True),
})


@dataclass
class ParameterTarget:
    """One parameter of one module of the model, resolved: its Keras variables and sizes.

    :param param: the transformers parameter name (``gate_up_proj``).
    :param experts: ``E`` (1 for a 2-D parameter).
    :param fan_in, fan_out: the parameter's ``in`` and ``out`` (spec layout ``[E, out, in]``).
    :param parts: (Keras variable, first output row, last output row + 1).
    :param transposed: the variables hold the rows transposed, ``[E, in, rows]`` (keras-hub's layout, the table);
        else as the spec lays them out, ``[E, rows, in]`` (a hand-built layer, :func:`parameter_variables`).
    """

    param: str
    experts: int
    fan_in: int
    fan_out: int
    parts: list[tuple[Any, int, int]] = field(default_factory=list)
    transposed: bool = True


def _mapped(model: Any, module_map: Any, sites: Mapping[str, ModuleSite]) -> list[tuple[str, Any, ParameterTarget]]:
    """The parameters of the hand-built layers ``module_map`` names that adapters cannot wrap otherwise."""
    if not isinstance(module_map, Mapping):
        return []
    out = []
    for path, value in module_map.items():
        site = sites.get(path)
        if site is None or site.kind != "parameters":
            continue
        layer = resolve_layer(model, value, path)[0]
        for name, variable in parameter_variables(layer).items():
            shape = tuple(int(d) for d in variable.shape)
            experts, fan_out, fan_in = shape if len(shape) == 3 else (1, *shape)
            out.append((path, layer, ParameterTarget(name, experts, fan_in, fan_out, [(variable, 0, fan_out)],
                                                     transposed=False)))
    return out


def _selects(key: str, entry: str) -> bool:
    return key == entry or key.endswith("." + entry)


def _resolve(layer: Any, entry: ExpertParameter) -> tuple[Any, ParameterTarget] | None:
    """The holder layer and the resolved target of ``entry`` in decoder layer ``layer`` (``None``: this layer has
    no such parameter, a dense MLP layer of Qwen-MoE)."""
    holder = layer
    for attr in entry.holder:
        holder = getattr(holder, attr, None)
        if holder is None:
            return None
    found = [getattr(holder, part.variable, None) for part in entry.parts]
    variables = [v for v in found if v is not None]
    if len(variables) != len(found):
        return None
    shapes = [tuple(int(d) for d in v.shape) for v in variables]
    widths = [s[-1] for s in shapes]
    if len({s[:-1] for s in shapes}) != 1 or len(shapes[0]) not in (2, 3) or len(set(widths)) != 1:
        raise UnsupportedError(f"keras-hub's {type(holder).__name__} {holder.path!r} does not hold {entry.param!r} "
                               f"as the table says (variables {shapes})", key=entry.param,
                               pointer="/target_parameters", hint="use the torch backend for this model")
    experts = shapes[0][0] if len(shapes[0]) == 3 else 1
    fan_in = shapes[0][-2]
    target = ParameterTarget(entry.param, experts, fan_in, sum(widths))
    for variable, part, width in zip(variables, entry.parts, widths):
        target.parts.append((variable, part.index * width, (part.index + 1) * width))
    return holder, target


def find_parameter_targets(model: Any, config: AdapterConfig, sites: Mapping[str, ModuleSite],
                           module_map: Any = None) -> dict[str, tuple[Any, list[ParameterTarget]]]:
    """``target_parameters``' matches (PEFT's rule: ``<module>.<param>`` equals an entry or ends with ``.`` + it),
    as the torch backend's function of the same name: spec module path -> (the Keras layer whose ``call`` reads
    the parameters, its targeted parameters in registration order).

    :param sites: the model's spec sites (:func:`~adapterspec_keras.mapping.spec_sites`), to refuse an entry that
        selects a parameter of a mapped module this table does not hold (``q_proj.weight``).
    :param module_map: ``LoadOptions.module_map``: a hand-built layer it names, which adapters cannot wrap, offers
        its 2-D/3-D variables as parameters in the spec's layout (:func:`parameter_variables`).
    :raises UnsupportedError: the model type has no table, or an entry selects no parameter of the table, or a
        parameter outside it (names the entry, ``/target_parameters/<i>``).

    >>> find_parameter_targets(model, cfg, spec_sites(model))        # doctest: +SKIP
    {'model.layers.0.mlp.experts': (<MixtralMoeExperts>, [ParameterTarget(param='gate_up_proj', ...), ...]), ...}
    """
    entries = config.get("target_parameters") if config.peft_type == "LORA" else None
    if not entries:
        return {}
    from .converters import backbone_of, converter_sites

    backbone = backbone_of(model)
    model_type = converter_sites(backbone)[1]
    table = EXPERT_TABLE.get(model_type or "")
    layers = getattr(backbone, "transformer_layers", None)
    universe = _mapped(model, module_map, sites)
    if (table is None or layers is None) and not universe:
        raise UnsupportedError(
            f"target_parameters {list(entries)} on a {model_type or type(model).__name__} model: the Keras backend "
            f"maps LoRA on parameters only onto keras-hub's MoE experts ({', '.join(sorted(EXPERT_TABLE))})",
            key=str(entries[0]), pointer="/target_parameters", hint="load this adapter with the torch backend")
    prefix = BASE_MODEL_PREFIX.get(model_type or "")
    task_model = backbone is not model
    for i, layer in enumerate(layers if table is not None and layers is not None else []):
        for entry in table or ():
            resolved = _resolve(layer, entry)
            if resolved is not None:
                universe.append((spec_name(f"model.layers.{i}.{entry.module}", prefix, task_model), *resolved))
    held = {id(variable) for _, _, target in universe for variable, _, _ in target.parts}
    modules = {path for path, _, _ in universe}
    mapped = sorted({re.sub(r"\.\d+\.", ".N.", f"{path}.{target.param}") for path, _, target in universe})
    for n, entry_name in enumerate(entries):
        if not any(_selects(f"{path}.{target.param}", entry_name) for path, _, target in universe):
            raise UnsupportedError(
                f"target_parameters entry {entry_name!r} selects no parameter the Keras backend maps on this "
                f"{model_type or type(model).__name__} model (mapped: {mapped})",
                key=entry_name, pointer=f"/target_parameters/{n}", hint="load this adapter with the torch backend")
        for path, site in sites.items():
            if path in modules or site.pieces and all(id(p.kernel_variable) in held for p in site.pieces):
                continue  # the router, under another name: the table holds it
            for param in ("weight", "bias"):
                if _selects(f"{path}.{param}", entry_name) or entry_name in ("weight", "bias"):
                    raise UnsupportedError(
                        f"target_parameters entry {entry_name!r} selects {path}.{param}, a parameter the Keras "
                        "backend does not map for LoRA on parameters", key=entry_name,
                        pointer=f"/target_parameters/{n}",
                        hint="name the MoE parameters (gate_up_proj, down_proj, gate.weight), or use the torch backend")
    found: dict[str, tuple[Any, list[ParameterTarget]]] = {}
    for path, holder, target in universe:
        if any(_selects(f"{path}.{target.param}", e) for e in entries):
            found.setdefault(path, (holder, []))[1].append(target)
    return found


def parameter_prefix(position: int, count: int) -> str:
    """The key infix of the ``position``-th of ``count`` targeted parameters of one module (PEFT's nesting).

    >>> parameter_prefix(0, 1)
    ''
    """
    return "base_layer." * (count - 1 - position)


@dataclass
class _Slot:
    """One adapter's LoRA on the targeted parameters of one module."""

    path: str
    targets: list[tuple[ParameterTarget, str, int, float]]  # (target, key prefix, r, scaling)
    bank: AdapterBank
    refs: dict[str, Ref]
    layouts: dict[str, Layout]


_UPCAST = ("float16", "bfloat16")


class ParameterLayer:
    """The LoRA adapters on the parameters of one module (PEFT's ``ParamWrapper`` s), any number of named adapters.

    It stands among the model state's adapter layers and answers the same questions (:meth:`parameters`,
    :meth:`set_active`, :meth:`merge`...); it patches ``holder.call`` to run with the deltas (:meth:`attach`),
    and puts it back once its last adapter is gone.

    :param path: the spec module path (``model.layers.0.mlp.experts``).
    :param holder: the Keras layer whose ``call`` reads the parameters' variables.
    """

    #: The loader takes every parameter of this layer under its own key (``base_layer.lora_A.weight`` too).
    saves_whole = True

    def __init__(self, path: str, holder: Any) -> None:
        self.site = ModuleSite(path, "parameters", 0, 0, [])
        self.holder = holder
        self._slots: dict[str, _Slot] = {}
        self._active: list[str] = []
        self._merged: list[str] = []
        self._own_call: Any = None
        self._attached = False

    # -- the patched call ------------------------------------------------------------------------
    def attach(self) -> None:
        """Patch the holder's ``call`` (once): it runs in a ``StatelessScope`` holding ``W + deltas``."""
        if self._attached:
            return
        holder = self.holder
        own = holder.__dict__.get("call")
        original = own if own is not None else type(holder).call.__get__(holder)

        def call(*args: Any, **kwargs: Any) -> Any:
            note_entry(holder, "forward")  # the reach check (inject._reach_parameters)
            mapping = self.state_mapping()
            if not mapping:
                return original(*args, **kwargs)
            with keras.StatelessScope(state_mapping=mapping):
                return original(*args, **kwargs)

        self._own_call = own
        object.__setattr__(holder, "call", call)
        self._attached = True

    def detach(self) -> None:
        """Put the holder's own ``call`` back."""
        if not self._attached:
            return
        if self._own_call is None:
            object.__delattr__(self.holder, "call")
        else:
            object.__setattr__(self.holder, "call", self._own_call)
        self._attached = False

    def state_mapping(self) -> list[tuple[Any, Any]]:
        """(variable, ``variable + sum of the running adapters' deltas``) for every variable they change."""
        from keras.src.backend.common.variables import AutocastScope

        running = [self._slots[n] for n in self._active if n not in self._merged]
        totals: dict[int, tuple[Any, Any]] = {}
        # no autocast: the factors and the variable as stored (float32 under a mixed-precision policy), so that the
        # delta is computed and added as a merge does, not in the compute dtype
        with AutocastScope(None):
            for slot in running:
                for target, prefix, _, scaling in slot.targets:
                    for variable, part in self._parts(slot, target, prefix, scaling):
                        held = totals.get(id(variable))
                        totals[id(variable)] = (variable, part if held is None else held[1] + part)
            out = [(variable, ops.convert_to_tensor(variable) + delta) for variable, delta in totals.values()]
            # the holder's other variables keep the values of an enclosing scope (stateless_call: the JAX trainer,
            # generate): an inner StatelessScope does not fall back to the outer one
            out += [(v, ops.convert_to_tensor(v)) for v in self.holder.weights if id(v) not in totals]
        return out

    def variables(self) -> list[Any]:
        """The Keras variables the adapters on this module change."""
        seen: dict[int, Any] = {}
        for slot in self._slots.values():
            for target, _, _, _ in slot.targets:
                seen.update({id(variable): variable for variable, _, _ in target.parts})
        return list(seen.values())

    # -- adapters --------------------------------------------------------------------------------
    def add_adapter(self, name: str, config: AdapterConfig, path: str, targets: Sequence[ParameterTarget],
                    options: LoadOptions, bank: AdapterBank) -> None:
        """Reserve adapter ``name``'s ``lora_A``/``lora_B`` for each targeted parameter in ``bank`` (PEFT's shapes:
        A ``[r * E, in]``, B ``[out, r * E]``), initialised as LoRA is (A uniform ``1/sqrt(in)``, B zero) unless
        ``options.initialize`` is false; rank and alpha from ``rank_pattern``/``alpha_pattern`` matched against
        ``<path>.<param>``. The adapter is not activated."""
        initialize = bool(getattr(options, "initialize", True))
        trainable = bool(options.trainable)
        init = config.get("init_lora_weights", True)
        keys: dict[str, GroupKey] = {}
        layouts: dict[str, Layout] = {}
        resolved = []
        for position, target in enumerate(targets):
            key = f"{path}.{target.param}"
            r, alpha = config.rank_for(key), config.alpha_for(key)
            scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
            prefix = parameter_prefix(position, len(targets))
            device, dtype = target_of(target.parts[0][0], options)
            if options.dtype is None and dtype in _UPCAST:
                dtype = "float32"  # SPEC.md 7.5, as AdapterLayer.add_adapter
            shapes = {"lora_A.weight": (r * target.experts, target.fan_in),
                      "lora_B.weight": (target.fan_out, r * target.experts)}
            inits: dict[str, tuple[Any, ...]] = {
                "lora_A.weight": ("normal", 1.0 / r) if init == "gaussian" else ("uniform", 1.0 / math.sqrt(target.fan_in)),
                "lora_B.weight": ("uniform", 1.0 / math.sqrt(r)) if init is False else ("zeros",)}
            for param, shape in shapes.items():
                layouts[prefix + param] = Layout(shape, shape, (0, 1))
                keys[prefix + param] = GroupKey(prefix + param, shape, dtype, device,
                                                inits[param] if initialize else ("zeros",), trainable)
            resolved.append((target, prefix, r, scaling))
        self._slots[name] = _Slot(path, resolved, bank, bank.reserve_keys(keys), layouts)

    def finish_init(self, name: str) -> None:
        """Nothing after the bank is materialized: the initialisers did it all."""

    def remove_adapter(self, name: str) -> None:
        """Drop adapter ``name`` (a merged one's delta stays in the variables); the holder's own ``call`` comes back
        with the last one."""
        self._slots.pop(name, None)
        self._active = [n for n in self._active if n != name]
        self._merged = [n for n in self._merged if n != name]
        if not self._slots:
            self.detach()

    def adapter_names(self) -> list[str]:
        """The adapters this layer holds, in insertion order."""
        return list(self._slots)

    def path_of(self, name: str) -> str:
        """The spec module path adapter ``name`` gave this module."""
        return self._slots[name].path

    def rename(self, name: str, path: str) -> None:
        """Give adapter ``name`` another spec path for this module (its keys use it)."""
        self._slots[name].path = path

    def parameters(self, name: str) -> tuple[str, dict[str, Layout], dict[str, Ref]]:
        """Adapter ``name``'s module path, and its tensors' layouts and bank rows (``[base_layer.]lora_A.weight``...)."""
        slot = self._slots[name]
        return slot.path, slot.layouts, slot.refs

    def layouts(self, name: str) -> dict[str, Layout]:
        """Tensor name -> its :class:`~adapterspec_keras.layers.Layout` (the file's, kept as it is)."""
        return dict(self._slots[name].layouts)

    def refs(self, name: str) -> dict[str, Ref]:
        """Tensor name -> where it lives in the adapter's bank."""
        return dict(self._slots[name].refs)

    def bank(self, name: str) -> AdapterBank:
        """The bank holding adapter ``name``'s variables."""
        return self._slots[name].bank

    def saves_base_weight(self, name: str) -> bool:
        """Never: only the factors are saved."""
        return False

    def adapter_params(self, name: str) -> dict[str, Any]:
        """Tensor name -> its current value (the file's layout)."""
        slot = self._slots[name]
        return {param: slot.bank.get(ref) for param, ref in slot.refs.items()}

    def set_active(self, names: list[str]) -> None:
        """Run exactly these adapters (those this layer holds), in this order."""
        self._active = [n for n in names if n in self._slots]

    @property
    def merged(self) -> list[str]:
        """The adapters whose deltas are in the variables now, in merge order."""
        return list(self._merged)

    def in_variables(self) -> list[str]:
        """The adapters whose values are in the variables now: the merged ones."""
        return list(self._merged)

    def runs(self, piece: Any = None) -> bool:
        """Never in a patched layer ``call`` of :mod:`~adapterspec_keras.inject`: the holder's own patch runs it."""
        return False

    # -- math ------------------------------------------------------------------------------------
    @staticmethod
    def _parts(slot: _Slot, target: ParameterTarget, prefix: str, scaling: float,
               cast: bool = True) -> list[tuple[Any, Any]]:
        """(variable, its share of ``s * delta`` in its layout, in the variable's dtype (``cast``) or the adapter's)
        for one parameter. Per expert ``e``: ``B[:, e::E] @ A[e*r:(e+1)*r]`` (SPEC.md 15.1), transposed as the variable
        holds it."""
        a = slot.bank.get(slot.refs[prefix + "lora_A.weight"])
        b = slot.bank.get(slot.refs[prefix + "lora_B.weight"])
        experts = target.experts
        a3 = ops.reshape(a, (experts, -1, target.fan_in))  # [E, r, in]: experts major
        b3 = ops.reshape(b, (target.fan_out, -1, experts))  # [out, r, E]: experts minor
        if target.transposed:
            delta = ops.einsum("oke,eki->eio", b3, a3) * ops.cast(scaling, a.dtype)  # [E, in, out]
        else:
            delta = ops.einsum("oke,eki->eoi", b3, a3) * ops.cast(scaling, a.dtype)  # [E, out, in]
        out = []
        for variable, lo, hi in target.parts:
            part = delta[..., lo:hi] if target.transposed else delta[:, lo:hi, :]
            part = part if len(variable.shape) == 3 else part[0]
            out.append((variable, ops.cast(part, variable.dtype) if cast else part))
        return out

    def check_merge(self, names: list[str]) -> None:
        """Nothing to refuse: every delta merges exactly."""

    def _merge_dtype(self, slot: _Slot, variable: Any) -> str:
        """float32 for a float32 adapter on a half-precision variable (rounded once, SPEC.md 7.3), else its dtype."""
        kept = str(variable.dtype)
        if kept in _UPCAST and next(iter(slot.refs.values())).key.dtype == "float32":
            return "float32"
        return kept

    def _add(self, slot: _Slot, sign: float) -> None:
        for target, prefix, _, scaling in slot.targets:
            for variable, part in self._parts(slot, target, prefix, scaling, cast=False):
                dtype = self._merge_dtype(slot, variable)
                value, part = ops.cast(ops.convert_to_tensor(variable), dtype), ops.cast(part, dtype)
                variable.assign(ops.cast(value + part if sign > 0 else value - part, variable.dtype))

    def merge(self, names: list[str]) -> None:
        """Add the deltas of ``names`` into the variables, in place."""
        for name in names:
            if name in self._slots and name not in self._merged:
                self._add(self._slots[name], 1.0)
                self._merged.append(name)

    def unmerge(self) -> None:
        """Subtract every merged delta again, last merged first."""
        while self._merged:
            self._add(self._slots[self._merged.pop()], -1.0)
