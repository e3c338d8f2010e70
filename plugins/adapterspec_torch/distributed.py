"""Adapters on sharded models: FSDP2 (``fully_shard``) and tensor parallelism (``parallelize_module``), SPEC.md 16.

Files are never sharded: one adapter folder holds every tensor whole. A process of a sharded model holds
its slice of each adapter tensor, laid out like the base weight it adapts:

* a base weight FSDP2 manages (a DTensor sharded ``Shard(0)`` on its mesh): every adapter tensor of that
  layer is sharded ``Shard(0)`` on the same mesh, as FSDP2 shards a parameter of that shape. The forward
  gathers each one whole (an all-gather, as FSDP2's own pre-forward does) and averages its gradient over
  the processes (all-reduce, then each keeps its slice: FSDP2's reduce-scatter with its default divide
  factor);
* a base ``Linear`` under ``ColwiseParallel`` (weight ``Shard(0)``): ``lora_B`` (and its bias) is
  ``Shard(0)``, ``lora_A`` replicated, the LoRA output is sharded like the base output;
* a base ``Linear`` under ``RowwiseParallel`` (weight ``Shard(1)``): ``lora_A`` is ``Shard(1)``, ``lora_B``
  replicated; the ``[.., r]`` hidden is summed over the processes before ``lora_B``.

Under either, the LoRA input and output take the layouts of the plan's style around the layer (:class:`TPStyle`:
torch's or transformers' ``input_layouts``/``output_layouts``, e.g. sequence parallel), as the base's do.
FSDP1 (``FullyShardedDataParallel``) shards adapters injected before it like its own parameters; one added after
it, and a save or merge of its flat shards, are refused (:func:`check_fsdp1_weight`).

Loading reads each process's slices straight from the safetensors file (``safe_open(...).get_slice``), never
the whole adapter; saving gathers every tensor whole (``full_tensor()``, on every process) and one process
(rank 0) writes the folder, the others get its outcome. Only plain LoRA (with or without ``lora_bias``) on
``nn.Linear`` layers is implemented on a sharded layer; other methods and layers are refused.

Training under FSDP2 works both ways: adapters injected *before* ``fully_shard`` are FSDP2's own parameters
(it shards, gathers and reduces them like the base's); adapters injected or loaded *after* it get the
layout above and their gradient averaged as FSDP2 would.

>>> layout_of(torch.nn.Linear(2, 2)) is None
True
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from adapterspec import Adapter, AdapterConfig
from adapterspec.errors import AdapterSpecError, BackendError, FileFormatError, UnsupportedError

__all__ = [
    "Layout",
    "TPStyle",
    "check_fsdp1_tensors",
    "check_fsdp1_weight",
    "check_sharded_adapter",
    "fsdp_layouts",
    "gathered",
    "is_sharded",
    "layout_of",
    "read_slices",
    "shard_adapter",
    "sharded_forward",
    "tp_style",
    "write_once",
]

#: The adapter parameters a sharded layer takes (plain LoRA on a Linear layer).
_PARAMS = ("lora_A.weight", "lora_B.weight", "lora_B.bias")


@dataclass(frozen=True)
class Layout:
    """How a base layer is sharded, and so how its adapter tensors are.

    :param kind: ``"fsdp"`` (FSDP2 manages the base weight), ``"colwise"`` or ``"rowwise"`` (tensor parallel).
    :param mesh: the base weight's device mesh.
    :param placements: the base weight's placements (FSDP2: its sharded parameter's).
    """

    kind: str
    mesh: Any  # torch.distributed.device_mesh.DeviceMesh
    placements: tuple[Any, ...]
    style: TPStyle | None = None

    def placements_for(self, param: str) -> tuple[Any, ...]:
        """The placements of adapter parameter ``param`` (``"lora_A.weight"``...) on :attr:`mesh`."""
        from torch.distributed.tensor import Replicate, Shard

        if self.kind == "fsdp":
            return tuple(Shard(0) if isinstance(p, Shard) else p for p in self.placements)
        sharded = (self.kind == "colwise") == param.startswith("lora_B")
        if not sharded:
            return (Replicate(),)
        return (Shard(0) if self.kind == "colwise" else Shard(1),)


@dataclass(frozen=True)
class TPStyle:
    """What a tensor-parallel plan does around a layer (torch's or transformers' ``ColwiseParallel`` /
    ``RowwiseParallel``): the layout its input arrives in, the one the layer computes on, and its output's.

    :param inputs: placements of the input as it arrives (sequence parallel: ``Shard(1)``).
    :param desired: placements the layer computes on (colwise: replicated; rowwise: ``Shard(-1)``).
    :param outputs: placements of the output it hands on.
    :param local: whether it hands on the local tensor (``use_local_output``).
    """

    inputs: tuple[Any, ...]
    desired: tuple[Any, ...]
    outputs: tuple[Any, ...]
    local: bool


def _tuple(placements: Any) -> tuple[Any, ...]:
    return tuple(placements) if isinstance(placements, (tuple, list)) else (placements,)


def tp_style(base: nn.Module, kind: str) -> TPStyle | None:
    """The :class:`TPStyle` of a layer ``parallelize_module`` (torch) or transformers' ``tp_plan`` prepared, read
    from the hooks (torch: ``_prepare_input_fn``/``_prepare_output_fn`` partials) or the forward (transformers:
    its ``TensorParallelLayer``); ``None`` when neither is there."""
    import functools

    from torch.distributed.tensor import Replicate, Shard

    found: dict[str, tuple[Any, ...]] = {}
    for hook in (*base._forward_pre_hooks.values(), *base._forward_hooks.values()):
        for cell in getattr(hook, "__closure__", None) or ():
            try:
                value = cell.cell_contents
            except ValueError:  # an empty cell
                continue
            if isinstance(value, functools.partial) and len(value.args) >= 2:
                found[getattr(value.func, "__name__", "")] = value.args[:2]
    if "_prepare_input_fn" in found and "_prepare_output_fn" in found:
        inputs, desired = found["_prepare_input_fn"]
        outputs, local = found["_prepare_output_fn"]
        return TPStyle(_tuple(inputs), _tuple(desired), _tuple(outputs), bool(local))
    forward = base.__dict__.get("forward")
    for cell in getattr(forward, "__closure__", None) or ():
        style = cell.cell_contents
        if all(hasattr(style, a) for a in ("input_layouts", "output_layouts", "use_local_output")):
            desired = (Replicate(),) if kind == "colwise" else (Shard(-1),)
            return TPStyle(_tuple(style.input_layouts), desired, _tuple(style.output_layouts),
                           bool(style.use_local_output))
    return None


def _dtensor_type() -> type | None:
    module = sys.modules.get("torch.distributed.tensor")
    return cast("type | None", getattr(module, "DTensor", None)) if module is not None else None


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model`` is sharded: FSDP2 manages a part of it (its weights may be gathered at the moment),
    or a parameter is a DTensor (tensor parallelism). Cheap: ``False`` without a look at the model unless a
    process group is initialised (a DTensor's device mesh needs one), so single-process loads pay nothing.

    >>> is_sharded(torch.nn.Linear(2, 2))
    False
    """
    dtensor = _dtensor_type()
    if dtensor is None or not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return False
    fsdp = sys.modules.get("torch.distributed.fsdp")
    fsdp_module = getattr(fsdp, "FSDPModule", None) if fsdp is not None else None
    if fsdp_module is not None and any(isinstance(m, fsdp_module) for m in model.modules()):
        return True
    return any(isinstance(p, dtensor) for p in model.parameters())


