"""LoRA files of diffusers', kohya's and mlx-lm's formats, recognised where an adapter folder was expected, so that a
refusal says what the file is and how to use it (adapterspec reads PEFT-format folders only).

diffusers' ``save_lora_weights`` / ``save_lora_adapter`` write ``pytorch_lora_weights.safetensors`` (no
``adapter_config.json``) with keys under the pipeline component's name (``unet.<module>.lora_A.weight``) or, in older
versions, ``unet.<module>.lora.down.weight``; kohya-ss and A1111 LoRAs have ``lora_unet_<module_with_underscores>.
lora_down.weight`` with an ``.alpha`` per module. mlx-lm's ``mlx_lm.lora`` writes ``adapters.safetensors``, keys
``<module>.lora_a`` (``[in, r]``, PEFT's ``lora_A`` transposed) and ``<module>.lora_b``, next to an
``adapter_config.json`` of its own: its training arguments (``fine_tune_type``, ``lora_parameters``), no ``peft_type``.

>>> foreign_format("lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight")
'kohya'
>>> foreign_format("unet.down_blocks.0.attentions.0.proj_in.lora_A.weight")
'diffusers'
>>> foreign_format("model.layers.0.self_attn.q_proj.lora_a")
'mlx'
>>> foreign_format("model.layers.0.self_attn.q_proj.lora_A.weight") is None
True
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

from .errors import ConfigError, FileFormatError, UnexpectedTensorError

__all__ = ["DIFFUSERS_FILE", "FOREIGN_HINT", "MLX_FILE", "MLX_HINT", "Format", "config_error", "file_error",
           "folder_error", "foreign_format", "key_error"]

#: The file diffusers' ``save_lora_weights`` and ``save_lora_adapter`` write.
DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"

#: The file mlx-lm's ``mlx_lm.lora`` writes an adapter's weights to.
MLX_FILE = "adapters.safetensors"

#: The fix for a diffusers- or kohya-format LoRA file.
FOREIGN_HINT = ("adapterspec reads PEFT-format adapter folders (adapter_config.json with adapter_model.safetensors, "
                "keys 'base_model.model.<module>.lora_A.weight'): load this file with diffusers "
                "(pipeline.load_lora_weights, or load_lora_adapter on the model), or convert it to a PEFT folder")

#: The fix for an mlx-lm adapter (its own tools: mlx-lm writes no PEFT-format adapter).
MLX_HINT = ("adapterspec reads PEFT-format adapter folders (adapter_config.json with peft_type, "
            "adapter_model.safetensors): use this adapter with mlx-lm (mlx_lm.load('<base model>', "
            "adapter_path='<folder>'), mlx_lm.generate --adapter-path <folder>), or fuse it into its base model with "
            "'mlx_lm.fuse --model <base model> --adapter-path <folder> --save-path <out>' (add --de-quantize for a "
            "quantized base) and load that model")

_KOHYA = re.compile(r"^lora_(unet|te\d?|transformer)_|(^|[._])lora[._](down|up)\.weight$")
_COMPONENT = re.compile(r"^(unet|transformer|text_encoder(_\d)?|prior|controlnet)\.(?=.*\.lora_[AB]\.)")
_MLX = re.compile(r"(^|\.)lora_[ab]$")
#: Fields of mlx-lm's adapter_config.json (its training arguments) that a PEFT config has none of.
_MLX_FIELDS = ("fine_tune_type", "lora_parameters")
_READ_AT_MOST = 8  # safetensors files of a folder whose keys are read to recognise one

Format = Literal["kohya", "diffusers", "mlx"]


def foreign_format(key: str) -> Format | None:
    """``"kohya"`` for a kohya-ss / A1111 key or an old diffusers one (``lora_down``/``lora_up``, ``lora.down``/
    ``lora.up``, ``lora_unet_``/``lora_te_`` names), ``"diffusers"`` for PEFT's names under a diffusers pipeline
    component (``unet.``, ``transformer.``, ``text_encoder.``...), ``"mlx"`` for mlx-lm's ``lora_a``/``lora_b``,
    else ``None``."""
    if _KOHYA.search(key):
        return "kohya"
    if _COMPONENT.match(key):
        return "diffusers"
    if _MLX.search(key):
        return "mlx"
    return None


def config_error(data: Mapping[str, Any], *, path: str | None = None) -> ConfigError | None:
    """The refusal of an mlx-lm ``adapter_config.json`` (no ``peft_type``; ``fine_tune_type`` or
    ``lora_parameters``), whose fix is not to add ``peft_type``: the weights beside it are mlx-lm's too.

    >>> config_error({"fine_tune_type": "lora", "lora_parameters": {"rank": 8}}).pointer
    '/fine_tune_type'
    >>> config_error({"peft_type": "LORA", "lora_parameters": {}}) is None
    True
    """
    marker = next((field for field in _MLX_FIELDS if field in data), None)
    if "peft_type" in data or marker is None:
        return None
    return ConfigError(f"an mlx-lm adapter config ({marker}), not a PEFT adapter_config.json: it has no peft_type, "
                       f"and mlx-lm's weights ({MLX_FILE}, keys '<module>.lora_a' stored [in, r] and "
                       "'<module>.lora_b') are not PEFT's", pointer="/" + marker, path=path, hint=MLX_HINT)


def _first_foreign(keys: Iterable[str]) -> str | None:
    """A key of ``keys`` in another tool's format (diffusers, kohya, mlx-lm), a weight's rather than an ``.alpha``
    where there is one."""
    found = [key for key in keys if foreign_format(key) is not None]
    return next((key for key in found if key.endswith(".weight")), found[0] if found else None)


def _keys(path: Path) -> list[str] | None:
    """The tensor names of safetensors file ``path`` (its header only), ``None`` where it cannot be read."""
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="numpy") as f:
            return list(f.keys())
    except Exception:  # noqa: BLE001 - a diagnosis only: an unreadable file is simply not recognised
        return None


def _describe(path: Path) -> tuple[str, str] | None:
    """What LoRA file ``path`` is, if it is a diffusers/kohya/mlx-lm one (by its name or its keys), with an example
    key, and the fix for it."""
    example = _first_foreign(_keys(path) or ())
    if example is None:
        if path.name == DIFFUSERS_FILE:
            return "a diffusers-format LoRA file (diffusers' name for its LoRA weights)", FOREIGN_HINT
        if path.name == MLX_FILE:
            return "an mlx-lm adapter file (mlx-lm's name for its adapter weights)", MLX_HINT
        return None
    kind = foreign_format(example)
    if kind == "mlx":
        return f"an mlx-lm LoRA file (keys such as {example!r})", MLX_HINT
    what = "a kohya/diffusers-format" if kind == "kohya" else "a diffusers-format"
    return f"{what} LoRA file (keys such as {example!r})", FOREIGN_HINT


def folder_error(folder: Path, config_name: str) -> FileFormatError | None:
    """For ``folder`` without ``config_name``: the refusal saying that it holds a diffusers/kohya/mlx-lm LoRA file
    (``pytorch_lora_weights.safetensors``, ``adapters.safetensors``, or a ``.safetensors`` file with such keys), else
    ``None``."""
    try:
        files = sorted(p for p in folder.glob("*.safetensors") if p.is_file())
    except OSError:
        return None
    files.sort(key=lambda p: p.name not in (DIFFUSERS_FILE, MLX_FILE))  # the libraries' own files first
    for file in files[:_READ_AT_MOST]:
        found = _describe(file)
        if found is not None:
            what, hint = found
            return FileFormatError(f"no {config_name} in the folder: it holds {file.name}, {what}, not a "
                                   "PEFT-format adapter", path=folder, hint=hint)
    return None


def file_error(path: Path, config_name: str, *, hint: str | None = None) -> FileFormatError:
    """The refusal of a file given where an adapter folder was expected: a diffusers/kohya/mlx-lm LoRA file named
    as such; a weights file, with the folder it needs; any other file as a file (with ``hint``, if given).

    >>> file_error(Path("out/notes.txt"), "adapter_config.json").message
    'a file, not an adapter folder'
    """
    found = _describe(path) if path.suffix == ".safetensors" else None
    if found is not None:
        return FileFormatError(f"{found[0]}, not a PEFT-format adapter folder", path=path, hint=found[1])
    if path.suffix in (".safetensors", ".bin", ".pt", ".pth", ".ckpt"):
        return FileFormatError("a weights file, not an adapter folder: an adapter's weights are read from its "
                               f"folder, next to {config_name}", path=path,
                               hint=f"pass the folder holding {config_name} and the weights (save_pretrained's "
                                    "folder)")
    return FileFormatError("a file, not an adapter folder", path=path,
                           hint=hint or f"pass the folder holding {config_name} and adapter_model.safetensors")


def key_error(key: str, prefix: str) -> UnexpectedTensorError | None:
    """The refusal of a diffusers/kohya/mlx-lm key, whose fix is not to prefix it with ``prefix``
    (``base_model.model.``), else ``None``. A key with ``prefix`` is only ever a kohya or mlx-lm one.

    >>> key_error("unet.mid.to_q.lora_A.weight", "base_model.model.").hint[:88]
    "replace 'unet.' with 'base_model.model.' in every key ('base_model.model.mid.to_q.lora_A"
    """
    kind = foreign_format(key)
    if kind == "kohya":
        return UnexpectedTensorError(
            "a kohya/diffusers-format LoRA key (lora_down/lora_up, lora_unet_/lora_te_ names), not PEFT's: this "
            "file is not a PEFT-format adapter, whatever its config says", key=key, hint=FOREIGN_HINT)
    if kind == "mlx":
        return UnexpectedTensorError(
            "an mlx-lm LoRA key (lora_a/lora_b, lora_a stored [in, r]), not PEFT's: this file is not a PEFT-format "
            "adapter, whatever its config says", key=key, hint=MLX_HINT)
    if kind == "diffusers":
        component, _, rest = key.partition(".")
        return UnexpectedTensorError(
            f"key starts with {component + '.'!r}, the pipeline component diffusers saves a LoRA under "
            f"(save_lora_weights), not {prefix!r}", key=key,
            hint=f"replace {component + '.'!r} with {prefix!r} in every key ({prefix + rest!r}) if the model is the "
                 f"pipeline's {component}; otherwise prefix every key with {prefix!r}")
    return None
