"""The Keras backend on Keras' JAX and torch backends (issue #16): a representative subset of tests/keras, run by
pytest in a subprocess per backend (Keras picks its backend once, at import, from ``KERAS_BACKEND``).

The subset covers each direction and family once: a PEFT folder in Keras (LoRA with DoRA, IA3 on GPT-2's
fused ``c_attn``, a merged LoRA), an adapter made in Keras loaded by PEFT, the torch -> Keras -> torch round
trip, LoHa trained with ``fit`` and loaded by PEFT, modules saved whole switched and merged, several adapters
merged / unmerged / deleted, the base fingerprint agreeing with torch's (merged too), P-tuning, and two keras-hub
converters of the matrix, Swin's fused q/k/v, MoE experts, the TRAINABLE_TOKENS method and LN tuning. Whole
files run on either backend too (``KERAS_BACKEND=jax pytest tests/keras/test_peft_to_keras.py ...``), but not all
of them pass there: some tests read results with TensorFlow's own API (``tf.GradientTape``, ``np.asarray`` of a
torch tensor that requires grad) -- on torch, 408 of 435 tests of 17 files passed, every failure in the test code.
This module keeps CI to a few minutes.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

import adapterspec

REPO = Path(adapterspec.__file__).resolve().parents[2]

#: One test of each kind, among the fastest on JAX (which compiles each new shape: tests/keras/test_keras_to_peft's
#: ``fit`` test alone takes 86 s there, on 2 cores).
SUBSET = [
    "tests/keras/test_peft_to_keras.py::test_peft_adapter_gives_peft_logits_in_keras[llama-dora]",
    "tests/keras/test_peft_to_keras.py::test_peft_adapter_gives_peft_logits_in_keras[gpt2-ia3]",
    "tests/keras/test_peft_to_keras.py::test_merged_adapter_gives_peft_logits",
    "tests/keras/test_keras_to_peft.py::test_adapter_made_in_keras_gives_keras_logits_in_peft[gpt2-lora]",
    "tests/keras/test_roundtrip.py::test_torch_keras_torch_round_trip_is_exact[gpt2-lora-fused-qkv]",
    "tests/keras/test_lycoris.py::test_fit_trains_only_the_lycoris_factors_and_peft_loads_the_result[LOHA]",
    "tests/keras/test_modules_to_save.py::test_modules_to_save_switch_and_merge_like_peft",
    "tests/keras/test_multi_adapter.py::test_merge_unmerge_and_delete_restore_the_model",
    "tests/keras/test_multi_adapter.py::test_only_the_active_adapters_train",  # JAX: zero gradients of unused ones
    "tests/keras/test_training.py::test_keras_and_torch_fingerprint_the_same_base_alike[llama]",
    "tests/keras/test_training.py::test_a_merged_adapter_records_the_base_fingerprint[lora]",
    "tests/keras/test_prompt_tuning_keras.py::test_peft_p_tuning_gives_peft_logits_and_round_trips[llama-MLP]",
    # keras-hub converters (issue #16): a decoder and an encoder of the matrix, a kernel the converter fuses
    # (Swin q/k/v by column range), MoE experts (target_parameters), the TRAINABLE_TOKENS method, LN tuning
    "tests/keras/test_converter_matrix.py::test_peft_lora_on_every_linear_layer_matches_peft[qwen3]",
    "tests/keras/test_converter_matrix.py::test_peft_lora_on_every_linear_layer_matches_peft[bert]",
    "tests/keras/test_fused_kernels.py::test_peft_adapter_on_fused_modules_matches_peft_both_ways[lora-every-linear]",
    "tests/keras/test_target_parameters.py::test_load_runs_peft_unmerged[mixtral]",
    "tests/keras/test_trainable_tokens_method.py::test_peft_folder_roundtrip[gemma-tied]",
    "tests/keras/test_ln_tuning.py::test_peft_folder_roundtrip[qwen2-default-targets]",
    # PiSSA's residual written into the kernels and given back on delete (SPEC 8.1)
    "tests/keras/test_lora_init.py::test_peft_adapter_gives_peft_logits_and_delete_gives_the_base_back[llama-pissa]",
    # a save reads the variables without a copy where the backend keeps a snapshot (torch's CPU tensors: copied)
    "tests/keras/test_devices.py::test_saved_tensors_keep_their_values_when_the_variables_change_after[groups]",
    # torch's meta device refused; the adapters on their kernel's device (torch: a torch.device)
    "tests/keras/test_devices.py::test_meta_device_is_refused_on_every_backend",
    "tests/keras/test_devices.py::test_adapters_go_to_their_kernels_device_by_default",
    "tests/keras/test_multi_adapter.py::test_deleting_the_only_active_adapter_activates_the_first_left_as_peft",
    "tests/keras/test_multi_adapter.py::test_training_a_merged_adapter_is_refused",
    # a refused save leaves the file there byte for byte; a load into a merged adapter refused before it reads
    "tests/keras/test_training.py::test_a_refused_save_leaves_the_existing_file_as_it_was[save_weights]",
    "tests/keras/test_training.py::test_a_refused_checkpoint_during_fit_keeps_the_last_good_one[BackupAndRestore]",
    "tests/keras/test_training.py::test_loading_weights_into_a_merged_adapter_is_refused[load_weights]",
    # keras.RematScope: an adapted layer rematerialized trains as without (JAX cached the patched call's trace)
    "tests/keras/test_training.py::test_a_rematerialized_adapted_layer_trains_as_without_remat[full]",
    "tests/keras/test_training.py::test_a_rematerialized_adapted_layer_trains_as_without_remat[list_of_layers]",
]

#: Keras imported with the requested backend before pytest runs: the run cannot silently fall back to TensorFlow.
RUNNER = """
import sys
import keras
import pytest
assert keras.backend.backend() == sys.argv[1], (keras.backend.backend(), sys.argv[1])
sys.exit(pytest.main(["-q", "-p", "no:cacheprovider", "--junitxml", sys.argv[2], *sys.argv[3:]]))
"""


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_representative_subset_passes_on_keras_backend(backend: str, tmp_path: Path) -> None:
    if importlib.util.find_spec(backend) is None:
        pytest.skip(f"{backend} is not installed")
    report = tmp_path / "report.xml"
    env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3",
           "PYTHONPATH": os.pathsep.join([str(REPO / "sdk"), str(REPO / "plugins")])}
    proc = subprocess.run([sys.executable, "-c", RUNNER, backend, str(report), *SUBSET], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    suite = ET.parse(report).getroot()
    suite = suite if suite.tag == "testsuite" else suite[0]
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    assert counts == {"tests": len(SUBSET), "failures": 0, "errors": 0, "skipped": 0}, counts
