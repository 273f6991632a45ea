"""The generation judge: does the model, answering in its own words, give the fact?

Chat models answer "The capital of France is Paris.", so for facts without a `response_prefix` the teacher-forced
rule (the reply must *start* with the answer) counts almost everything wrong. Here the model generates its reply
(greedy, batched with left padding and the KV cache, up to `max_new_tokens`, stopping at EOS or a newline), and the
item is right when the gold answer, or one of its `answers` aliases, appears in the reply once both are normalised
as SQuAD does (case, punctuation, articles a/an/the, whitespace), as whole words.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from .batches import pad_token_id, prompt_ids
from .data import MATCHES

MAX_NEW_TOKENS = 16
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize(text: str) -> str:
    """SQuAD's answer normalisation (with Unicode punctuation): lower case, no punctuation, no articles, one space."""
    text = "".join(char for char in text.lower() if not unicodedata.category(char).startswith("P"))
    return " ".join(_ARTICLES.sub(" ", text).split())


def answer_in_reply(reply: str, item: dict) -> bool:
    """Whether the item's answer, or one of its `answers`, appears in `reply` (normalised, as whole words)."""
    said = f" {normalize(reply)} "
    for answer in [item["answer"], *item.get("answers", [])]:
        gold = normalize(answer)
        if gold and f" {gold} " in said:
            return True
        if not gold and answer.strip() and answer.strip().lower() in reply.lower():  # an answer of only "The", "?"
            return True
    return False


def uses_generation(item: dict, match: str) -> bool:
    """Whether `match` judges this fact by its generated reply: "auto" does for facts without a response_prefix."""
    if match not in MATCHES:
        raise ValueError(f"match must be one of {MATCHES}, got {match!r}")
    return match == "generate" or (match == "auto" and not (item.get("response_prefix") or "").strip())


def _stop_ids(tokenizer) -> list[int]:
    """EOS and the newline tokens. (`stop_strings` would be exact but fails on tokenizers without byte-level pieces;
    a reply is cut at its first newline anyway, so stopping here only saves time.)"""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for text in ("\n", "\n\n"):
        encoded = tokenizer.encode(text, add_special_tokens=False)
        if len(encoded) == 1 and encoded[0] != tokenizer.unk_token_id and encoded[0] not in ids:
            ids.append(encoded[0])
    return ids


@torch.no_grad()
def generate_replies(
    model: nn.Module, tokenizer, items: Sequence[dict], batch_size: int = 16, max_new_tokens: int = MAX_NEW_TOKENS,
    progress: bool = False,
) -> dict[str, str]:
    """{item id: the model's greedy reply to the question} (chat template, no response prefix; the first line only)."""
    from transformers import GenerationConfig

    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError(f"batch_size and max_new_tokens must be >= 1, got {batch_size} and {max_new_tokens}")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pad_id = pad_token_id(tokenizer)
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id,
                              eos_token_id=_stop_ids(tokenizer))
    replies: dict[str, str] = {}
    try:
        for start in tqdm(range(0, len(items), batch_size), desc="generating replies", disable=not progress,
                          leave=False):
            chunk = items[start : start + batch_size]
            prompts = [prompt_ids(tokenizer, item["question"]) for item in chunk]
            width = max(map(len, prompts))
            input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, ids in enumerate(prompts):  # left padding: every reply starts at column `width`
                input_ids[row, width - len(ids) :] = torch.tensor(ids)
                attention_mask[row, width - len(ids) :] = 1
            output = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                    generation_config=config)
            for item, new in zip(chunk, output[:, width:].tolist()):
                text = tokenizer.decode(new, skip_special_tokens=True)
                replies[item["id"]] = text.strip().split("\n", 1)[0].strip()
    finally:
        model.train(was_training)
    return replies
