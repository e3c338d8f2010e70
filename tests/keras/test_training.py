"""Training with the Keras backend: a frozen base, base identity, adapter-only checkpoints with ``fit``, resume."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("torch")
peft = pytest.importorskip("peft")
pytest.importorskip("transformers")

import keras  # noqa: E402

import adapterspec  # noqa: E402
from keras_helpers import ATOL, hf_model, keras_inputs, keras_logits, keras_model, torch_logits  # noqa: E402

LORA = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}


def test_freeze_base_false_keeps_the_base_trainable(checkpoints: Any) -> None:
    model = keras_model("llama", checkpoints["llama"])
    base = {id(v) for v in model.trainable_variables}
    adapterspec.inject_adapter(model, LORA, "frozen")
    assert not base & {id(v) for v in model.trainable_variables}
    adapterspec.delete_adapter(model, "frozen")
    assert {id(v) for v in model.trainable_variables} == base
    adapterspec.inject_adapter(model, LORA, freeze_base=False)
    assert base < {id(v) for v in model.trainable_variables}


def _fingerprint_of(folder: Path) -> str:
    from adapterspec.identity import FINGERPRINT_KEY

    return adapterspec.read_adapter(folder).metadata[FINGERPRINT_KEY]


def _save_from_keras_and_torch(arch: str, config: dict[str, Any], checkpoints: Any, tmp_path: Path) -> None:
    """Inject ``config`` into the keras-hub model and the transformers model of one checkpoint and save each
    (``tmp_path / "keras"``, ``tmp_path / "torch"``)."""
    for name, model in (("keras", keras_model(arch, checkpoints[arch])), ("torch", hf_model(checkpoints[arch]))):
        adapterspec.inject_adapter(model, config)
        adapterspec.save_adapter(model, tmp_path / name)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_keras_and_torch_fingerprint_the_same_base_alike(arch: str, checkpoints: Any, tmp_path: Path) -> None:
    """keras-hub's kernels ([in, heads, head_dim] einsums, GPT-2's fused c_attn split in three) read in the spec's
    layout give the fingerprint transformers' weights give."""
    targets = ["q_proj", "v_proj", "down_proj"] if arch == "llama" else ["c_attn", "c_fc"]
    config = {**LORA, "target_modules": targets}
    _save_from_keras_and_torch(arch, config, checkpoints, tmp_path)
    assert _fingerprint_of(tmp_path / "keras") == _fingerprint_of(tmp_path / "torch")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        adapterspec.load_adapter(hf_model(checkpoints[arch]), tmp_path / "keras", strict=True)
        adapterspec.load_adapter(keras_model(arch, checkpoints[arch]), tmp_path / "torch", strict=True)


def test_another_base_warns_and_strict_refuses(checkpoints: Any, tmp_path: Path) -> None:
    model = keras_model("llama", checkpoints["llama"])
    adapterspec.inject_adapter(model, LORA)
    adapterspec.save_adapter(model, tmp_path / "a")
    other = keras_model("llama", checkpoints["llama"])
    kernel = other.backbone.transformer_layers[1]._self_attention_layer._value_dense.kernel
    kernel.assign(kernel + 0.01 * np.sin(np.arange(np.prod(kernel.shape))).reshape(kernel.shape))
    with pytest.warns(adapterspec.BaseModelMismatchWarning):
        adapterspec.load_adapter(other, tmp_path / "a")
    adapterspec.delete_adapter(other, "default")
    with pytest.raises(adapterspec.BaseModelMismatchError):
        adapterspec.load_adapter(other, tmp_path / "a", strict=True)
    assert adapterspec.adapter_names(other) == []


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_autopeft_loads_a_keras_saved_folder(checkpoints: Any, token_ids: np.ndarray, tmp_path: Path) -> None:
    model = keras_model("llama", checkpoints["llama"])
    adapterspec.inject_adapter(model, LORA)
    for v in model.trainable_variables:
        v.assign(0.05 * np.sin(np.arange(np.prod(v.shape)) * 0.7).reshape(v.shape))
    adapterspec.save_adapter(model, tmp_path / "a", base_model_name_or_path=str(checkpoints["llama"]))
    config = adapterspec.read_adapter(tmp_path / "a").config
    assert config["task_type"] == "CAUSAL_LM" and config["base_model_name_or_path"] == str(checkpoints["llama"])
    reference = peft.AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "a")).eval()
    assert np.abs(torch_logits(reference, token_ids) - keras_logits(model, token_ids)).max() <= ATOL


def test_model_save_refuses_while_adapters_are_in(checkpoints: Any, tmp_path: Path) -> None:
    model = keras_model("llama", checkpoints["llama"])
    adapterspec.inject_adapter(model, LORA)
    with pytest.raises(adapterspec.UnsupportedError, match="save_adapter"):
        model.save(tmp_path / "m.keras")
    assert not (tmp_path / "m.keras").exists()
    adapterspec.delete_adapter(model, "default")
    assert "save" not in model.__dict__  # the model's own save is back


@pytest.mark.parametrize(("where", "save"), [
    ("task", lambda m, path: keras.saving.save_model(m, path / "m.keras")),
    ("task", lambda m, path: m.save_weights(path / "m.weights.h5")),
    ("backbone", lambda m, path: m.save_weights(path / "m.weights.h5")),  # a model around the adapted one
    ("backbone", lambda m, path: m.save_to_preset(str(path / "preset"))),
    ("task", lambda m, path: m.backbone.save_to_preset(str(path / "preset"))),
    ("backbone", lambda m, path: m.backbone.save(path / "backbone.keras")),
], ids=["save_model", "save_weights", "save_weights-of-the-task-model", "save_to_preset", "backbone-save_to_preset",
        "backbone-save"])