def fsdp_layouts(model: nn.Module) -> dict[int, Layout]:
    """``id(module)`` -> the :class:`Layout` of its ``weight``, for every module whose weight FSDP2 manages
    (whether it is sharded or gathered at the moment).

    :raises UnsupportedError: FSDP2 shards a weight that is a DTensor already (FSDP2 over tensor parallelism).
    """
    if "torch.distributed.fsdp" not in sys.modules:
        return {}
    from torch.distributed.fsdp import FSDPModule

    layouts: dict[int, Layout] = {}
    for module in model.modules():
        if not isinstance(module, FSDPModule):
            continue
        for group in module._get_fsdp_state()._fsdp_param_groups:
            for fsdp_param in group.fsdp_params:
                info = fsdp_param._module_info
                if info.param_name != "weight":
                    continue
                if fsdp_param.is_dtensor:
                    raise UnsupportedError("FSDP2 over tensor parallelism (2-D sharding) is not implemented for "
                                           "adapters loaded after sharding", key=fsdp_param._param_fqn,
                                           hint="inject the adapter before fully_shard and parallelize_module")
                sharded: Any = fsdp_param.sharded_param  # a DTensor parameter
                layouts[id(info.module)] = Layout("fsdp", sharded.device_mesh, tuple(sharded.placements))
    return layouts


