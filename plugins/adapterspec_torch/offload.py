"""Base layers whose weights accelerate offloads (``device_map`` with ``"cpu"``/``"disk"`` entries,
``cpu_offload``, ``disk_offload``; accelerate >= 1.1).

Such a layer's weight is on the ``meta`` device between calls: accelerate's ``AlignDevicesHook`` puts the values
on its *execution device* for the layer's own forward and takes them off again after. An adapter that adds to
the layer's output or scales its input or output runs on it as on any other layer: its tensors live on the
execution device (where the hook computes), as PEFT's do. DoRA's weight norm reads the values inside
accelerate's own :func:`accelerate.utils.align_module_device`. What would write the weight (a merge, a residual
base, token rows) or copy the layer (``modules_to_save``) is refused before anything changes: accelerate would
put its stored values back at the next call.

>>> offload_device(torch.nn.Linear(2, 2)) is None
True
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from adapterspec.errors import UnsupportedError

__all__ = ["check_not_offloaded", "offload_device", "onloaded"]


def offload_device(module: nn.Module) -> torch.device | None:
    """The device accelerate computes ``module`` on where it offloads the module's own weights, else ``None``."""
    hook = module.__dict__.get("_hf_hook")
    if hook is None:  # no accelerate hook: the common case costs one lookup
        return None
    from accelerate.utils import has_offloaded_params

    if not has_offloaded_params(module):
        return None
    device = hook.execution_device
    return torch.device(device) if not isinstance(device, torch.device) else device


@contextlib.contextmanager
def onloaded(module: nn.Module) -> Iterator[None]:
    """``module``'s offloaded weights on its execution device inside the block (accelerate's
    ``align_module_device``); nothing for a module accelerate does not offload."""
    if offload_device(module) is None:
        yield
        return
    from accelerate.utils import align_module_device

    with align_module_device(module):
        yield


def check_not_offloaded(module: nn.Module, key: str, what: str) -> None:
    """Refuse ``what`` (which writes or copies the weights) on ``module`` or a submodule whose weights accelerate
    offloads.

    :raises UnsupportedError: naming ``key``.
    """
    device = next((d for m in module.modules() if (d := offload_device(m)) is not None), None)
    if device is not None:
        raise UnsupportedError(f"{what} needs the layer's weights in place, and accelerate offloads them (they are "
                               f"on the meta device between calls; it computes on {device})", key=key,
                               hint="load the model without offloading (a device_map without 'cpu'/'disk' entries) "
                                    "for this")