def test_every_keras_save_refuses_while_adapters_are_in(checkpoints: Any, token_ids: np.ndarray, tmp_path: Path,
                                                        where: str, save: Any) -> None:
    """Each of Keras' saving paths walks the layers' ``save_own_variables``: with an adapter in, the file held the
    base alone (a restore gave the base, or an untrained adapter), now the save refuses, typed, before it opens a
    file (Keras had opened it when ``save_own_variables`` refused: an incomplete file was left, which failed to load;
    test_a_refused_save_leaves_the_existing_file_as_it_was)."""
    model = keras_model("llama", checkpoints["llama"])
    adapterspec.inject_adapter(model if where == "task" else model.backbone, LORA)
    with pytest.raises(adapterspec.UnsupportedError, match="save_adapter"):
        save(model, tmp_path)
    assert not list(tmp_path.iterdir())
    adapterspec.delete_adapter(model if where == "task" else model.backbone, "default")
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    save(model, tmp_path)  # Keras' own saving is back with the last adapter gone
    assert {p for p in tmp_path.rglob("*") if p.is_file() and before.get(p) != p.stat().st_mtime_ns}


def _dense_model() -> Any:
    """A two-layer functional model (the probe's): every Keras saving path runs on it in well under a second."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8,))
    return keras.Model(inputs, keras.layers.Dense(4, name="fc2")(keras.layers.Dense(8, name="fc1")(inputs)))


def _around(model: Any) -> Any:
    """A functional model calling ``model``."""
    inputs = keras.Input((8,))
    return keras.Model(inputs, model(inputs))


def _files(root: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


_LORA_FC1 = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["fc1"], "init_lora_weights": False}


@pytest.mark.parametrize("save", [
    lambda m, outer, path: m.save_weights(path / "m.weights.h5"),
    lambda m, outer, path: keras.saving.save_weights(m, path / "m.weights.h5"),
    lambda m, outer, path: m.save_weights(path / "m.weights.json", max_shard_size=1),
    lambda m, outer, path: keras.saving.save_model(m, path / "m.keras"),
    lambda m, outer, path: keras.saving.save_model(m, path / "m_folder", zipped=False),
    lambda m, outer, path: keras.saving.save_model(m, path / "m.h5"),  # legacy HDF5: written silently before
    lambda m, outer, path: outer.save(path / "outer.keras"),  # a model around the adapted one
    lambda m, outer, path: outer.save(path / "outer.h5"),
    lambda m, outer, path: outer.save_weights(path / "outer.weights.h5"),
], ids=["save_weights", "keras.saving.save_weights", "save_weights-sharded", "save_model", "save_model-folder",
        "save_model-h5", "outer-save", "outer-save-h5", "outer-save_weights"])
def test_a_refused_save_leaves_the_existing_file_as_it_was(save: Any, tmp_path: Path) -> None:
    """Keras opened the file for writing before the adapted layers' ``save_own_variables`` refused: a good
    ``model.weights.h5`` of 16344 bytes was left 6144 bytes long and unloadable, a ``model.keras`` 17615 -> 2789, and
    ``save_model`` to ``.h5`` wrote the adapted model without refusing. Every path refuses before it opens a file now:
    what was there is byte for byte what it was, and nothing new is written."""
    model = _dense_model()
    outer = _around(model)
    save(model, outer, tmp_path)  # the good files of the base model
    good = _files(tmp_path)
    assert good
    adapterspec.inject_adapter(model, _LORA_FC1)
    with pytest.raises(adapterspec.UnsupportedError, match="save_adapter"):
        save(model, outer, tmp_path)
    assert _files(tmp_path) == good
    adapterspec.delete_adapter(model, "default")
    (tmp_path / "again").mkdir()
    save(model, outer, tmp_path / "again")  # Keras' own saving is back with the last adapter gone
    assert _files(tmp_path / "again")


@pytest.mark.parametrize("callback", [
    lambda path: keras.callbacks.ModelCheckpoint(str(path / "latest.weights.h5"), save_weights_only=True),
    lambda path: keras.callbacks.BackupAndRestore(str(path)),
], ids=["ModelCheckpoint", "BackupAndRestore"])
def test_a_refused_checkpoint_during_fit_keeps_the_last_good_one(callback: Any, tmp_path: Path) -> None:
    """``ModelCheckpoint(save_weights_only=True)`` and ``BackupAndRestore`` overwrite one file: the refused save left
    it truncated (BackupAndRestore's last good backup destroyed). The refusal comes before the file is opened now."""
    model = _dense_model()
    model.save_weights(tmp_path / "latest.weights.h5")  # the previous run's checkpoint (BackupAndRestore's name)
    good = _files(tmp_path)
    adapterspec.inject_adapter(model, _LORA_FC1, trainable=True)
    model.compile(optimizer="sgd", loss="mse")
    x = np.arange(32, dtype="float32").reshape(4, 8) / 32
    with pytest.raises(adapterspec.UnsupportedError, match="save_adapter"):
        model.fit(x, x[:, :4], epochs=1, verbose=0, callbacks=[callback(tmp_path)])
    assert _files(tmp_path) == good


@pytest.mark.parametrize("load", [
    lambda m, outer, path: m.load_weights(path / "m.weights.h5"),
    lambda m, outer, path: keras.saving.load_weights(m, path / "m.weights.h5"),
    lambda m, outer, path: m.load_weights(path / "m.keras"),
    lambda m, outer, path: m.load_weights(path / "m.h5"),  # legacy HDF5
    lambda m, outer, path: outer.load_weights(path / "outer.weights.h5"),  # a model around the adapted one
    lambda m, outer, path: m.get_layer("inner").load_weights(path / "inner.weights.h5"),  # a part of it
    lambda m, outer, path: m.fit(np.zeros((2, 8)), np.zeros((2, 4)), epochs=1, verbose=0,
                                 callbacks=[keras.callbacks.BackupAndRestore(str(path))]),  # restores at train begin
], ids=["load_weights", "keras.saving.load_weights", "load_weights-keras", "load_weights-h5", "outer-load_weights",
        "part-load_weights", "BackupAndRestore"])
def test_loading_weights_into_a_merged_adapter_is_refused(load: Any, tmp_path: Path) -> None:
    """A load replaced the merged kernel (base + delta) with the file's base, and the next unmerge subtracted the
    delta from it: the base stayed 0.614 off, after ``unload`` too. Refused now before anything is read (the model
    unchanged); unmerged, the same load runs and the base is the file's, exactly."""
    from keras_helpers import assert_same_snapshot, snapshot

    keras.utils.set_random_seed(0)
    inputs = keras.Input((8,))
    inner = keras.Model(inputs, keras.layers.Dense(8, name="fc1")(inputs), name="inner")
    model = keras.Model(inputs, keras.layers.Dense(4, name="fc2")(inner(inputs)))
    outer = _around(model)
    x = np.sin(np.arange(24, dtype="float32")).reshape(3, 8)
    base = keras.ops.convert_to_numpy(model(x))
    model.save_weights(tmp_path / "m.weights.h5")
    model.save(tmp_path / "m.keras")
    keras.saving.save_model(model, tmp_path / "m.h5")
    outer.save_weights(tmp_path / "outer.weights.h5")
    inner.save_weights(tmp_path / "inner.weights.h5")
    model.save_weights(tmp_path / "latest.weights.h5")  # a BackupAndRestore backup
    adapterspec.inject_adapter(model, _LORA_FC1, trainable=False)  # (a merged trainable one: fit refuses first)
    model.compile(optimizer="sgd", loss="mse")
    adapted = keras.ops.convert_to_numpy(model(x))
    assert np.abs(adapted - base).max() > 0.1
    adapterspec.merge_adapters(model)
    before = snapshot(model)
    with pytest.raises(adapterspec.UnsupportedError, match=r"fc1.*merged.*'default'") as caught:
        load(model, outer, tmp_path)
    assert "unmerge_adapters" in caught.value.hint
    assert_same_snapshot(before, snapshot(model))
    adapterspec.unmerge_adapters(model)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(model(x)), adapted, atol=1e-6)
    if "fit" not in load.__code__.co_names and "m.h5" not in load.__code__.co_consts:  # (legacy HDF5 counts the
        load(model, outer, tmp_path)  # adapter's variables): unmerged, the load replaces the base alone
    adapterspec.unload(model)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(model(x)), base, atol=1e-6)