def layout_of(base: nn.Module, fsdp: dict[int, Layout] | None = None) -> Layout | None:
    """The :class:`Layout` of a base layer, or ``None`` if its weight is not sharded.

    :param fsdp: :func:`fsdp_layouts` of the model (FSDP2 gathers weights during a forward, so their
        being DTensors or not says nothing).
    :raises UnsupportedError: a DTensor weight sharded another way (2-D meshes, other dims).
    """
    if fsdp is not None and id(base) in fsdp:
        return fsdp[id(base)]
    dtensor = _dtensor_type()
    weight = base._parameters.get("weight")
    if dtensor is None or not isinstance(weight, dtensor):
        return None
    from torch.distributed.tensor import Shard

    placements = tuple(cast(Any, weight).placements)
    mesh = cast(Any, weight).device_mesh
    if len(placements) == 1 and isinstance(placements[0], Shard) and placements[0].dim in (0, 1):
        kind = "colwise" if placements[0].dim == 0 else "rowwise"
        style = tp_style(base, kind)
        if style is None:
            raise UnsupportedError(f"a {kind}-sharded weight without torch's or transformers' ColwiseParallel/"
                                   "RowwiseParallel around its layer: the layouts of its input and output are unknown",
                                   key=type(base).__qualname__,
                                   hint="shard the layer with parallelize_module (ColwiseParallel/RowwiseParallel)")
        return Layout(kind, mesh, placements, style)
    raise UnsupportedError(f"a weight sharded {list(placements)} is not a layout adapters are implemented for",
                           key=type(base).__qualname__,
                           hint="use ColwiseParallel/RowwiseParallel on a 1-D mesh, or FSDP2 (fully_shard)")


def check_sharded_adapter(base: nn.Module, kind: str | None, config: AdapterConfig, path: str,
                          layout: Layout) -> None:
    """Refuse, before anything is created, an adapter a sharded layer cannot take.

    :raises UnsupportedError: not plain LoRA (DoRA, other methods), not an ``nn.Linear``, or parts of the
        config that change other modules (``modules_to_save``, ``trainable_token_indices``, ``bias``).
    """
    hint = "inject the adapter before fully_shard (FSDP2 then manages its parameters), or use plain LoRA"
    if config.peft_type != "LORA" or config.get("use_dora"):
        what = "DoRA" if config.peft_type == "LORA" else config.peft_type
        raise UnsupportedError(f"{what} on a sharded layer ({layout.kind}) is not implemented", key=path, hint=hint)
    if kind != "linear" or (type(base) is not nn.Linear and layout.kind != "fsdp"):  # FSDP2 subclasses its modules
        raise UnsupportedError(f"LoRA on a sharded {type(base).__qualname__} ({layout.kind}) is not implemented",
                               key=path, hint="adapt nn.Linear layers")
    for field in ("modules_to_save", "trainable_token_indices"):
        if config.get(field):
            raise UnsupportedError(f"{field} on a sharded model is not implemented", pointer=f"/{field}",
                                   hint=hint)
    if config.get("bias", "none") != "none":
        raise UnsupportedError("bias training on a sharded model is not implemented", pointer="/bias", hint=hint)


# -- FSDP1 (FullyShardedDataParallel): refused where its flat shards would make a result wrong ------------------
_FSDP1_HINT = ("inject or load the adapter before wrapping the model in FullyShardedDataParallel (FSDP1 then shards, "
               "gathers and reduces it like the base), or shard with FSDP2 (fully_shard), which adapters may also "
               "join after sharding (SPEC.md 16)")


