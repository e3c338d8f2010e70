"""Train a LoRA in PyTorch with PEFT, validate it, load it into Keras -- and get the same logits.

    .venv/bin/python examples/demo_torch_to_keras.py        (or: make demo)

1. a tiny random Llama (transformers), saved as a local Hugging Face folder (config.json + model.safetensors);
2. a LoRA trained on it for a few steps with PEFT, saved with PEFT's ``save_pretrained``;
3. ``adapterspec validate`` on the adapter folder;
4. the same Hugging Face folder converted by keras-hub (``Llama3CausalLM.from_preset``), the PEFT adapter
   loaded with ``adapterspec.load_adapter``, and the logits of both frameworks compared;
5. the way back: the adapter saved from Keras with ``adapterspec.save_adapter`` and loaded by PEFT.

Nothing is downloaded; it runs in well under two minutes on a laptop CPU.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
warnings.filterwarnings("ignore")

STEPS = 30


def step(number: int, text: str) -> None:
    print(f"\n[{number}] {text}", flush=True)


def make_base(folder: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, max_position_embeddings=64, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    print(f"    tiny random Llama saved to {folder}: {sorted(p.name for p in folder.iterdir())}")


def train_lora(base: Path, out: Path, ids: object) -> object:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM",
                                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                      "gate_proj", "up_proj", "down_proj"]))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = torch.as_tensor(ids)
    model.train()
    for i in range(STEPS):
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if i in (0, STEPS - 1):
            print(f"    step {i + 1:>2}/{STEPS}: loss {loss.item():.4f}")
    model.eval()
    model.save_pretrained(out)
    print(f"    PEFT saved the adapter to {out}: {sorted(p.name for p in out.iterdir())}")
    return model


def validate(folder: Path) -> None:
    cli = Path(sys.executable).with_name("adapterspec")
    command = [str(cli)] if cli.exists() else [sys.executable, "-m", "adapterspec.cli"]
    result = subprocess.run([*command, "validate", str(folder)], capture_output=True, text=True)
    print("    $ adapterspec validate " + folder.name)
    for line in (result.stdout + result.stderr).strip().splitlines():
        print("    " + line)
    if result.returncode != 0:
        sys.exit(f"adapterspec validate failed ({result.returncode})")


def main() -> int:
    started = time.perf_counter()
    import numpy as np
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    root = Path(tempfile.mkdtemp(prefix="adapterspec-demo-"))
    base, adapter, back = root / "hf-llama", root / "peft-lora", root / "keras-lora"
    ids = (np.arange(4 * 16).reshape(4, 16) * 7 + 3) % 128
    try:
        step(1, "A tiny random Llama, saved as a Hugging Face folder")
        make_base(base)

        step(2, f"Train a LoRA with PEFT in PyTorch ({STEPS} steps), save it with PEFT")
        peft_model = train_lora(base, adapter, ids)
        with torch.no_grad():
            torch_logits = peft_model(input_ids=torch.as_tensor(ids)).logits.numpy()

        step(3, "Validate the adapter folder against the spec")
        validate(adapter)

        step(4, "Load the same Hugging Face folder into keras-hub, then the PEFT adapter into Keras")
        import keras
        import keras_hub
        from keras import ops

        import adapterspec

        keras_model = keras_hub.models.Llama3CausalLM.from_preset(str(base), preprocessor=None)
        inputs = {"token_ids": ids.astype("int32"), "padding_mask": np.ones_like(ids, dtype="int32")}
        keras_base = ops.convert_to_numpy(keras_model(inputs))
        modules = adapterspec.load_adapter(keras_model, adapter)
        keras_logits = ops.convert_to_numpy(keras_model(inputs))
        print(f"    {type(keras_model).__name__} ({keras.backend.backend()} backend): LoRA loaded into "
              f"{len(modules)} modules, e.g. {modules[0]}")
        gap = float(np.abs(torch_logits - keras_logits).max())
        effect = float(np.abs(torch_logits - keras_base).max())
        print(f"    what the adapter changes in the logits:   {effect:.4f}")
        print(f"    max |logits_torch - logits_keras|:        {gap:.2e}   {'OK' if gap <= 1e-5 else 'MISMATCH'}")

        step(5, "And back: save the adapter from Keras, load it in PEFT")
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        adapterspec.save_adapter(keras_model, back)
        reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), back).eval()
        with torch.no_grad():
            again = reloaded(input_ids=torch.as_tensor(ids)).logits.numpy()
        back_gap = float(np.abs(again - keras_logits).max())
        print(f"    max |logits_keras - logits_peft(reloaded)|: {back_gap:.2e}   {'OK' if back_gap <= 1e-5 else 'MISMATCH'}")
        print(f"\ndone in {time.perf_counter() - started:.0f} s")
        return 0 if gap <= 1e-5 and back_gap <= 1e-5 else 1
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