@pytest.mark.parametrize("config", [
    {**LORA, "modules_to_save": ["lm_head"]},  # the copy runs in lm_head's variables
    {**LORA, "init_lora_weights": "pissa"},  # the residual base is in the kernels
], ids=["modules_to_save", "pissa"])
def test_loading_weights_over_an_adapters_values_is_refused(config: dict[str, Any], checkpoints: Any,
                                                            token_ids: np.ndarray, tmp_path: Path) -> None:
    """Unmerged too, an adapter can keep values in the model's own variables: the copy of a module it saves whole
    (running in the module's variables) and PiSSA's residual base. A load overwrote them with the file's base while
    the adapter stayed listed (modules_to_save: logits 8.8 off the adapted model's, silently) and the delete gave
    back the weights from before the load. Refused now, before anything is read."""
    from keras_helpers import assert_same_snapshot, snapshot

    model = keras_model("llama", checkpoints["llama"])
    model.save_weights(tmp_path / "base.weights.h5")
    adapterspec.inject_adapter(model, config, trainable=False)
    adapted = keras_logits(model, token_ids)
    before = snapshot(model)
    with pytest.raises(adapterspec.UnsupportedError, match="values in its own weights") as caught:
        model.load_weights(tmp_path / "base.weights.h5")
    assert "delete the adapter first" in caught.value.hint
    assert_same_snapshot(before, snapshot(model))
    np.testing.assert_array_equal(keras_logits(model, token_ids), adapted)
    adapterspec.delete_adapter(model, "default")
    model.load_weights(tmp_path / "base.weights.h5")  # the adapter gone: the load runs


@pytest.mark.parametrize("mode", ["full", "list_of_layers"])
def test_a_rematerialized_adapted_layer_trains_as_without_remat(mode: str) -> None:
    """``keras.RematScope`` (Keras' gradient checkpointing; keras-hub models have no switch of their own): a layer
    made in the scope hands its ``call`` to ``jax.checkpoint``, which caches its trace by the function -- the patched
    ``call`` is one object, so ``fit`` on JAX reused a stale trace and never moved the adapter (silently), or raised
    an escaped tracer; with mode ``full`` the call context's traced ``training`` flag raised
    ``TracerBoolConversionError``. Now ``fit`` trains the adapter exactly as without the scope. (On TensorFlow, Keras'
    own remat fails on this model, with or without adapters: "custom_gradient ... keywords arguments only when eager
    execution is enabled".)"""
    if keras.backend.backend() == "tensorflow":
        pytest.skip("Keras' RematScope fails on a functional model on TensorFlow, without adapters too")

    def trained(remat: bool) -> tuple[list[np.ndarray], list[np.ndarray]]:
        keras.utils.set_random_seed(0)
        with keras.RematScope(mode=mode if remat else None, layer_names=["fc1"]):
            inputs = keras.Input((8,))
            hidden = keras.layers.Dense(16, activation="relu", name="fc1")(inputs)
            model = keras.Model(inputs, keras.layers.Dense(4, name="fc2")(hidden))
        adapterspec.inject_adapter(model, _LORA_FC1, trainable=True)
        model.compile(optimizer="sgd", loss="mse")
        before = [np.array(v) for v in model.trainable_variables]
        x = np.sin(np.arange(48, dtype="float32")).reshape(6, 8)
        model.fit(x, np.cos(x[:, :4]), epochs=2, batch_size=3, shuffle=False, verbose=0)
        return before, [np.array(v) for v in model.trainable_variables]

    plain_before, plain = trained(False)
    before, after = trained(True)
    assert all(np.array_equal(a, b) for a, b in zip(plain_before, before))
    assert max(float(np.abs(a - b).max()) for a, b in zip(plain, plain_before)) > 1e-3
    for got, want in zip(after, plain):
        np.testing.assert_allclose(got, want, atol=1e-6)