def _fsdp1(tensor: Any) -> bool:
    """Whether FSDP1 flattened ``tensor`` (a view of its ``FlatParameter``, or that parameter itself)."""
    return bool(getattr(tensor, "_fsdp_flattened", False))


def check_fsdp1_weight(base: nn.Module, key: str, doing: str) -> None:
    """Refuse ``doing`` on a layer whose weight FSDP1 manages: ``"adapting"`` always -- an adapter added after
    ``FullyShardedDataParallel`` is outside its flat parameters, so no process's gradient reaches another's (the
    ranks' adapters drifted apart: 0.057 after 3 AdamW steps) -- and ``"merging"``/``"unmerging"`` while the weight
    is this process's flat shard (outside ``summon_full_params``), which the delta does not fit.

    :raises UnsupportedError: so (nothing has changed).
    """
    weight = getattr(base, "weight", None)
    if not _fsdp1(weight):
        return
    if doing == "adapting":
        raise UnsupportedError("FSDP1 (FullyShardedDataParallel) manages this layer: an adapter added now would be "
                               "neither sharded nor reduced by it, so each process would train its own copy",
                               key=key, hint=_FSDP1_HINT)
    if cast(torch.Tensor, weight).dim() == 1:
        raise UnsupportedError(f"{doing} into a weight FSDP1 (FullyShardedDataParallel) holds as this process's flat "
                               "shard", key=key, hint="merge inside `with FullyShardedDataParallel.summon_full_params("
                               "fsdp_model, writeback=True):` (every process), or before wrapping the model")


def check_fsdp1_tensors(config: AdapterConfig, tensors: dict[str, torch.Tensor]) -> None:
    """Refuse to save adapter tensors that are FSDP1's flat shards (outside ``summon_full_params``): their shapes
    are the shards', not the adapter's (the save failed with a ShapeMismatchError whose fix was wrong).

    :raises UnsupportedError: a tensor FSDP1 flattened does not have the shape the config gives it.
    """
    flat = [key for key, tensor in tensors.items() if _fsdp1(tensor)]
    if not flat:
        return
    from adapterspec._safetensors import dtype_name
    from adapterspec.checks import TensorInfo, tensor_errors

    if tensor_errors(config, {k: TensorInfo(tuple(t.shape), dtype_name(t)) for k, t in tensors.items()}):
        raise UnsupportedError("FSDP1 (FullyShardedDataParallel) holds only this process's flat shard of the "
                               "adapter's tensors", key=flat[0],
                               hint="save inside `with FullyShardedDataParallel.summon_full_params(fsdp_model):` "
                                    "(every process enters it; save on rank 0), or shard with FSDP2 (fully_shard), "
                                    "whose adapters adapterspec gathers itself")


def shard_adapter(weights: nn.Module, names: dict[str, str], layout: Layout) -> None:
    """Give the parameters of one adapter in one layer ``layout``'s placements: a created parameter is
    distributed from rank 0's values (``distribute_tensor``), a pending one remembers where it goes
    (``weights.layouts``), for :func:`read_slices`.

    :param weights: the layer's ``_Weights`` module of the adapter.
    :param names: spec parameter name -> attribute name.
    """
    from torch.distributed.tensor import distribute_tensor

    layouts: dict[str, tuple[Any, tuple[Any, ...]]] = weights.__dict__.setdefault("layouts", {})
    params = weights._parameters
    for param, attr in names.items():
        placements = layout.placements_for(param)
        layouts[attr] = (layout.mesh, placements)
        current = params.get(attr)
        if current is not None:
            with torch.no_grad():
                spread = distribute_tensor(current.detach(), layout.mesh, list(placements))
            params[attr] = nn.Parameter(spread, requires_grad=current.requires_grad)


# -- reading -------------------------------------------------------------------------------------
def _local_region(shape: tuple[int, ...], mesh: Any, placements: tuple[Any, ...]) -> tuple[slice, ...]:
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    local, offset = compute_local_shape_and_global_offset(shape, mesh, list(placements))
    return tuple(slice(o, o + n) for o, n in zip(offset, local, strict=True))


