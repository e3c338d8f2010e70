"""Training adapters with Keras ``fit``: adapter-only checkpoints and resuming.

:class:`AdapterCheckpoints` is a ``keras.callbacks.Callback``. Every ``save_freq`` epochs (or batches) it writes
``<directory>/checkpoint-<step>/`` -- the adapter(s) as a normal adapter folder (:func:`adapterspec.save_adapter`)
plus ``optimizer.npz`` (the optimizer's variables) and ``trainer_state.json`` (step, epoch, metric) -- staged
in a hidden folder and renamed into place, so a checkpoint is there whole or not at all. It keeps the last
``keep`` checkpoints, and the best by ``monitor`` besides. :meth:`AdapterCheckpoints.resume` puts a
checkpoint's adapter values and optimizer state back into the very variables ``fit`` trains, and returns the
epoch to pass as ``initial_epoch``.

>>> adapterspec.inject_adapter(model, {"peft_type": "LORA", "r": 8, "target_modules": ["q_proj", "v_proj"]})  # doctest: +SKIP
>>> checkpoints = AdapterCheckpoints("out", keep=2)                                                       # doctest: +SKIP
>>> model.fit(x, y, epochs=3, callbacks=[checkpoints])                                                    # doctest: +SKIP
>>> epoch = checkpoints.resume(model)            # a later process: same model, adapter and compile()    # doctest: +SKIP
>>> model.fit(x, y, epochs=3, initial_epoch=epoch, callbacks=[checkpoints])                              # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from pathlib import Path
from typing import Any

import keras
import numpy as np

import adapterspec
from adapterspec import LoadOptions
from adapterspec.errors import AdapterNotFoundError, ShapeMismatchError, UnsupportedError
from adapterspec.folder import checkpoint_adapters

from .state import load_state

__all__ = ["AdapterCheckpoints", "restore_adapter"]

_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
STATE_NAME = "trainer_state.json"
OPTIMIZER_NAME = "optimizer.npz"


def restore_adapter(model: Any, folder: str | Path, adapter_name: str = "default") -> list[str]:
    """Copy the adapter saved in ``folder`` into the loaded adapter ``adapter_name``, in place: its variables stay
    the same objects (an optimizer built on them goes on with them). All checks run before the first assignment.

    :returns: the keys restored.
    :raises MissingTensorError, UnexpectedTensorError, ShapeMismatchError: the folder holds another adapter.

    >>> restore_adapter(model, "out/checkpoint-40")                        # doctest: +SKIP
    """
    return load_state(model, adapterspec.read_adapter(folder), adapter_name, LoadOptions(trainable=True))


def _refuse_trainable_base(model: Any) -> None:
    """A checkpoint holds the adapters only: refuse to write one while a variable outside them trains
    (``freeze_base=False``), since a resume would restart it from its pretrained values beside its restored
    optimizer state (as the torch backend's function of the same name)."""
    from .switch import get_state

    state = get_state(model)
    owned = {id(v) for bank, _ in state.banks.values() for v in bank.variables} if state is not None else set()
    stray = [v.path for v in model.trainable_variables if id(v) not in owned]
    if stray:
        raise UnsupportedError(
            f"{stray[0]!r} ({len(stray)} variables in all) trains but belongs to no adapter, and adapter checkpoints "
            "hold the adapters only: a resume would restart it from its pretrained values", key=stray[0],
            hint="freeze it (inject_adapter(..., freeze_base=True), the default), or train it as part of the adapter "
                 "(modules_to_save in the config)")


class AdapterCheckpoints(keras.callbacks.Callback):  # type: ignore[misc]
    """Adapter-only checkpoints for ``model.fit`` (see the module docstring).

    :param directory: where the ``checkpoint-<step>`` folders go.
    :param save_freq: ``"epoch"``, or a number of batches.
    :param keep: how many of the latest checkpoints stay (``None``: all).
    :param monitor: a metric of ``logs`` (``"loss"``, ``"val_loss"``); its best checkpoint stays besides the latest.
    :param mode: ``"min"`` or ``"max"``: which value of ``monitor`` is best.
    :param adapter_names: the adapters to save (default: all of the model's).
    :param base_model_name_or_path: recorded in the saved configs (a keras-hub model does not know its preset).

    >>> AdapterCheckpoints("out", save_freq=100, keep=3, monitor="val_loss")   # doctest: +SKIP
    """

    def __init__(self, directory: str | Path, *, save_freq: str | int = "epoch", keep: int | None = None,
                 monitor: str | None = None, mode: str = "min", adapter_names: list[str] | None = None,
                 base_model_name_or_path: str | None = None, durable: bool = False) -> None:
        super().__init__()
        if save_freq != "epoch" and not (isinstance(save_freq, int) and save_freq > 0):
            raise UnsupportedError(f"save_freq must be 'epoch' or a positive number of batches, got {save_freq!r}",
                                   key="save_freq", hint="pass save_freq='epoch' or save_freq=100")
        if mode not in ("min", "max"):
            raise UnsupportedError(f"mode must be 'min' or 'max', got {mode!r}", key="mode",
                                   hint="mode='min' for a loss, 'max' for an accuracy")
        self.directory = Path(directory)
        self.save_freq, self.keep, self.monitor, self.mode = save_freq, keep, monitor, mode
        self.adapter_names, self.base, self.durable = adapter_names, base_model_name_or_path, durable
        self.best: tuple[float, str] | None = None
        self._epoch = 0

    # -- saving -----------------------------------------------------------------------------------
    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        _refuse_trainable_base(self.model)  # before training, not at its first checkpoint

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self._epoch = epoch

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        if isinstance(self.save_freq, int) and self._step() % self.save_freq == 0:
            self.save(logs, epoch=self._epoch)

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        if self.save_freq == "epoch":
            self.save(logs, epoch=epoch + 1)

    def _step(self) -> int:
        return int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))

    def save(self, logs: dict[str, Any] | None = None, *, epoch: int = 0) -> Path:
        """Write ``checkpoint-<step>`` now (staged, then renamed into place) and drop the ones not kept.

        >>> checkpoints.save()                                             # doctest: +SKIP
        PosixPath('out/checkpoint-120')
        """
        step = self._step()
        final = self.directory / f"checkpoint-{step}"
        staged = self.directory / f".checkpoint-{step}.partial"
        shutil.rmtree(staged, ignore_errors=True)
        self.directory.mkdir(parents=True, exist_ok=True)
        names = self.adapter_names or adapterspec.adapter_names(self.model)
        _refuse_trainable_base(self.model)
        try:
            if names == ["default"]:
                adapterspec.save_adapter(self.model, staged, durable=self.durable, base_model_name_or_path=self.base)
            else:
                adapterspec.save_adapters(self.model, staged, names, durable=self.durable,
                                          base_model_name_or_path=self.base)
            variables = self.model.optimizer.variables
            np.savez(staged / OPTIMIZER_NAME, **{f"{i:05d}": keras.ops.convert_to_numpy(v)
                                                  for i, v in enumerate(variables)})
            metric = None if self.monitor is None else (logs or {}).get(self.monitor)
            state = {"global_step": step, "epoch": epoch, "monitor": self.monitor,
                     "metric": None if metric is None else float(metric)}
            (staged / STATE_NAME).write_text(json.dumps(state, indent=2) + "\n", "utf-8")
            if final.exists():
                shutil.rmtree(final)
            os.replace(staged, final)
        except BaseException:
            shutil.rmtree(staged, ignore_errors=True)
            raise
        if metric is not None and math.isfinite(float(metric)):
            better = self.best is None or (metric < self.best[0] if self.mode == "min" else metric > self.best[0])
            if better:
                self.best = (float(metric), final.name)
        self._rotate()
        return final

    def checkpoints(self) -> list[Path]:
        """The checkpoint folders in ``directory``, oldest (lowest step) first."""
        if not self.directory.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.directory.iterdir() if (m := _CHECKPOINT.match(p.name))]
        return [p for _, p in sorted(found)]

    @property
    def best_checkpoint(self) -> Path | None:
        """The checkpoint with the best ``monitor`` value so far (this run), or ``None``."""
        return self.directory / self.best[1] if self.best is not None else None

    def _rotate(self) -> None:
        if self.keep is None:
            return
        existing = self.checkpoints()
        kept = set(existing[-self.keep:]) if self.keep > 0 else set()
        if self.best is not None:
            kept.add(self.directory / self.best[1])
        for folder in existing:
            if folder not in kept:
                shutil.rmtree(folder)

    # -- resuming ---------------------------------------------------------------------------------
    def resume(self, model: Any, checkpoint: str | Path | None = None) -> int:
        """Put a checkpoint's adapters and optimizer state back into ``model`` (compiled, its adapters injected as
        for the run that wrote it); returns the epoch to pass to ``fit(initial_epoch=...)``.

        :param checkpoint: a checkpoint folder; default: the latest in ``directory``.
        :raises AdapterNotFoundError: there is no checkpoint.
        :raises ShapeMismatchError: the optimizer state does not fit the model's trainable variables.

        >>> model.fit(x, y, epochs=5, initial_epoch=checkpoints.resume(model))  # doctest: +SKIP
        """
        if checkpoint is None:
            found = self.checkpoints()
            if not found:
                raise AdapterNotFoundError(f"no checkpoint-<step> folder in {self.directory}", path=self.directory,
                                           hint="train first, or pass the checkpoint folder")
            checkpoint = found[-1]
        folder = Path(checkpoint)
        state = json.loads((folder / STATE_NAME).read_text("utf-8"))
        optimizer = model.optimizer
        if not optimizer.built:
            optimizer.build(model.trainable_variables)
        with np.load(folder / OPTIMIZER_NAME) as saved:
            values = [saved[k] for k in sorted(saved.files)]
        variables = optimizer.variables
        if len(values) != len(variables) or any(tuple(v.shape) != a.shape for v, a in zip(variables, values)):
            raise ShapeMismatchError(f"the checkpoint's optimizer state ({len(values)} variables) does not fit this "
                                     f"model's optimizer ({len(variables)} variables)", path=folder / OPTIMIZER_NAME,
                                     hint="resume with the adapter config and optimizer of the run that saved it")
        for name, path in checkpoint_adapters(folder, self.adapter_names or adapterspec.adapter_names(model)).items():
            restore_adapter(model, path, name)
        for variable, value in zip(variables, values):
            variable.assign(value)
        return int(state["epoch"])