def test_copying_an_adapted_model_refuses_and_says_so(checkpoints: Any) -> None:
    """``copy.deepcopy`` and ``pickle`` go through Keras' saving (the copy would lose the adapter); the refusal names
    them, not the save calls it shares its guard with."""
    import copy
    import pickle

    model = keras_model("llama", checkpoints["llama"])
    adapterspec.inject_adapter(model, LORA)
    for operation in (copy.deepcopy, pickle.dumps):
        with pytest.raises(adapterspec.UnsupportedError, match="copy.deepcopy / pickle") as caught:
            operation(model)
        assert "load the adapter into it" in caught.value.hint


def test_a_weights_checkpoint_during_fit_refuses(checkpoints: Any, token_ids: np.ndarray, tmp_path: Path) -> None:
    """``ModelCheckpoint(save_weights_only=True)`` (and ``BackupAndRestore``, which saves the same way) wrote
    checkpoints without the trained adapter; adapterspec's ``AdapterCheckpoints`` is the callback that saves it."""
    model = _fit_model(checkpoints)
    callback = keras.callbacks.ModelCheckpoint(str(tmp_path / "w.weights.h5"), save_weights_only=True)
    with pytest.raises(adapterspec.UnsupportedError, match="AdapterCheckpoints|save_adapter"):
        model.fit(keras_inputs(token_ids), np.roll(token_ids, -1, axis=1), epochs=1, verbose=0, callbacks=[callback])


def _fit_model(checkpoints: Any) -> Any:
    from adapterspec_keras import training  # noqa: F401 - imported here: it imports keras

    model = keras_model("llama", checkpoints["llama"])
    keras.utils.set_random_seed(5)
    adapterspec.inject_adapter(model, {**LORA, "target_modules": ["q_proj", "v_proj", "down_proj"]})
    model.compile(optimizer=keras.optimizers.Adam(1e-2),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), jit_compile=False)
    return model


def _adapter(model: Any) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in adapterspec.extract_adapter(model).load_tensors("numpy").items()}


def test_fit_resume_ends_with_the_uninterrupted_adapter(checkpoints: Any, token_ids: np.ndarray,
                                                        tmp_path: Path) -> None:
    from adapterspec_keras.training import AdapterCheckpoints

    ids = np.concatenate([token_ids, token_ids[::-1]])
    x, y = keras_inputs(ids), np.roll(ids, -1, axis=1)
    whole = _fit_model(checkpoints)
    saver = AdapterCheckpoints(tmp_path / "run", keep=3, monitor="loss", mode="max")  # the worst: the first
    whole.fit(x, y, epochs=4, batch_size=2, shuffle=False, verbose=0, callbacks=[saver])
    assert saver.best_checkpoint == tmp_path / "run" / "checkpoint-2"
    assert [p.name for p in saver.checkpoints()] == ["checkpoint-2", "checkpoint-4", "checkpoint-6", "checkpoint-8"]
    files = sorted(p.name for p in (tmp_path / "run" / "checkpoint-8").iterdir())
    assert files == ["adapter_config.json", "adapter_model.safetensors", "optimizer.npz", "trainer_state.json"]
    assert not list((tmp_path / "run").glob(".*"))  # no staged folder left behind
    expected = _adapter(whole)
    saved = adapterspec.read_adapter(tmp_path / "run" / "checkpoint-8").load_tensors("numpy")
    assert sorted(saved) == sorted(expected) and all(np.array_equal(saved[k], v) for k, v in expected.items())

    resumed = _fit_model(checkpoints)  # a new process: same model, a fresh adapter, compiled
    resumed.optimizer.build(resumed.trainable_variables)
    variables = [id(v) for v in resumed.trainable_variables]
    epoch = AdapterCheckpoints(tmp_path / "run").resume(resumed, tmp_path / "run" / "checkpoint-4")
    assert epoch == 2 and [id(v) for v in resumed.trainable_variables] == variables
    halfway = _adapter(resumed)
    resumed.fit(x, y, epochs=4, initial_epoch=epoch, batch_size=2, shuffle=False, verbose=0)
    final = _adapter(resumed)
    assert sorted(final) == sorted(expected)
    for key, value in expected.items():
        assert np.abs(final[key] - value).max() <= 1e-6, key
    assert max(np.abs(v - halfway[k]).max() for k, v in expected.items()) > 1e-4


def test_resume_under_another_adapter_name_refuses(checkpoints: Any, token_ids: np.ndarray, tmp_path: Path) -> None:
    """The torch backend's test of the same name: a checkpoint of 'default' resumed into a model training 'sft' is
    refused before anything is restored (optimizer state included)."""
    from adapterspec_keras.training import AdapterCheckpoints

    x, y = keras_inputs(token_ids), np.roll(token_ids, -1, axis=1)
    _fit_model(checkpoints).fit(x, y, epochs=1, batch_size=2, shuffle=False, verbose=0,
                                callbacks=[AdapterCheckpoints(tmp_path / "run")])
    resumed = keras_model("llama", checkpoints["llama"])
    adapterspec.inject_adapter(resumed, {**LORA, "target_modules": ["q_proj", "v_proj", "down_proj"]}, "sft")
    resumed.compile(optimizer=keras.optimizers.Adam(1e-2),
                    loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), jit_compile=False)
    resumed.optimizer.build(resumed.trainable_variables)
    before = [np.array(v) for v in resumed.optimizer.variables + resumed.trainable_variables]
    with pytest.raises(adapterspec.AdapterNotFoundError, match=r"no adapter 'sft'.*\['default'\]"):
        AdapterCheckpoints(tmp_path / "run").resume(resumed)
    after = [np.array(v) for v in resumed.optimizer.variables + resumed.trainable_variables]
    assert all(np.array_equal(a, b) for a, b in zip(before, after))


