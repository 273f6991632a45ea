"""The knowledge-injection protocol: predict, split mastered / injection, count learned / forgotten.

Prompts are the model's chat template of the question with the generation prompt added.
- Multiple choice: the target is the answer letter's token right after the prompt; the prediction is the argmax of
  the logits of the tokens "A", "B", "C", "D" at that position (the paper's protocol).
- Free-form fact, `match="prefix"`: the target is the answer's tokens after the prompt and the optional response
  prefix; an item is correct when every answer token is the argmax given the gold tokens before it (teacher-forced
  greedy match). That is exactly "greedy decoding after the prefix starts with the gold answer", checked in one
  forward pass per batch.
- Free-form fact, `match="generate"`: the model generates its reply and the answer (or an alias) must appear in it
  (judge.py). `match="auto"`, the default, judges facts with a `response_prefix` by the prefix rule and the others
  by generation: a fact without a prefix is how a user writes it, and a chat model does not answer with the bare
  answer first ("The capital of France is Paris."), so the prefix rule would count it unknown.
Training uses the same encoding (batches.py), with the loss on the target tokens only.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .batches import encode, letter_token_ids, pad_token_id
from .data import LETTERS, item_kind
from .judge import MAX_NEW_TOKENS, answer_in_reply, generate_replies, uses_generation


def predict(
    model: nn.Module, tokenizer, items: Sequence[dict], batch_size: int = 16, *, match: str = "auto",
    max_new_tokens: int = MAX_NEW_TOKENS, replies: dict[str, str] | None = None, progress: bool = False,
) -> dict[str, bool]:
    """{item id: answered correctly} under the protocol above (eval mode), in the order of `items`.

    `match` is "auto", "prefix" or "generate" (facts only; multiple choice is always judged by the letters);
    `replies`, when given, receives the generated reply of every item judged by generation.
    """
    generated = [item for item in items if item_kind(item) == "fact" and uses_generation(item, match)]
    taken = {item["id"] for item in generated}
    forced = _teacher_forced(model, tokenizer, [item for item in items if item["id"] not in taken], batch_size)
    said = generate_replies(model, tokenizer, generated, batch_size, max_new_tokens, progress) if generated else {}
    if replies is not None:
        replies.update(said)
    by_generation = {item["id"]: answer_in_reply(said[item["id"]], item) for item in generated}
    return {item["id"]: by_generation[item["id"]] if item["id"] in taken else forced[item["id"]] for item in items}


SHARED_PREFIX_MIN = 8  # tokens; below this, one forward pass of the prefix costs more than it saves


def shared_prefix_length(encoded: Sequence) -> int:
    """How many leading tokens every item shares (the chat template's system turn), short of each item's targets.

    The token before the first target must stay outside the prefix: its logits predict that target.
    """
    first = encoded[0].input_ids
    length = min(example.target_start for example in encoded) - 1
    for example in encoded[1:]:
        ids = example.input_ids
        length = next((j for j in range(length) if ids[j] != first[j]), length)
    return max(length, 0)


def _prefix_cache(model: nn.Module, prefix: list[int], device: torch.device) -> tuple[str, object] | None:
    """(the forward keyword it goes back in, the key/value cache of the shared prefix at batch 1), or None when the
    prefix is short or the model returns no cache. Transformers renamed `past_key_values` to `cache` within 5.x."""
    if len(prefix) < SHARED_PREFIX_MIN:
        return None
    output = model(input_ids=torch.tensor([prefix], device=device), use_cache=True, logits_to_keep=1)
    for keyword in ("cache", "past_key_values"):
        cache = getattr(output, keyword, None)
        if hasattr(cache, "batch_repeat_interleave"):
            return keyword, cache
    return None


@torch.no_grad()
def target_logits(model: nn.Module, tokenizer, items: Sequence[dict], batch_size: int):
    """Yields (item, its encoding, the logits that predict its target tokens), one forward pass per batch.

    Batches are left-padded (with matching position ids) so that every target sits at the end of its row and only the
    last few positions' logits are computed (`logits_to_keep`): a vocabulary-sized projection of every token would
    dominate the cost otherwise. Items go in order of length (less padding), and the prefix every prompt shares (the
    chat template's system turn, about half of a short fact's tokens) is run once and its key/value cache reused.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not items:
        return
    device = next(model.parameters()).device
    pad_id = pad_token_id(tokenizer)
    encoded = [encode(tokenizer, item) for item in items]
    shared = shared_prefix_length(encoded)
    prefix = _prefix_cache(model, encoded[0].input_ids[:shared], device)
    shared = shared if prefix is not None else 0
    order = sorted(range(len(items)), key=lambda index: len(encoded[index].input_ids))
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        suffixes = [encoded[index].input_ids[shared:] for index in rows]
        width = max(len(ids) for ids in suffixes)
        keep = max(len(encoded[index].input_ids) - encoded[index].target_start for index in rows) + 1
        input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for row, ids in enumerate(suffixes):
            input_ids[row, width - len(ids) :] = torch.tensor(ids)
            attention_mask[row, width - len(ids) :] = 1
        position_ids = shared + (attention_mask.cumsum(-1) - 1).clamp(min=0)
        extra = {}
        if prefix is not None:
            keyword, cache = prefix
            batch_cache = copy.deepcopy(cache)
            batch_cache.batch_repeat_interleave(len(rows))
            attention_mask = torch.cat([torch.ones((len(rows), shared), dtype=torch.long), attention_mask], 1)
            extra = {keyword: batch_cache, "use_cache": True}
        logits = model(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            position_ids=position_ids.to(device),
            logits_to_keep=keep,
            **extra,
        ).logits
        for row, index in enumerate(rows):
            example = encoded[index]
            targets = len(example.input_ids) - example.target_start
            # logits[:, j] predicts the token keep - 1 - j places before the row's end; the targets end the row
            yield items[index], example, logits[row, keep - 1 - targets : keep - 1]


def _teacher_forced(model: nn.Module, tokenizer, items: Sequence[dict], batch_size: int) -> dict[str, bool]:
    """The letter rule and the prefix rule (eval mode), in the order of `items`."""
    was_training = model.training
    model.eval()
    letters = None
    correct: dict[str, bool] = {}
    try:
        for item, example, predicting in target_logits(model, tokenizer, items, batch_size):
            if item_kind(item) == "mcq":
                letters = letters or letter_token_ids(tokenizer)
                correct[item["id"]] = LETTERS[int(predicting[0, letters].argmax())] == item["label"]
            else:
                targets = torch.tensor(example.input_ids[example.target_start :], device=predicting.device)
                correct[item["id"]] = bool(torch.equal(predicting.argmax(dim=-1), targets))
    finally:
        model.train(was_training)
    return {item["id"]: correct[item["id"]] for item in items}


def split_by_correctness(correct: dict[str, bool], items: Sequence[dict]) -> tuple[list[dict], list[dict]]:
    """(mastered: answered correctly, injection: answered wrongly)."""
    mastered = [item for item in items if correct[item["id"]]]
    injection = [item for item in items if not correct[item["id"]]]
    return mastered, injection


@dataclass(frozen=True)
class InjectionOutcome:
    learned: int  # injection items now correct
    injection_total: int
    forgotten: int  # mastered items now wrong
    mastered_total: int

    def __str__(self) -> str:
        return (
            f"learned {self.learned}/{self.injection_total}, forgotten {self.forgotten}/{self.mastered_total}"
        )


def injection_outcome(
    correct_after: dict[str, bool], mastered: Sequence[dict], injection: Sequence[dict]
) -> InjectionOutcome:
    return InjectionOutcome(
        learned=sum(correct_after[item["id"]] for item in injection),
        injection_total=len(injection),
        forgotten=sum(not correct_after[item["id"]] for item in mastered),
        mastered_total=len(mastered),
    )


def debiased_split(
    model: nn.Module, tokenizer, items: Sequence[dict], batch_size: int = 16
) -> tuple[list[dict], list[dict]]:
    """Multiple-choice split robust to answer-letter bias: mastered = right under all four cyclic rotations of the
    options, injection = wrong under all four; items in between are left out."""
    from .data import rotate_options

    rotations = [rotate_options(item, shift) for item in items for shift in range(4)]
    correct = predict(model, tokenizer, rotations, batch_size=batch_size)
    mastered, injection = [], []
    for item in items:
        votes = [correct[f"{item['id']}@{shift}"] for shift in range(4)]
        if all(votes):
            mastered.append(item)
        elif not any(votes):
            injection.append(item)
    return mastered, injection
