"""LoRA files of diffusers' and kohya's formats, recognised where an adapter folder was expected, so that a refusal
says what the file is and how to use it (adapterspec reads PEFT-format folders only).

diffusers' ``save_lora_weights`` / ``save_lora_adapter`` write ``pytorch_lora_weights.safetensors`` (no
``adapter_config.json``) with keys under the pipeline component's name (``unet.<module>.lora_A.weight``) or, in older
versions, ``unet.<module>.lora.down.weight``; kohya-ss and A1111 LoRAs have ``lora_unet_<module_with_underscores>.
lora_down.weight`` with an ``.alpha`` per module.

>>> foreign_format("lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight")
'kohya'
>>> foreign_format("unet.down_blocks.0.attentions.0.proj_in.lora_A.weight")
'diffusers'
>>> foreign_format("model.layers.0.self_attn.q_proj.lora_A.weight") is None
True
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

from .errors import FileFormatError, UnexpectedTensorError

__all__ = ["DIFFUSERS_FILE", "FOREIGN_HINT", "file_error", "folder_error", "foreign_format", "key_error"]

#: The file diffusers' ``save_lora_weights`` and ``save_lora_adapter`` write.
DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"

#: The fix for a diffusers- or kohya-format LoRA file.
FOREIGN_HINT = ("adapterspec reads PEFT-format adapter folders (adapter_config.json with adapter_model.safetensors, "
                "keys 'base_model.model.<module>.lora_A.weight'): load this file with diffusers "
                "(pipeline.load_lora_weights, or load_lora_adapter on the model), or convert it to a PEFT folder")

_KOHYA = re.compile(r"^lora_(unet|te\d?|transformer)_|(^|[._])lora[._](down|up)\.weight$")
_COMPONENT = re.compile(r"^(unet|transformer|text_encoder(_\d)?|prior|controlnet)\.(?=.*\.lora_[AB]\.)")
_READ_AT_MOST = 8  # safetensors files of a folder whose keys are read to recognise one


def foreign_format(key: str) -> Literal["kohya", "diffusers"] | None:
    """``"kohya"`` for a kohya-ss / A1111 key or an old diffusers one (``lora_down``/``lora_up``, ``lora.down``/
    ``lora.up``, ``lora_unet_``/``lora_te_`` names), ``"diffusers"`` for PEFT's names under a diffusers pipeline
    component (``unet.``, ``transformer.``, ``text_encoder.``...), else ``None``."""
    if _KOHYA.search(key):
        return "kohya"
    if _COMPONENT.match(key):
        return "diffusers"
    return None


def _first_foreign(keys: Iterable[str]) -> str | None:
    """A diffusers/kohya key of ``keys``, a weight's rather than an ``.alpha`` where there is one."""
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


def _describe(path: Path) -> str | None:
    """What LoRA file ``path`` is, if it is a diffusers/kohya one (by its name or its keys), with an example key."""
    example = _first_foreign(_keys(path) or ())
    if example is None:
        return "a diffusers-format LoRA file (diffusers' name for its LoRA weights)" if path.name == DIFFUSERS_FILE \
            else None
    kind = "a kohya/diffusers-format" if foreign_format(example) == "kohya" else "a diffusers-format"
    return f"{kind} LoRA file (keys such as {example!r})"


def folder_error(folder: Path, config_name: str) -> FileFormatError | None:
    """For ``folder`` without ``config_name``: the refusal saying that it holds a diffusers/kohya-format LoRA file
    (``pytorch_lora_weights.safetensors``, or a ``.safetensors`` file with such keys), else ``None``."""
    try:
        files = sorted(p for p in folder.glob("*.safetensors") if p.is_file())
    except OSError:
        return None
    files.sort(key=lambda p: p.name != DIFFUSERS_FILE)  # diffusers' own file first
    for file in files[:_READ_AT_MOST]:
        what = _describe(file)
        if what is not None:
            return FileFormatError(f"no {config_name} in the folder: it holds {file.name}, {what}, not a "
                                   "PEFT-format adapter", path=folder, hint=FOREIGN_HINT)
    return None


def file_error(path: Path, config_name: str, *, hint: str | None = None) -> FileFormatError:
    """The refusal of a file given where an adapter folder was expected: a diffusers/kohya-format LoRA file named
    as such; a weights file, with the folder it needs; any other file as a file (with ``hint``, if given).

    >>> file_error(Path("out/notes.txt"), "adapter_config.json").message
    'a file, not an adapter folder'
    """
    what = _describe(path) if path.suffix == ".safetensors" else None
    if what is not None:
        return FileFormatError(f"{what}, not a PEFT-format adapter folder", path=path, hint=FOREIGN_HINT)
    if path.suffix in (".safetensors", ".bin", ".pt", ".pth", ".ckpt"):
        return FileFormatError("a weights file, not an adapter folder: an adapter's weights are read from its "
                               f"folder, next to {config_name}", path=path,
                               hint=f"pass the folder holding {config_name} and the weights (save_pretrained's "
                                    "folder)")
    return FileFormatError("a file, not an adapter folder", path=path,
                           hint=hint or f"pass the folder holding {config_name} and adapter_model.safetensors")


def key_error(key: str, prefix: str) -> UnexpectedTensorError | None:
    """For a key without ``prefix`` (``base_model.model.``): the refusal of a diffusers/kohya-format key, whose fix is
    not to prefix it, else ``None``.

    >>> key_error("unet.mid.to_q.lora_A.weight", "base_model.model.").hint[:88]
    "replace 'unet.' with 'base_model.model.' in every key ('base_model.model.mid.to_q.lora_A"
    """
    kind = foreign_format(key)
    if kind == "kohya":
        return UnexpectedTensorError(
            "a kohya/diffusers-format LoRA key (lora_down/lora_up, lora_unet_/lora_te_ names), not PEFT's: this "
            "file is not a PEFT-format adapter, whatever its config says", key=key, hint=FOREIGN_HINT)
    if kind == "diffusers":
        component, _, rest = key.partition(".")
        return UnexpectedTensorError(
            f"key starts with {component + '.'!r}, the pipeline component diffusers saves a LoRA under "
            f"(save_lora_weights), not {prefix!r}", key=key,
            hint=f"replace {component + '.'!r} with {prefix!r} in every key ({prefix + rest!r}) if the model is the "
                 f"pipeline's {component}; otherwise prefix every key with {prefix!r}")
    return None