def read_slices(adapter: Adapter, places: dict[str, tuple[Any, tuple[Any, ...]] | None],
                device: torch.device) -> dict[str, torch.Tensor]:
    """Each key of ``places``: a DTensor made of this process's slice, read alone from the file, where a
    placement is given; the whole tensor where it is ``None``. Nothing else is read.

    :param places: canonical key -> (mesh, placements), or ``None``.
    :raises UnsupportedError: the file holds tensors besides ``places`` (auxiliary tensors, SPEC.md 5.3).
    :raises FileFormatError: the file changed or broke since it was read.
    """
    from torch.distributed.tensor import DTensor

    extra = sorted(set(adapter.tensors) - set(places))
    if extra:
        raise UnsupportedError("the file holds tensors besides the adapter's own (auxiliary tensors, SPEC.md 5.3): "
                               "not implemented on a sharded model", key=extra[0],
                               hint="load it into the unsharded model, or save the adapter without them")
    out: dict[str, torch.Tensor] = {}

    def own(part: torch.Tensor) -> torch.Tensor:
        # the slices read from the file are this process's own memory already; those of a tensor read whole
        # (an Adapter in memory, a pickle) are copied out of it, so that it can be freed
        if part.device == device and part._base is None:
            return part
        local = torch.empty(part.shape, dtype=part.dtype, device=device)
        local.copy_(part)
        return local

    def place(key: str, read: Callable[[tuple[slice, ...]], torch.Tensor]) -> None:
        where = places[key]
        shape = tuple(adapter.tensors[key].shape)
        if where is None:
            out[key] = own(read(tuple(slice(0, n) for n in shape)))
            return
        mesh, placements = where
        local = own(read(_local_region(shape, mesh, placements)))
        out[key] = DTensor.from_local(local, mesh, list(placements), run_check=False, shape=torch.Size(shape),
                                      stride=_contiguous_stride(shape))

    if adapter.weights_file is None or adapter.weights_file.suffix != ".safetensors" \
            or sys.byteorder != "little":  # in memory, a pickle, or a big-endian host: read whole
        whole = adapter.load_tensors("pt")
        for key in places:
            place(key, lambda region, key=key: whole[key][region])  # type: ignore[misc]
        return out
    from adapterspec import _safetensors

    header = adapter._file_header()
    try:
        with adapter._weights() as fh:
            _safetensors.check_unchanged(adapter.weights_file, header, fh)
            for key in places:
                dtype = _TORCH_DTYPES[adapter.tensors[key].dtype]
                begin = header.spans[key][0]
                place(key, lambda region, key=key, dtype=dtype, begin=begin: _pread_region(  # type: ignore[misc]
                    fh.fileno(), begin, tuple(adapter.tensors[key].shape), dtype, region))
            _safetensors.check_unchanged(adapter.weights_file, header, fh)
    except (OSError, KeyError, ValueError) as exc:
        raise FileFormatError(f"cannot read tensor slices: {exc}", path=adapter.weights_file,
                              hint="the file is corrupt or changed; download or save it again") from None
    return out


#: safetensors dtype names -> torch dtypes (the spec's float and integer dtypes, SPEC.md 7).
_TORCH_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                 "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                 "BOOL": torch.bool}


def _pread_into(fd: int, view: memoryview, offset: int) -> None:
    """Fill ``view`` from the file at ``offset`` (positioned reads: no shared file position)."""
    import os

    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if got <= 0:
            raise ValueError(f"the file ends at byte {offset + done}, inside a tensor")
        done += got


