"""Fixtures of the torch backend tests: tiny random models, PEFT references with element-unique weights."""

from __future__ import annotations

from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("transformers")

from torch import nn  # noqa: E402
from torch_helpers import tiny_llama_config, unique_values  # noqa: E402


@pytest.fixture(scope="session")
def llama() -> nn.Module:
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config()).eval()


@pytest.fixture(scope="session")
def gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(1)
    config = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=64)
    return GPT2LMHeadModel(config).eval()


@pytest.fixture(scope="session")
def bert() -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(2)
    config = BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                        vocab_size=128, max_position_embeddings=64, num_labels=3)
    return BertForSequenceClassification(config).eval()


class SmallCNN(nn.Module):
    """Conv2d -> ReLU -> Conv2d -> Conv1d over rows -> Linear: every conv kind and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 6, 1)
        self.conv3 = nn.Conv1d(6, 4, 3, padding=1)
        self.head = nn.Linear(4 * 8 * 8, 5)

    def forward(self, x: Any) -> Any:
        h = torch.relu(self.conv1(x))
        h = self.conv2(h)
        b, c, height, width = h.shape
        h = self.conv3(h.reshape(b, c, height * width))
        return self.head(h.reshape(b, -1))


@pytest.fixture(scope="session")
def cnn() -> nn.Module:
    torch.manual_seed(3)
    return SmallCNN().eval()


@pytest.fixture(scope="session")
def token_inputs() -> dict[str, Any]:
    ids = (torch.arange(2 * 9).reshape(2, 9) * 7) % 128
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :2] = 0  # left padding on the second row
    return {"input_ids": ids, "attention_mask": mask}


@pytest.fixture(scope="session")
def image_inputs() -> Any:
    return unique_values((2, 3, 8, 8), 99, scale=1.0)
