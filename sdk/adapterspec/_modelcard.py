"""The model card (``README.md``) that :func:`adapterspec.hub.push_to_hub` writes next to the adapters.

Its YAML front matter is what the Hub indexes: ``library_name: peft`` (the folder is PEFT's format,
so the Hub shows PEFT's loading snippet and lists the repo as an adapter of its base model),
``base_model``, ``pipeline_tag`` and the tags ``adapterspec``, ``peft`` and the method (``lora``,
``dora``, ``rslora``, ``ia3``, ...). The body says what the adapter is (method, ranks, targets,
size) and how to load it with adapterspec and with PEFT.

>>> card = build_model_card({"default": read_adapter("my-lora")}, "org/my-lora")   # doctest: +SKIP
>>> card.data.library_name                                                          # doctest: +SKIP
'peft'
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .naming import parse_key

if TYPE_CHECKING:
    from huggingface_hub import ModelCard

    from .adapter import Adapter

__all__ = ["build_model_card", "card_tags"]

_TASKS = {"CAUSAL_LM": "text-generation", "SEQ_2_SEQ_LM": "text2text-generation", "SEQ_CLS": "text-classification",
          "TOKEN_CLS": "token-classification", "QUESTION_ANS": "question-answering",
          "FEATURE_EXTRACTION": "feature-extraction"}
#: The 🤗 Transformers class PEFT's wrapper of each task type loads the base with (the card's loading example).
_AUTO_CLASSES = {"CAUSAL_LM": "AutoModelForCausalLM", "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
                 "SEQ_CLS": "AutoModelForSequenceClassification", "TOKEN_CLS": "AutoModelForTokenClassification",
                 "QUESTION_ANS": "AutoModelForQuestionAnswering", "FEATURE_EXTRACTION": "AutoModel"}
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$|^[A-Za-z0-9][A-Za-z0-9._-]*$")
_DEFAULT = "default"


def _base_model(adapter: Adapter) -> str | None:
    """The base model's Hub id, if the config names one (a local path is not an id)."""
    base = adapter.config.get("base_model_name_or_path")
    if not isinstance(base, str) or not _REPO_ID.match(base) or base.startswith(".") or "--" in base:
        return None
    return base


def card_tags(adapters: Mapping[str, Adapter]) -> list[str]:
    """The Hub tags for these adapters: ``adapterspec``, ``peft``, the methods and their variants.

    >>> from adapterspec import Adapter
    >>> import numpy as np
    >>> a = Adapter.from_tensors({"peft_type": "LORA", "target_modules": ["q"], "r": 2, "use_dora": True},
    ...     {"base_model.model.l.q.lora_A.weight": np.zeros((2, 4), np.float32),
    ...      "base_model.model.l.q.lora_B.weight": np.zeros((4, 2), np.float32),
    ...      "base_model.model.l.q.lora_magnitude_vector": np.zeros((4,), np.float32)})
    >>> card_tags({"default": a})
    ['adapterspec', 'peft', 'lora', 'dora']
    """
    tags = ["adapterspec", "peft"]
    for adapter in adapters.values():
        cfg = adapter.config
        tags.append(cfg.peft_type.lower().replace("_", "-"))
        tags += [tag for flag, tag in (("use_dora", "dora"), ("use_rslora", "rslora")) if cfg.get(flag)]
    return list(dict.fromkeys(tags))


def _summary(name: str, path: str, adapter: Adapter) -> dict[str, Any]:
    cfg = adapter.config
    modules = sorted({n.module for n in (parse_key(k, cfg.peft_type, cfg) for k in adapter.tensors)
                      if n.role == "adapter"})
    row: dict[str, Any] = {"name": name, "path": path, "method": cfg.peft_type, "modules": len(modules),
                           "tensors": len(adapter.tensors), "parameters": adapter.num_parameters,
                           "dtypes": ", ".join(sorted(Counter(i.dtype for i in adapter.tensors.values())))}
    if cfg.peft_type in ("LORA", "LOHA", "LOKR") and modules:
        ranks = sorted({cfg.rank_for(m) for m in modules})
        scalings = sorted({round(cfg.scaling_for(m), 6) for m in modules})
        row["rank"] = ", ".join(map(str, ranks))
        row["scaling"] = ", ".join(f"{s:g}" for s in scalings)
    if cfg.is_prompt_learning:
        row["rank"] = f"{cfg.get('num_virtual_tokens')} virtual tokens"
    targets = cfg.get("target_modules")
    row["targets"] = targets if isinstance(targets, str) else ", ".join(sorted(targets or [])) or "-"
    return row