def test_adapter_checkpoints_refuse_a_trainable_base(checkpoints: Any, token_ids: np.ndarray, tmp_path: Path) -> None:
    """freeze_base=False: the checkpoints would not hold the trained base, and a resume would restart it."""
    from adapterspec_keras.training import AdapterCheckpoints

    model = keras_model("llama", checkpoints["llama"])
    adapterspec.inject_adapter(model, LORA, freeze_base=False)
    model.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    base = np.array(model.backbone.token_embedding.embeddings)
    with pytest.raises(adapterspec.UnsupportedError, match="belongs to no adapter.*freeze_base=True"):
        model.fit(keras_inputs(token_ids), np.roll(token_ids, -1, axis=1), epochs=1, verbose=0,
                  callbacks=[AdapterCheckpoints(tmp_path / "run")])
    assert np.array_equal(base, np.array(model.backbone.token_embedding.embeddings))  # refused before training
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("where", "operation"), [
    ("task", lambda m, path: m.quantize("int8")),
    ("backbone", lambda m, path: m.quantize("int8")),  # a model around the adapted one
    ("task", lambda m, path: m.backbone.get_layer("transformer_layer_0")._self_attention_layer._query_dense
     .quantize("int8")),  # one adapted layer
    ("task", lambda m, path: m.export_to_transformers(str(path / "hf"))),
    ("backbone", lambda m, path: m.backbone.export_to_transformers(str(path / "hf"))),
    ("task", lambda m, path: m.backbone.enable_lora(2)),
    ("task", lambda m, path: m.backbone.load_lora_weights(str(path / "x.lora.h5"))),
], ids=["quantize", "quantize-around", "quantize-layer", "export_to_transformers", "backbone-export",
        "enable_lora", "load_lora_weights"])
def test_whole_model_operations_refuse_while_adapters_are_in(checkpoints: Any, token_ids: np.ndarray,
                                                             tmp_path: Path, where: str, operation: Any) -> None:
    """quantize replaced the adapted layers' kernels and dropped the adapter (0.27 off, ``active_adapters``
    unchanged); export_to_transformers wrote the base alone; keras-hub's own LoRA numbered layers the adapters
    shift. Each refuses, typed, before it changes anything; with the adapter gone, each runs again."""
    from keras_helpers import assert_same_snapshot, snapshot

    model = keras_model("llama", checkpoints["llama"])
    holder = model if where == "task" else model.backbone
    adapterspec.inject_adapter(holder, {**LORA, "init_lora_weights": False})
    adapted = keras_logits(model, token_ids)
    before = snapshot(model)
    with pytest.raises(adapterspec.UnsupportedError, match="adapterspec adapters"):
        operation(model, tmp_path)
    assert_same_snapshot(before, snapshot(model))
    assert not [layer for layer in model._flatten_layers() if getattr(layer, "quantization_mode", None)]
    assert not (tmp_path / "hf").exists()
    np.testing.assert_array_equal(keras_logits(model, token_ids), adapted)
    adapterspec.delete_adapter(holder, "default")
    if "load_lora_weights" not in operation.__code__.co_names:  # (no keras-hub LoRA file to load)
        operation(model, tmp_path)  # Keras' own operation is back with the last adapter gone


def test_half_precision_base_keeps_the_adapter_in_float32(checkpoints: Any, token_ids: np.ndarray,
                                                          tmp_path: Path) -> None:
    """SPEC.md 7.5 as in the torch backend: float32 adapter variables on a bfloat16 keras-hub model, the LoRA part
    computed in float32, the file's float16 values saved back bit for bit; ``dtype=`` still decides."""
    import keras_hub
    from safetensors.numpy import load_file, save_file

    reference = hf_model(checkpoints["llama"])
    adapterspec.inject_adapter(reference, LORA)
    for i, p in enumerate(q for q in reference.parameters() if q.requires_grad):
        p.data.copy_(p.data.new_tensor(0.05 * np.sin(np.arange(p.numel()) * 0.7 + i).reshape(tuple(p.shape))))
    adapterspec.save_adapter(reference, tmp_path / "a")
    file = tmp_path / "a" / "adapter_model.safetensors"
    save_file({k: v.astype(np.float16) for k, v in load_file(file).items()}, str(file), metadata={"format": "pt"})

    def half() -> Any:
        return keras_hub.models.Llama3CausalLM.from_preset(str(checkpoints["llama"]), preprocessor=None,
                                                           dtype="bfloat16")

    model = half()
    adapterspec.load_adapter(model, tmp_path / "a")
    variables = [v for v in model.variables if "adapterspec_" in v.path]
    assert variables and {v.dtype for v in variables} == {"float32"}
    full = keras_model("llama", checkpoints["llama"])
    adapterspec.load_adapter(full, tmp_path / "a")
    got, want = keras_logits(model, token_ids), keras_logits(full, token_ids)
    assert np.abs(got.astype(np.float32) - want).max() < 0.1  # a bfloat16 model's rounding, not a wrong adapter
    adapterspec.save_adapter(model, tmp_path / "again")
    stored, saved = load_file(file), load_file(tmp_path / "again" / "adapter_model.safetensors")
    assert sorted(saved) == sorted(stored)
    assert all(saved[k].dtype == np.float16 and np.array_equal(saved[k], v) for k, v in stored.items())
    pinned = half()
    adapterspec.load_adapter(pinned, tmp_path / "a", dtype="bfloat16")
    assert {v.dtype for v in pinned.variables if "adapterspec_" in v.path} == {"bfloat16"}


def _bf16(values: np.ndarray, half: str = "bfloat16") -> np.ndarray:
    """``values`` rounded to ``half`` (to nearest even), back as float32."""
    import ml_dtypes

    kind = ml_dtypes.bfloat16 if half == "bfloat16" else np.float16
    return np.asarray(values, dtype=np.float32).astype(kind).astype(np.float32)


def _half_llama(checkpoints: Any, dtype: str) -> Any:
    import keras_hub

    return keras_hub.models.Llama3CausalLM.from_preset(str(checkpoints["llama"]), preprocessor=None, dtype=dtype)


