"""The input pipeline: items -> token ids (chat template, target after the prompt) -> padded training batches.

Selection, training and evaluation encode items the same way, here: the prompt is the chat template of the question
with the generation prompt added (plus the optional response prefix), and the target is the answer letter's token
(multiple choice) or the answer's tokens (free-form fact).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .data import LETTERS, item_kind


def pad_token_id(tokenizer) -> int:
    """The tokenizer's pad id, or its EOS id for tokenizers without one (as most chat models ship)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]  # prompt (+ prefix) + target tokens
    target_start: int  # index of the first target token


def letter_token_ids(tokenizer) -> list[int]:
    ids = [tokenizer.encode(letter, add_special_tokens=False) for letter in LETTERS]
    if any(len(token) != 1 for token in ids):
        raise ValueError("this tokenizer does not encode each of A, B, C, D as a single token")
    return [token[0] for token in ids]


def prompt_text(tokenizer, question: str) -> str:
    """The chat template of the question with the generation prompt added: what the model answers."""
    messages = [{"role": "user", "content": question}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def prompt_ids(tokenizer, question: str) -> list[int]:
    return tokenizer.encode(prompt_text(tokenizer, question), add_special_tokens=False)


def encode(tokenizer, item: dict) -> Encoded:
    prompt = prompt_text(tokenizer, item["question"])
    if item_kind(item) == "mcq":
        prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
        return Encoded(prompt_ids + [letter_token_ids(tokenizer)[LETTERS.index(item["label"])]], len(prompt_ids))
    prefix = (item.get("response_prefix") or "").rstrip()  # "is " + "Paris" would split as "is", " ", "Paris"
    prompt_ids = tokenizer.encode(prompt + prefix, add_special_tokens=False)
    answer_ids = tokenizer.encode((" " if prefix and not prefix.endswith((" ", "+")) else "") + item["answer"].strip(),
                                  add_special_tokens=False)
    return Encoded(prompt_ids + answer_ids, len(prompt_ids))


def check_context(
    tokenizer, items: Sequence[dict], context: int | None, new_tokens: int = 0, source: str = "",
    truncate: bool = False,
) -> list[dict]:
    """The items, refusing (before any model work) one whose tokens, plus `new_tokens` to generate, exceed the
    model's context of `context` tokens (None: no limit known); the item is named. With `truncate`, such a question
    loses its beginning instead (the end, where the question is asked, is kept); only when the user asks."""
    if not context:
        return list(items)
    overhead = len(prompt_ids(tokenizer, "")) + new_tokens + 2
    kept = []
    for item in items:
        text = item["question"] + (item.get("answer") or "") + (item.get("response_prefix") or "")
        if 2 * len(text.encode("utf-8")) + overhead < context:
            kept.append(item)  # tokens are at most bytes (plus a word marker): too short to overflow
            continue
        length = len(encode(tokenizer, item).input_ids) + new_tokens
        if length > context and truncate:
            item, length = _truncated(tokenizer, item, context, new_tokens)
        if length > context:
            where = f" in {source}" if source else ""
            reply = " with the reply" if new_tokens else ""
            raise ValueError(f"item {item['id']!r}{where} is {length} tokens long{reply}, over the model's context "
                             f"of {context}: shorten it or leave it out" + ("" if truncate else " (or pass --truncate "
                             "to cut the start of long questions)"))
        kept.append(item)
    return kept


def _truncated(tokenizer, item: dict, context: int, new_tokens: int) -> tuple[dict, int]:
    """The item with the shortest cut from the start of its question that fits (binary search on characters)."""
    question, low, high = item["question"], 0, len(item["question"])
    best = None
    while low <= high:
        cut = (low + high) // 2
        candidate = {**item, "question": question[cut:]}
        length = len(encode(tokenizer, candidate).input_ids) + new_tokens if candidate["question"].strip() else None
        if length is not None and length <= context:
            best, high = (candidate, length), cut - 1
        else:
            low = cut + 1
    return best if best else (item, len(encode(tokenizer, item).input_ids) + new_tokens)


def collate(encoded: Sequence[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch; labels are -100 except on target tokens.

    Padded here rather than by `tokenizer.pad`: most chat tokenizers have no pad token, and `tokenizer.pad` then
    refuses unless the user's tokenizer is changed; the EOS fallback (`pad_token_id`) needs no change to it.
    """
    width = max(len(e.input_ids) for e in encoded)
    input_ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(encoded), width), dtype=torch.long)
    labels = torch.full((len(encoded), width), -100, dtype=torch.long)
    for row, example in enumerate(encoded):
        length = len(example.input_ids)
        input_ids[row, :length] = torch.tensor(example.input_ids)
        attention_mask[row, :length] = 1
        labels[row, example.target_start : length] = input_ids[row, example.target_start : length]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def make_batches(tokenizer, items: Sequence[dict], batch_size: int, seed: int | None = None) -> list[dict]:
    """Training / selection batches; `seed` shuffles the items first (same seed, same order for every method)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = list(items)
    if seed is not None:
        random.Random(seed).shuffle(order)
    pad_id = pad_token_id(tokenizer)
    encoded = [encode(tokenizer, item) for item in order]
    return [collate(encoded[start : start + batch_size], pad_id) for start in range(0, len(encoded), batch_size)]