def _pread_region(fd: int, begin: int, shape: tuple[int, ...], dtype: torch.dtype,
                  region: tuple[slice, ...]) -> torch.Tensor:
    """The ``region`` of a row-major tensor whose data starts at byte ``begin``: only its bytes are read
    (one read for a block of whole rows, one per row for a block of columns)."""
    local = torch.empty(tuple(s.stop - s.start for s in region), dtype=dtype)
    if local.numel() == 0:
        return local
    raw = memoryview(cast(Any, local.view(-1).view(torch.uint8).numpy())).cast("B")
    item = local.element_size()
    if not shape:
        _pread_into(fd, raw, begin)
        return local
    row = item * math.prod(shape[1:])  # bytes of one index of dim 0
    whole_rows = all(s.start == 0 and s.stop == n for s, n in zip(region[1:], shape[1:], strict=True))
    if whole_rows:
        _pread_into(fd, raw, begin + region[0].start * row)
        return local
    if len(shape) != 2:
        raise ValueError(f"a slice {region} of a {len(shape)}-D tensor is not implemented")
    width = (region[1].stop - region[1].start) * item
    for i, r in enumerate(range(region[0].start, region[0].stop)):
        _pread_into(fd, raw[i * width:(i + 1) * width], begin + r * row + region[1].start * item)
    return local


def _contiguous_stride(shape: tuple[int, ...]) -> tuple[int, ...]:
    stride, step = [], 1
    for n in reversed(shape):
        stride.append(step)
        step *= max(n, 1)
    return tuple(reversed(stride))


# -- the forward ---------------------------------------------------------------------------------
class _GatherMean(torch.autograd.Function):
    """Forward: the whole tensor from every process's slice (all-gather). Backward: the gradient averaged
    over the processes, this process's slice of it (FSDP2's reduce-scatter, with its divide factor)."""

    @staticmethod
    def forward(ctx: Any, local: torch.Tensor, param: Any) -> torch.Tensor:
        ctx.mesh, ctx.placements, ctx.shape = param.device_mesh, tuple(param.placements), tuple(param.shape)
        with torch.no_grad():
            full: torch.Tensor = param.full_tensor()
        return full

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple[torch.Tensor, None]:
        import torch.distributed as dist

        grad = grads[0].contiguous().clone()
        mesh = ctx.mesh
        for dim in range(mesh.ndim):
            dist.all_reduce(grad, group=mesh.get_group(dim))
        grad.div_(mesh.size())
        return grad[_local_region(ctx.shape, mesh, ctx.placements)].contiguous(), None


def _whole(tensor: torch.Tensor) -> torch.Tensor:
    """A sharded adapter parameter gathered whole (gradient averaged back), or a plain one as it is."""
    dtensor = _dtensor_type()
    if dtensor is None or not isinstance(tensor, dtensor):
        return tensor
    gathered: torch.Tensor = _GatherMean.apply(  # type: ignore[no-untyped-call]  # unannotated in torch
        cast(Any, tensor).to_local(), tensor)
    return gathered