def _half_peft(checkpoints: Any, folder: Path, half: str = "bfloat16") -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(checkpoints["llama"], dtype=getattr(torch, half)).eval()
    return peft.PeftModel.from_pretrained(base, str(folder)).eval()


def _float_logits(model: Any, ids: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(input_ids=torch.from_numpy(np.asarray(ids, dtype=np.int64))).logits.float().numpy()


def _logits_within_bf16_rounding(model: Any, reference: Any, base_gap: float, token_ids: np.ndarray,
                                 half: str = "bfloat16") -> None:
    """The Keras model's logits are the PEFT model's up to what the two frameworks' half-precision kernels differ
    by without any adapter (``base_gap``), plus a few roundings of the logits' size for the adapter's part."""
    got, want = keras_logits(model, token_ids).astype(np.float32), _float_logits(reference, token_ids)
    step = 2.0 ** (-8 if half == "bfloat16" else -11) * float(np.abs(want).max())  # one rounding at that size
    assert np.abs(got - want).max() <= base_gap + 4 * step


def _base_gap(checkpoints: Any, token_ids: np.ndarray, half: str = "bfloat16") -> float:
    import torch
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(checkpoints["llama"], dtype=getattr(torch, half)).eval()
    gap = np.abs(keras_logits(_half_llama(checkpoints, half), token_ids).astype(np.float32)
                 - _float_logits(hf, token_ids)).max()
    return float(gap)


@pytest.mark.parametrize("half", ["bfloat16", "float16"])
def test_half_precision_ia3_is_float32_and_scales_as_peft(half: str, checkpoints: Any, token_ids: np.ndarray,
                                                          tmp_path: Path) -> None:
    """SPEC.md 7.5 for IA3 on a bfloat16/float16 keras-hub model: float32 vectors holding the file's values exactly,
    each product taken in float32 and rounded once to the base's dtype (PEFT's ``(result * ia3_l).to(result_dtype)``, checked on
    PEFT's layer too), merged the same way, PEFT's logits, and the file's values saved back."""
    from keras import ops
    from keras_helpers import make_peft_adapter

    config = peft.IA3Config(task_type="CAUSAL_LM", target_modules=["v_proj", "down_proj"],
                            feedforward_modules=["down_proj"])
    make_peft_adapter(checkpoints["llama"], tmp_path / "ia3", config, salt=3)
    stored = adapterspec.read_adapter(tmp_path / "ia3").load_tensors("numpy")
    assert all(v.dtype == np.float32 and not np.array_equal(_bf16(v, half), v) for v in stored.values())
    reference = _half_peft(checkpoints, tmp_path / "ia3", half)
    model = _half_llama(checkpoints, half)
    adapterspec.load_adapter(model, tmp_path / "ia3")
    assert {v.dtype for v in model.variables if "adapterspec_" in v.path} == {"float32"}

    attention = model.backbone.transformer_layers[0]._self_attention_layer
    x = ops.cast(ops.convert_to_tensor(np.sin(np.arange(2 * 5 * 64) * 0.37).reshape(2, 5, 64)), half)
    scaled = ops.convert_to_numpy(ops.cast(attention._value_dense(x), "float32"))
    with adapterspec.disabled_adapters(model):
        plain = ops.convert_to_numpy(ops.cast(attention._value_dense(x), "float32"))
    vector = stored["base_model.model.model.layers.0.self_attn.v_proj.ia3_l"].reshape(2, 16)  # [heads, head_dim]
    np.testing.assert_array_equal(scaled, _bf16(plain * vector, half))
    assert not np.array_equal(scaled, _bf16(plain * _bf16(vector, half), half))  # rounding the vector first is another result

    import torch

    v_proj = reference.base_model.model.model.layers[0].self_attn.v_proj
    tx = torch.from_numpy(np.sin(np.arange(2 * 5 * 64) * 0.37).reshape(2, 5, 64).astype(np.float32)).to(getattr(torch, half))
    with torch.no_grad():
        peft_scaled = v_proj(tx).float().numpy()
        peft_plain = v_proj.base_layer(tx).float().numpy()
    np.testing.assert_array_equal(peft_scaled, _bf16(peft_plain * vector.reshape(-1), half))

    _logits_within_bf16_rounding(model, reference, _base_gap(checkpoints, token_ids, half), token_ids, half)
    adapterspec.save_adapter(model, tmp_path / "again")
    saved = adapterspec.read_adapter(tmp_path / "again").load_tensors("numpy")
    assert sorted(saved) == sorted(stored) and all(np.array_equal(saved[k], v) for k, v in stored.items())

    kernel = attention._value_dense.kernel
    before = ops.convert_to_numpy(ops.cast(kernel, "float32"))
    adapterspec.merge_adapters(model)
    merged = ops.convert_to_numpy(ops.cast(kernel, "float32"))
    np.testing.assert_array_equal(merged, _bf16(before * vector[None], half))


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("method", ["PROMPT_TUNING", "PREFIX_TUNING"])
def test_half_precision_prompt_embeddings_stay_float32(method: str, checkpoints: Any, token_ids: np.ndarray,
                                                       tmp_path: Path) -> None:
    """SPEC.md 7.5: on a bfloat16 keras-hub model the prompt/prefix embedding is a float32 variable holding the
    file's values exactly (PEFT's prompt encoder is float32, cast to the base's dtype where used): PEFT's logits
    on the same bfloat16 base, the values saved back exactly (float32) and bit for bit (a float16 file)."""
    import torch
    from keras_helpers import unique_values
    from safetensors.numpy import load_file, save_file

    kind = peft.PromptTuningConfig if method == "PROMPT_TUNING" else peft.PrefixTuningConfig
    pm = peft.get_peft_model(hf_model(checkpoints["llama"]), kind(task_type="CAUSAL_LM", num_virtual_tokens=3))
    with torch.no_grad():
        weight = pm.prompt_encoder["default"].embedding.weight
        weight.copy_(torch.from_numpy(unique_values(tuple(weight.shape), 5, scale=1.0)))
    pm.save_pretrained(tmp_path / "p")
    stored = adapterspec.read_adapter(tmp_path / "p").load_tensors("numpy")
    assert not np.array_equal(_bf16(stored["prompt_embeddings"]), stored["prompt_embeddings"])

    model = _half_llama(checkpoints, "bfloat16")
    adapterspec.load_adapter(model, tmp_path / "p")
    assert {v.dtype for v in model.variables if "adapterspec_" in v.path} == {"float32"}
    reference = _half_peft(checkpoints, tmp_path / "p")
    assert reference.prompt_encoder["default"].embedding.weight.dtype == torch.float32
    want = _float_logits(reference, token_ids)
    if method == "PROMPT_TUNING":
        want = want[:, 3:]
    got = keras_logits(model, token_ids).astype(np.float32)
    step = 2.0 ** -8 * float(np.abs(want).max())
    assert np.abs(got - want).max() <= _base_gap(checkpoints, token_ids) + 4 * step
    adapterspec.save_adapter(model, tmp_path / "again")
    saved = adapterspec.read_adapter(tmp_path / "again").load_tensors("numpy")
    assert sorted(saved) == ["prompt_embeddings"]
    assert saved["prompt_embeddings"].dtype == np.float32
    np.testing.assert_array_equal(saved["prompt_embeddings"], stored["prompt_embeddings"])

    file = tmp_path / "p" / "adapter_model.safetensors"
    save_file({k: v.astype(np.float16) for k, v in load_file(file).items()}, str(file), metadata={"format": "pt"})
    fp16 = _half_llama(checkpoints, "bfloat16")
    adapterspec.load_adapter(fp16, tmp_path / "p")
    adapterspec.save_adapter(fp16, tmp_path / "fp16")
    again = load_file(tmp_path / "fp16" / "adapter_model.safetensors")["prompt_embeddings"]
    assert again.dtype == np.float16 and np.array_equal(again, load_file(file)["prompt_embeddings"])


def test_half_precision_lora_part_is_computed_in_float32(checkpoints: Any, tmp_path: Path) -> None:
    """On every Keras backend (TensorFlow names a dtype ``<dtype: 'bfloat16'>``) a float32 LoRA on a bfloat16
    layer adds ``x @ A @ B * scaling`` in float32 and rounds once: PEFT's order, within one bfloat16 step of a
    float64 reference and mostly equal to it (a bfloat16 computation misses by several steps)."""
    from keras import ops
    from keras_helpers import make_peft_adapter

    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["v_proj"])
    make_peft_adapter(checkpoints["llama"], tmp_path / "lora", config, salt=9)
    stored = adapterspec.read_adapter(tmp_path / "lora").load_tensors("numpy")
    model = _half_llama(checkpoints, "bfloat16")
    adapterspec.load_adapter(model, tmp_path / "lora")
    dense = model.backbone.transformer_layers[0]._self_attention_layer._value_dense
    inputs = np.sin(np.arange(2 * 5 * 64) * 0.37).reshape(2, 5, 64)
    x = ops.cast(ops.convert_to_tensor(inputs), "bfloat16")
    got = ops.convert_to_numpy(ops.cast(dense(x), "float32")).reshape(2, 5, 32)
    with adapterspec.disabled_adapters(model):
        plain = ops.convert_to_numpy(ops.cast(dense(x), "float32")).reshape(2, 5, 32).astype(np.float64)
    prefix = "base_model.model.model.layers.0.self_attn.v_proj."
    a, b = stored[prefix + "lora_A.weight"].astype(np.float64), stored[prefix + "lora_B.weight"].astype(np.float64)
    exact = plain + _bf16(inputs) @ a.T @ b.T * 2.0
    step = 2.0 ** (np.floor(np.log2(np.abs(exact) + 1e-30)) - 7)  # one bfloat16 step at each value
    assert np.all(np.abs(got - exact) <= step)
    assert np.mean(got == _bf16(exact)) >= 0.95


