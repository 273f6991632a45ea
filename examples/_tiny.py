"""A stand-in for SmolLM2 that runs in seconds: a tiny Llama and a word-level tokenizer, saved as a model folder.

Every example takes `--tiny` to use it (the tests run them that way). The model is first fitted to half of a few
made-up facts, so that, like a real model, it knows some of them (mastered) and not the others (injection).
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import LlamaForCausalLM

from peft_cpl.toolkit.tiny import fit, item_texts, tiny_llama_config, tiny_tokenizer


def tiny_facts(count: int = 16) -> list[dict]:
    """Free-form facts in the library's item format (see peft_cpl.toolkit.data); every answer is one of eight city
    names, so an unknown fact recombines words the model knows, as a real unknown capital does."""
    return [
        {"id": f"land{i}", "question": f"capital of land{i} ?", "answer": f"city{(3 * i) % 8}",
         "response_prefix": f"land{i} has"}
        for i in range(count)
    ]


def save_tiny_model(folder: str | Path, facts: list[dict] | None = None, seed: int = 0) -> Path:
    """Write a tiny Llama + tokenizer to `folder` (for from_pretrained) that knows the first half of `facts`."""
    facts = facts or tiny_facts()
    tokenizer = tiny_tokenizer(item_texts(facts))
    config = tiny_llama_config(
        vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    model = fit(LlamaForCausalLM(config), tokenizer, facts[: len(facts) // 2], steps=60, lr=1e-2)
    folder = Path(folder)
    model.eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
