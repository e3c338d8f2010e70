"""Training adapters with transformers' ``Trainer``: adapter-only checkpoints and resuming.

:class:`AdapterCheckpoints` attaches to a ``Trainer`` (or a subclass, such as TRL's ``SFTTrainer``) and
replaces the two places where the Trainer special-cases PEFT models -- writing the model into a checkpoint
(``Trainer._save``) and reading it back (``_load_from_checkpoint``, ``_load_best_model``) -- so that:

* every checkpoint the Trainer writes (``save_steps``/``save_strategy``, ``save_total_limit``,
  ``metric_for_best_model``) is ``checkpoint-<step>/`` holding the adapter(s) as a normal adapter folder,
  written atomically by :func:`adapterspec.save_adapter`, beside the Trainer's own optimizer, scheduler,
  RNG and trainer state -- never the base weights;
* ``trainer.train(resume_from_checkpoint=...)`` puts the checkpoint's adapter values back into the very
  parameters the optimizer holds, and the Trainer restores optimizer, scheduler and RNG state as usual;
* ``load_best_model_at_end`` restores the best checkpoint's adapter.

TRL's ``SFTTrainer`` (checked in trl 1.16.0, ``trl/trainer/sft_trainer.py`` and its ``_BaseTrainer``) overrides
none of those three methods: it overrides ``_save_checkpoint`` only to write a model card (``README.md`` in
``output_dir``) before calling the Trainer's, which saves through ``_save``. So the callback works with it
unchanged; pass the adapted model and no ``peft_config`` (that would wrap it in a ``PeftModel``). The test suite
runs it (``test_sft_trainer_checkpoints_hold_the_adapter_and_resume_exactly``).

>>> adapterspec.inject_adapter(model, {"peft_type": "LORA", "r": 8, "target_modules": ["q_proj", "v_proj"]})  # doctest: +SKIP
>>> trainer = Trainer(model=model, args=TrainingArguments("out", save_steps=50, save_total_limit=2), ...)  # doctest: +SKIP
>>> AdapterCheckpoints(trainer)                                                                           # doctest: +SKIP
>>> trainer.train(resume_from_checkpoint=True)                                                            # doctest: +SKIP
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback

import adapterspec
from adapterspec.errors import MissingTensorError, ShapeMismatchError, UnexpectedTensorError, UnsupportedError
from adapterspec.folder import checkpoint_adapters
from adapterspec.spec import CONFIG_NAME, MANIFEST_NAME

from .auxiliary import auxiliary_tensors
from .state import expected_params
from .switch import require_state

__all__ = ["AdapterCheckpoints", "restore_adapter"]


def _slots(model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    state = require_state(model, adapter_name)
    slots = dict(expected_params(model, adapter_name))
    slots.update(auxiliary_tensors(state, adapter_name))
    return slots


def restore_adapter(model: nn.Module, folder: str | Path, adapter_name: str = "default") -> list[str]:
    """Copy the adapter saved in ``folder`` into the loaded adapter ``adapter_name``, in place: the parameters stay
    the same objects (an optimizer holding them goes on with them), only their values change. All or nothing.

    :returns: the keys restored.
    :raises MissingTensorError: a parameter of the adapter has no tensor in the folder.
    :raises UnexpectedTensorError: the folder has a tensor the adapter has not (another config).
    :raises ShapeMismatchError: a tensor's shape differs from its parameter's.

    >>> restore_adapter(model, "out/checkpoint-40")                        # doctest: +SKIP
    ['base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight', ...]
    """
    saved = adapterspec.read_adapter(folder)
    slots = _slots(model, adapter_name)
    missing = sorted(slots.keys() - saved.tensors.keys())
    if missing:
        raise MissingTensorError(f"the checkpoint has no tensor for this parameter of adapter {adapter_name!r} "
                                 f"({len(missing)} missing)", key=missing[0], path=saved.weights_file,
                                 hint="resume with the adapter config the checkpoint was trained with")
    unexpected = sorted(saved.tensors.keys() - slots.keys())
    if unexpected:
        raise UnexpectedTensorError(f"adapter {adapter_name!r} has no parameter for this tensor of the checkpoint "
                                    f"({len(unexpected)} unexpected)", key=unexpected[0], path=saved.weights_file,
                                    hint="resume with the adapter config the checkpoint was trained with")
    for key, target in slots.items():
        if tuple(target.shape) != tuple(saved.tensors[key].shape):
            raise ShapeMismatchError(f"shape {list(saved.tensors[key].shape)} does not fit the parameter's "
                                     f"{list(target.shape)}", key=key, path=saved.weights_file,
                                     hint="resume with the adapter config the checkpoint was trained with")
    tensors = saved.load_tensors("pt")
    with torch.no_grad():
        for key, target in slots.items():
            target.copy_(tensors[key])
    return sorted(slots)


def _refuse_trainable_base(model: nn.Module) -> None:
    """A checkpoint holds the adapters only: refuse to write one while a parameter outside them trains
    (``freeze_base=False``), since a resume would restart it from its pretrained values beside its restored
    optimizer state (the resumed run ended 0.42 off the uninterrupted one, silently)."""
    from .state import expected_params

    owned = {id(t) for name in adapterspec.adapter_names(model) for t in expected_params(model, name).values()}
    stray = [name for name, param in model.named_parameters() if param.requires_grad and id(param) not in owned]
    if stray:
        raise UnsupportedError(
            f"{stray[0]!r} ({len(stray)} parameters in all) trains but belongs to no adapter, and adapter checkpoints "
            "hold the adapters only: a resume would restart it from its pretrained values", key=stray[0],
            hint="freeze it (inject_adapter(..., freeze_base=True), the default), or train it as part of the adapter "
                 "(modules_to_save in the config)")


def _is_adapter_folder(folder: Path) -> bool:
    return (folder / CONFIG_NAME).is_file() or (folder / MANIFEST_NAME).is_file()


class AdapterCheckpoints(TrainerCallback):
    """Make ``trainer`` write and read adapter-only checkpoints (see the module docstring).

    How often, how many and which best one are the Trainer's own arguments (``save_steps``,
    ``save_strategy``, ``save_total_limit``, ``metric_for_best_model``, ``load_best_model_at_end``).

    :param trainer: a ``transformers.Trainer`` (or subclass) whose model has adapterspec adapters.
    :param adapter_names: the adapters to save (default: all of the model's); one is saved as a plain
        adapter folder, several as a folder with a manifest (``default`` in its root).
    :param durable: fsync the adapter files (see :func:`adapterspec.save_adapter`).

    >>> AdapterCheckpoints(trainer, adapter_names=["default"])             # doctest: +SKIP
    """

    def __init__(self, trainer: Any, *, adapter_names: list[str] | None = None, durable: bool = False) -> None:
        if not adapterspec.adapter_names(trainer.model):
            raise UnsupportedError("the trainer's model has no adapterspec adapter",
                                   hint="inject_adapter() or load_adapter(trainable=True) before AdapterCheckpoints")
        _refuse_trainable_base(trainer.model)  # before training, not at its first checkpoint
        self.trainer = trainer
        self.adapter_names = adapter_names
        self.durable = durable
        self._load_model = trainer._load_from_checkpoint
        self._load_best = trainer._load_best_model
        # the Trainer special-cases PEFT models at exactly these three methods: replaced on this instance only
        trainer._save = self._save
        trainer._load_from_checkpoint = self._load_from_checkpoint
        trainer._load_best_model = self._load_best_model
        trainer.add_callback(self)

    def _names(self) -> list[str]:
        return self.adapter_names if self.adapter_names is not None else adapterspec.adapter_names(self.trainer.model)

    def _save(self, output_dir: str | None = None, state_dict: dict[str, Any] | None = None) -> None:
        trainer = self.trainer
        folder = Path(output_dir if output_dir is not None else trainer.args.output_dir)
        if not trainer.args.should_save:
            return
        model = trainer.accelerator.unwrap_model(trainer.model, keep_torch_compile=False)
        _refuse_trainable_base(model)
        names = self._names()
        if names == ["default"]:
            adapterspec.save_adapter(model, folder, overwrite=True, durable=self.durable)
        else:
            adapterspec.save_adapters(model, folder, names, overwrite=True, durable=self.durable)
        if trainer.processing_class is not None:
            trainer.processing_class.save_pretrained(folder)
        torch.save(trainer.args, os.path.join(folder, "training_args.bin"))

    def _restore(self, folder: Path, model: Any) -> None:
        model = self.trainer.accelerator.unwrap_model(model if model is not None else self.trainer.model,
                                                      keep_torch_compile=False)
        for name, path in checkpoint_adapters(folder, self._names()).items():
            restore_adapter(model, path, name)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        folder = Path(resume_from_checkpoint)
        if not _is_adapter_folder(folder):
            self._load_model(resume_from_checkpoint, model)
            return
        self._restore(folder, model)

    def _load_best_model(self) -> None:
        best = self.trainer.state.best_model_checkpoint
        if best is None or not _is_adapter_folder(Path(best)):
            self._load_best()
            return
        self._restore(Path(best), None)
