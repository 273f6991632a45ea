"""A stand-in for SmolLM2 that runs in seconds: a tiny Llama and a word-level tokenizer, saved as a model folder.

Every example takes `--tiny` to use it (the tests run them that way). The model is first fitted to half of a few
made-up facts, so that, like a real model, it knows some of them (mastered) and not the others (injection).
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from peft_cpl.evaluation import make_batches

CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|> {{ message['content'] }} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)
SPECIALS = ["<pad>", "<unk>", "<|user|>", "<|assistant|>", "<|end|>", "A", "B", "C", "D"]


def tiny_facts(count: int = 16) -> list[dict]:
    """Free-form facts in the library's item format (see peft_cpl.data); every answer is one of eight city names, so
    an unknown fact recombines words the model knows, as a real unknown capital does."""
    return [
        {"id": f"land{i}", "question": f"capital of land{i} ?", "answer": f"city{(3 * i) % 8}",
         "response_prefix": f"land{i} has"}
        for i in range(count)
    ]


def save_tiny_model(folder: str | Path, facts: list[dict] | None = None, seed: int = 0) -> Path:
    """Write a tiny Llama + tokenizer to `folder` (for from_pretrained) that knows the first half of `facts`."""
    facts = facts or tiny_facts()
    words = sorted({w for f in facts for w in f"{f['question']} {f['answer']} {f['response_prefix']}".split()})
    vocab = {token: index for index, token in enumerate(SPECIALS + [w for w in words if w not in SPECIALS])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", eos_token="<|end|>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=False, pad_token_id=0, eos_token_id=vocab["<|end|>"],
        bos_token_id=None,
    )
    model = LlamaForCausalLM(config)
    batch = make_batches(tokenizer, facts[: len(facts) // 2], batch_size=len(facts))[0]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(60):
        optimizer.zero_grad()
        model(**batch).loss.backward()
        optimizer.step()
    folder = Path(folder)
    model.eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