@pytest.mark.parametrize("config", [
    pytest.param(LORA, id="lora"),
    pytest.param({"peft_type": "IA3", "target_modules": ["v_proj", "down_proj"], "feedforward_modules": ["down_proj"]},
                 id="ia3"),
])
def test_a_merged_adapter_records_the_base_fingerprint(config: dict[str, Any], checkpoints: Any,
                                                       tmp_path: Path) -> None:
    """SPEC.md 9.1: the fingerprint describes the base weights, so an adapter saved while merged records the
    samples taken before the merge (the kernels now hold the deltas): the unmerged save's fingerprint, which the
    base loads strictly; after ``unload(merge=True)`` the merged kernels are the base a new adapter records."""
    from adapterspec.identity import FINGERPRINT_KEY

    model = keras_model("llama", checkpoints["llama"])
    adapterspec.inject_adapter(model, config)
    for i, v in enumerate(model.trainable_variables):
        v.assign(1.0 + 0.3 * np.sin(np.arange(np.prod(v.shape)) * 0.7 + i).reshape(v.shape))
    adapterspec.save_adapter(model, tmp_path / "unmerged")
    adapterspec.merge_adapters(model)
    adapterspec.save_adapter(model, tmp_path / "merged")
    unmerged = adapterspec.read_adapter(tmp_path / "unmerged").metadata[FINGERPRINT_KEY]
    assert adapterspec.read_adapter(tmp_path / "merged").metadata.get(FINGERPRINT_KEY) == unmerged
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        adapterspec.load_adapter(keras_model("llama", checkpoints["llama"]), tmp_path / "merged", strict=True)
    adapterspec.unload(model, merge=True)
    adapterspec.inject_adapter(model, config, "next")
    adapterspec.save_adapter(model, tmp_path / "next", "next")
    assert adapterspec.read_adapter(tmp_path / "next").metadata[FINGERPRINT_KEY] not in (None, unmerged)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize(("arch", "method"), [("llama", "PREFIX_TUNING"), ("gpt2", "PROMPT_TUNING")])
