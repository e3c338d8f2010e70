"""adapterspec: an open, framework-agnostic format and SDK for parameter-efficient fine-tuning adapters.

Importing this package imports no deep-learning framework; backends load only for the models you pass.

>>> import adapterspec
>>> adapter = adapterspec.read_adapter("my-lora")                     # doctest: +SKIP
>>> adapterspec.load_adapter(torch_or_keras_model, "my-lora")         # doctest: +SKIP
>>> adapterspec.save_adapter(torch_or_keras_model, "out/my-lora")     # doctest: +SKIP
"""

from typing import TYPE_CHECKING

from .adapter import Adapter, check_adapter_name, read_adapter, validate_adapter
from .api import (
    active_adapters,
    adapter_names,
    backend_name,
    delete_adapter,
    disabled_adapters,
    extract_adapter,
    inject_adapter,
    load_adapter,
    merge_adapters,
    model_lock,
    read_adapters,
    save_adapter,
    save_adapters,
    set_active_adapters,
    unload,
    unmerge_adapters,
)
from .checks import TensorInfo
from .config import AdapterConfig, load_schema, validate_config
from .errors import *  # noqa: F403 - the hierarchy is part of the public surface
from .errors import __all__ as _errors_all
from .folder import list_adapters, write_adapter, write_adapters
from .hookspecs import hookimpl
from .options import LoadOptions
from .spec import SPEC_VERSION

__version__ = "0.1.0"

_HUB = ("download_adapter", "download_adapters", "push_to_hub")

if TYPE_CHECKING:  # what __getattr__ gives, so that type checkers see the functions themselves
    from .hub import download_adapter, download_adapters, push_to_hub


def __getattr__(name: str) -> object:
    # The Hub client is imported on first use, keeping `import adapterspec` light.
    if name in _HUB:
        from . import hub

        return getattr(hub, name)
    raise AttributeError(f"module 'adapterspec' has no attribute {name!r}")

__all__ = [
    "SPEC_VERSION",
    "Adapter",
    "AdapterConfig",
    "LoadOptions",
    "TensorInfo",
    "__version__",
    "active_adapters",
    "adapter_names",
    "backend_name",
    "check_adapter_name",
    "delete_adapter",
    "disabled_adapters",
    "download_adapter",
    "download_adapters",
    "extract_adapter",
    "hookimpl",
    "inject_adapter",
    "list_adapters",
    "load_adapter",
    "load_schema",
    "merge_adapters",
    "model_lock",
    "push_to_hub",
    "read_adapter",
    "read_adapters",
    "save_adapter",
    "save_adapters",
    "set_active_adapters",
    "unload",
    "unmerge_adapters",
    "validate_adapter",
    "validate_config",
    "write_adapter",
    "write_adapters",
    *_errors_all,
]
