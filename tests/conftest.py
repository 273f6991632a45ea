"""Tiny real models built in-process (no downloads) and helpers shared by the tests."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

import peft_cpl
from peft_cpl import cpl_layers
from peft_cpl.toolkit.tiny import item_texts, tiny_llama, tiny_llama_config, tiny_tokenizer  # noqa: F401


class TinyMLP(nn.Module):
    """A plain torch model: embedding -> linear -> relu -> linear."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(100, 32)
        self.lin0 = nn.Linear(32, 48)
        self.lin1 = nn.Linear(48, 100)  # vocabulary-sized, so it doubles as a tiny next-token model

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.lin1(torch.relu(self.lin0(self.emb(input_ids))))


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=1000, n_embd=64, n_layer=2, n_head=4, n_positions=64)
    return GPT2LMHeadModel(config).eval()


def tiny_mlp(seed: int = 0) -> TinyMLP:
    torch.manual_seed(seed)
    return TinyMLP().eval()


@dataclass
class Case:
    """One kind of base model with the modules CPL targets on it."""

    name: str
    build: Callable[[int], nn.Module]
    targets: list[str]
    vocab: int

    def inputs(self, seed: int = 0, batch: int = 2, length: int = 8) -> torch.Tensor:
        return torch.randint(0, self.vocab, (batch, length), generator=torch.Generator().manual_seed(seed))

    @staticmethod
    def output(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
        out = model(input_ids=ids)
        return out if isinstance(out, torch.Tensor) else out.logits

    @staticmethod
    def loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
        out = model(input_ids=ids, labels=ids)
        return out.pow(2).mean() if isinstance(out, torch.Tensor) else out.loss


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Tiny models run faster on one thread than on two that spin-wait for cores shared with other work."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


CASES = {
    "llama": Case("llama", tiny_llama, ["q_proj", "v_proj", "down_proj", "embed_tokens"], 1000),
    "gpt2": Case("gpt2", tiny_gpt2, ["c_attn", "c_fc", "c_proj", "wpe"], 64),
    "mlp": Case("mlp", tiny_mlp, ["emb", "lin0", "lin1"], 100),
}


@pytest.fixture(params=list(CASES))
def case(request) -> Case:
    return CASES[request.param]


def randomize_values(model: nn.Module, scale: float = 0.05, seed: int = 0, adapter: str | None = None) -> None:
    """Give every CPL adapter non-zero values, so the tests exercise a non-trivial delta."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in cpl_layers(model, adapter).values():
            for name, values in module.cpl_values.items():
                if adapter is None or name == adapter:
                    noise = torch.randn(values.shape, generator=generator) * scale
                    values.copy_(noise.to(values.dtype))


def base_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return copy.deepcopy(model.state_dict())


assert peft_cpl.CPLConfig  # the import above registers CPL with PEFT for every test


FACTS = [
    {"id": f"f{i}", "question": f"capital of land{i} ?", "answer": f"city{i}", "response_prefix": f"land{i} has"}
    for i in range(12)
] + [
    {"id": "m0", "question": "pick one\nA: alpha\nB: beta\nC: gamma\nD: delta", "label": "C"},
    {"id": "m1", "question": "pick two\nA: alpha\nB: beta\nC: gamma\nD: delta", "label": "A"},
]


def facts_tokenizer():
    return tiny_tokenizer(item_texts(FACTS))