def build_model_card(adapters: Mapping[str, Adapter], repo_id: str, *, paths: Mapping[str, str] | None = None,
                     subfolder: str | None = None) -> ModelCard:
    """A :class:`huggingface_hub.ModelCard` for a repo holding ``adapters`` (name -> adapter).

    :param paths: name -> the adapter's folder relative to the pushed folder (``"."`` for the root).
    :param subfolder: where in the repo the pushed folder goes (shown in the loading examples).
    """
    from huggingface_hub import ModelCard, ModelCardData

    paths = dict(paths or {name: "." if name == _DEFAULT else name for name in adapters})
    bases = sorted({b for b in (_base_model(a) for a in adapters.values()) if b})
    task_types = {a.config.get("task_type") for a in adapters.values()}
    tasks = sorted({_TASKS[t] for t in task_types if t in _TASKS})
    # one task type: the class it loads the base with; none recorded, or several: a causal LM's (the common case)
    auto = _AUTO_CLASSES.get(str(next(iter(task_types))) if len(task_types) == 1 else "", "AutoModelForCausalLM")
    data = ModelCardData(library_name="peft", base_model=(bases[0] if len(bases) == 1 else bases) or None,
                         pipeline_tag=tasks[0] if len(tasks) == 1 else None, tags=card_tags(adapters))
    rows = [_summary(name, paths[name], adapter) for name, adapter in adapters.items()]
    name = repo_id.split("/")[-1]
    methods = ", ".join(sorted({r["method"] for r in rows}))
    base_text = ", ".join(f"[{b}](https://huggingface.co/{b})" for b in bases) or "its base model"
    lines = [f"# {name}", "",
             f"{'A ' + methods + ' adapter' if len(rows) == 1 else str(len(rows)) + ' adapters (' + methods + ')'} "
             f"for {base_text}, in the adapterspec format: PEFT's "
             "on-disk format (`adapter_config.json` + `adapter_model.safetensors`), checked against the spec "
             "before upload, so it loads in PEFT unchanged and in any framework adapterspec supports.", "",
             "| adapter | folder | method | rank | scaling | targets | adapted modules | tensors | parameters | dtype |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']} | `{r['path']}` | {r['method']} | {r.get('rank', '-')} | {r.get('scaling', '-')} "
                     f"| {r['targets']} | {r['modules']} | {r['tensors']} | {r['parameters']:,} | {r['dtypes']} |")
    base = bases[0] if bases else "BASE_MODEL"
    first, first_path = rows[0]["name"], rows[0]["path"]
    sub = "/".join(p for p in (subfolder, None if first_path == "." else first_path) if p)
    sub_arg = f', subfolder="{sub}"' if sub else ""
    lines += ["", "## Load it", "", "With adapterspec, into a PyTorch (transformers) or a Keras model:", "", "```python",
              "import adapterspec", f"from transformers import {auto}", "",
              f'model = {auto}.from_pretrained("{base}")',
              f'adapterspec.load_adapter(model, "{repo_id}"{sub_arg})',
              f'# or a Keras (keras-hub) model of the same architecture: adapterspec.load_adapter(keras_model, "{repo_id}"{sub_arg})',
              "```", "", "With PEFT:", "", "```python", "from peft import PeftModel", "",
              f'model = PeftModel.from_pretrained(model, "{repo_id}"{sub_arg})', "```"]
    if len(rows) > 1:
        lines += ["", "Each adapter is in its own folder (listed in `adapterspec.json`); load one with `subfolder=`:",
                  "", "```python"]
        for r in rows:
            path = "/".join(p for p in (subfolder, None if r["path"] == "." else r["path"]) if p)
            where = f', subfolder="{path}"' if path else ""
            lines.append(f'adapterspec.load_adapter(model, "{repo_id}", "{r["name"]}"{where}, activate=False)')
        lines.append("```")
    lines += ["", "Check it: `adapterspec validate hf://" + repo_id + (f"/{subfolder}" if subfolder else "") + "`", ""]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))
