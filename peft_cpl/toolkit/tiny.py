"""A tiny Llama and a word-level tokenizer with a chat template, built in-process in a second.

The one stand-in for a real model that the tests, the examples (`--tiny`) and the benchmarks' `--quick` runs share:
no download, real transformers classes, and `fit` teaches it some facts so that, like a real model, it knows part
of a fact set (a non-empty mastered set) and not the rest.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|> {{ message['content'] }} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)
SPECIAL_TOKENS = ("<pad>", "<unk>", "<|user|>", "<|assistant|>", "<|end|>", "A", "B", "C", "D")


def tiny_tokenizer(texts: Sequence[str]) -> PreTrainedTokenizerFast:
    """A fast tokenizer whose vocabulary is the special tokens plus the whitespace-separated words of `texts`."""
    words = sorted({word for text in texts for word in text.split()} - set(SPECIAL_TOKENS))
    vocab = {token: index for index, token in enumerate([*SPECIAL_TOKENS, *words])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", eos_token="<|end|>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def item_texts(items: Sequence[dict]) -> list[str]:
    """Every text of the items that a tokenizer must cover."""
    keys = ("question", "answer", "response_prefix")
    return [" ".join(str(item[key]) for key in keys if item.get(key)) for item in items]


def tiny_llama_config(**overrides) -> LlamaConfig:
    settings = dict(
        vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=False,
    )
    settings.update(overrides)
    return LlamaConfig(**settings)


def tiny_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(**overrides)).eval()


def fit(model: torch.nn.Module, tokenizer, items: Sequence[dict], *, steps: int, lr: float) -> torch.nn.Module:
    """Teach `items` to the model (full batch, AdamW), so that it knows them before an experiment starts."""
    from .batches import make_batches

    batch = make_batches(tokenizer, items, batch_size=len(items))[0]
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        model(**batch).loss.backward()
        optimizer.step()
    return model.eval()