def _lora_fsdp(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return F.linear(F.linear(x, _whole(a)), _whole(b), _whole(bias) if bias is not None else None)


def _lora_tp(layout: Layout, x: torch.Tensor, a: Any, b: Any, bias: Any, scaling: float) -> Any:
    """The LoRA delta of a tensor-parallel layer, laid out as its plan lays out the base output: the input taken
    as the plan takes it (``input_layouts``, e.g. sequence-sharded), computed on the layer's layout, handed on in
    ``output_layouts``."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    mesh, style = layout.mesh, layout.style
    assert style is not None  # layout_of refuses a TP layer without one

    def on(placements: tuple[Any, ...], ndim: int) -> list[Any]:
        return [Shard(p.dim + ndim) if isinstance(p, Shard) and p.dim < 0 else p for p in placements]

    if not isinstance(x, DTensor):
        x = DTensor.from_local(x, mesh, on(style.inputs, x.dim()), run_check=False)
    desired = on(style.desired, x.dim())
    if list(cast(Any, x).placements) != desired:
        x = cast(Any, x).redistribute(mesh, desired)
    hidden = F.linear(x, a)
    if layout.kind == "rowwise":
        hidden = cast(Any, hidden).redistribute(mesh, [Replicate()])  # the [.., r] partial sums, added up
    delta: Any = F.linear(hidden, b, bias) * scaling
    outputs = on(style.outputs, delta.dim())
    if list(delta.placements) != outputs:
        delta = delta.redistribute(mesh, outputs)
    return delta


def sharded_forward(layer: Any, x: torch.Tensor, args: Any, kwargs: Any) -> torch.Tensor:
    """``AdapterLayer.forward`` on a sharded layer: the base output plus the active LoRA adapters, each
    computed on its slices as :class:`Layout` says (the same math as unsharded: ``base(x) + s * B(A(x))``).

    :raises UnsupportedError: LoRA dropout while training under tensor parallelism (its masks would
        differ between the processes that hold the same activations), or a merged adapter.
    """
    from torch.distributed.tensor import DTensor

    layout: Layout = layer._sharding
    result: Any = layer.base_layer(x, *args, **kwargs)
    if layer._merged:
        raise UnsupportedError("merged adapters on a sharded layer are not implemented", key=layer._merged[0],
                               hint="unmerge_adapters(model)")
    for name in layer._switch.names:
        spec = layer._specs.get(name)
        if spec is None:
            continue
        if spec.method != "LORA" or spec.use_dora:
            raise UnsupportedError(f"{spec.method} on a sharded layer is not implemented", key=name,
                                   hint="use plain LoRA")
        a, b = layer._param(name, "lora_A.weight"), layer._param(name, "lora_B.weight")
        bias = layer._param(name, "lora_B.bias") if spec.lora_bias else None
        x_in = x.to(a.dtype)
        dropping = spec.dropout > 0 and layer.training
        if layout.kind == "fsdp" or not isinstance(a, DTensor):
            x_d = F.dropout(x_in, spec.dropout, training=True) if dropping else x_in
            delta: Any = _lora_fsdp(x_d, a, b, bias) * spec.scaling
        else:
            if dropping:
                raise UnsupportedError("LoRA dropout while training under tensor parallelism is not implemented",
                                       key=name, hint="set lora_dropout to 0, or train with FSDP2")
            delta = _lora_tp(layout, x_in, a, b, bias, spec.scaling)
            if not isinstance(result, DTensor):
                delta = delta.to_local()
        result = result + delta
    return cast(torch.Tensor, result)


# -- saving --------------------------------------------------------------------------------------
def gathered(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors`` with every DTensor gathered whole (``full_tensor()``: every process must call this, with
    the same keys in the same order); plain tensors as they are.

    >>> gathered({"k": torch.ones(1)})["k"]
    tensor([1.])
    """
    dtensor = _dtensor_type()
    if dtensor is None:
        return tensors
    return {key: cast(Any, t).full_tensor() if isinstance(t, dtensor) else t for key, t in tensors.items()}


def write_once(model: nn.Module, write: Callable[[], Path]) -> Path | None:
    """For a sharded model: ``write()`` on rank 0 of the default process group, its outcome (the path, or
    the error) on every process. ``None`` (the caller writes) for a model that is not sharded.

    :raises AdapterSpecError: rank 0's write failed with it (``AdapterExistsError``, ``WriteError``...): every
        process raises it.
    :raises BackendError: on the other processes, when rank 0's write failed otherwise (rank 0 raises its
        own error).
    """
    if not is_sharded(model):
        return None
    import torch.distributed as dist

    if not dist.is_initialized():
        return None
    outcome: list[Any] = [None]
    error: BaseException | None = None
    if dist.get_rank() == 0:
        try:
            outcome[0] = ("ok", str(write()))
        except BaseException as exc:  # every process must hear of it, or they would wait forever
            error = exc
            outcome[0] = ("raise", exc) if _portable(exc) else ("error", f"{type(exc).__name__}: {exc}")
    dist.broadcast_object_list(outcome, src=0)
    if error is not None:
        raise error
    status, value = outcome[0]
    if status == "ok":
        return Path(value)
    if status == "raise":
        raise value
    raise BackendError(f"rank 0 could not write the adapter ({value})", key=None,
                       hint="see rank 0's error; nothing was written")


def _portable(error: BaseException) -> bool:
    """Whether ``error`` is one of adapterspec's, which the other processes can raise as it is (it pickles)."""
    import pickle

    if not isinstance(error, AdapterSpecError):
        return False
    try:
        pickle.dumps(error)
    except Exception:  # noqa: BLE001 - whatever stops it, the text goes instead
        return False
    return True