def test_prompt_learning_fingerprints_the_input_embedding_as_torch(arch: str, method: str, checkpoints: Any,
                                                                    tmp_path: Path) -> None:
    """SPEC.md 9.1: for prefix and prompt tuning the fingerprint is the input embedding's; Keras and torch agree,
    and a changed embedding is refused strictly."""
    config = {"peft_type": method, "task_type": "CAUSAL_LM", "num_virtual_tokens": 3}
    _save_from_keras_and_torch(arch, config, checkpoints, tmp_path)
    assert _fingerprint_of(tmp_path / "keras") == _fingerprint_of(tmp_path / "torch")
    other = keras_model(arch, checkpoints[arch])
    table = other.backbone.token_embedding.embeddings
    changed = np.asarray(table.numpy()).copy()
    changed[0, 0] += 1.0  # the first sampled element
    table.assign(changed)
    with pytest.raises(adapterspec.BaseModelMismatchError):
        adapterspec.load_adapter(other, tmp_path / "torch", strict=True)


def test_half_precision_lora_merge_adds_a_float32_delta_as_peft(checkpoints: Any, tmp_path: Path) -> None:
    """SPEC.md 7.3/7.5: merging a float32 LoRA into a bfloat16 kernel adds the float32 delta and rounds once, as
    PEFT's merge does on the same bfloat16 base (the two sum ``r`` products in their own order: at most one
    bfloat16 step apart, almost everywhere equal); unmerging gives the kernel back within that rounding."""
    import torch
    from keras import ops
    from keras_helpers import make_peft_adapter

    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["v_proj"])
    make_peft_adapter(checkpoints["llama"], tmp_path / "lora", config, salt=9)
    reference = _half_peft(checkpoints, tmp_path / "lora")
    model = _half_llama(checkpoints, "bfloat16")
    adapterspec.load_adapter(model, tmp_path / "lora")
    kernel = model.backbone.transformer_layers[0]._self_attention_layer._value_dense.kernel
    before = ops.convert_to_numpy(ops.cast(kernel, "float32")).reshape(64, 32).T
    assert np.array_equal(before, reference.base_model.model.model.layers[0].self_attn.v_proj.weight.float().numpy())
    adapterspec.merge_adapters(model)
    with torch.no_grad():
        reference.merge_adapter()
    got = ops.convert_to_numpy(ops.cast(kernel, "float32")).reshape(64, 32).T
    want = reference.base_model.model.model.layers[0].self_attn.v_proj.base_layer.weight.float().numpy()
    step = 2.0 ** (np.floor(np.log2(np.abs(want) + 1e-30)) - 7)
    assert np.all(np.abs(got - want) <= step) and np.mean(got == want) >= 0.99
    assert not np.array_equal(got, before)


def test_unmerge_that_rounds_differently_keeps_the_base_fingerprint(checkpoints: Any, tmp_path: Path) -> None:
    """As on torch: merging a float32 LoRA into a bfloat16 kernel and subtracting it again leaves some elements one
    bfloat16 step from the base; the fingerprint still describes the base (a strict load of the save does not
    warn), until a sampled element is changed for real."""
    from adapterspec.identity import FINGERPRINT_KEY
    from keras import ops
    from keras_helpers import make_peft_adapter

    make_peft_adapter(checkpoints["llama"], tmp_path / "lora", peft.LoraConfig(r=4, lora_alpha=8,
                                                                               target_modules=["v_proj"]), salt=9)
    model = _half_llama(checkpoints, "bfloat16")
    adapterspec.load_adapter(model, tmp_path / "lora")
    kernel = model.backbone.transformer_layers[0]._self_attention_layer._value_dense.kernel
    before = ops.convert_to_numpy(ops.cast(kernel, "float32"))
    adapterspec.save_adapter(model, tmp_path / "before")
    adapterspec.merge_adapters(model)
    adapterspec.unmerge_adapters(model)
    assert not np.array_equal(ops.convert_to_numpy(ops.cast(kernel, "float32")), before)  # rounded differently
    adapterspec.save_adapter(model, tmp_path / "after")
    recorded = adapterspec.read_adapter(tmp_path / "before").metadata[FINGERPRINT_KEY]
    assert adapterspec.read_adapter(tmp_path / "after").metadata[FINGERPRINT_KEY] == recorded  # was: another
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        adapterspec.load_adapter(_half_llama(checkpoints, "bfloat16"), tmp_path / "after", strict=True)
    kernel.assign(ops.cast(ops.convert_to_tensor(before + 1.0), kernel.dtype))  # every element, the sampled ones too
    adapterspec.save_adapter(model, tmp_path / "changed")
    assert adapterspec.read_adapter(tmp_path / "changed").metadata[FINGERPRINT_KEY] != recorded


def test_freezing_one_adapted_layer_refuses_to_train_freezing_all_is_allowed(checkpoints: Any,
                                                                            token_ids: np.ndarray) -> None:
    """One adapter's trainable tensors are shared variables across its layers: ``layer.trainable = False`` on one
    adapted layer froze every layer's rows (on the layer tracking them) or none; training then refuses, typed.
    The whole model frozen is consistent: ``fit`` runs and nothing moves."""
    x, y = keras_inputs(token_ids), np.roll(token_ids, -1, axis=1)
    for freeze in ("one", "all"):
        model = _fit_model(checkpoints)
        before = _adapter(model)
        attention = model.backbone.get_layer("transformer_layer_1")._self_attention_layer
        if freeze == "one":
            attention._value_dense.trainable = False
            with pytest.raises(adapterspec.UnsupportedError, match="value"):
                model.fit(x, y, epochs=1, verbose=0)
        else:
            model.trainable = False
            model.compile(optimizer=keras.optimizers.SGD(0.5),
                          loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
            model.fit(x, y, epochs=1, verbose=0)
        after = _adapter(model)
        assert all(np.array_equal(after[k], v) for k, v in before.items())
