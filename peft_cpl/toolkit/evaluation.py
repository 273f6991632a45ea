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


@torch.no_grad()
def _teacher_forced(model: nn.Module, tokenizer, items: Sequence[dict], batch_size: int) -> dict[str, bool]:
    """The letter rule and the prefix rule: one forward pass per batch.

    Batches are left-padded (with matching position ids) so that every target sits at the end of its row and only the
    last few positions' logits are computed (`logits_to_keep`): a vocabulary-sized projection of every token would
    dominate the cost otherwise.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pad_id = pad_token_id(tokenizer)
    letters = None
    correct: dict[str, bool] = {}
    try:
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            encoded = [encode(tokenizer, item) for item in chunk]
            width = max(len(e.input_ids) for e in encoded)
            keep = max(len(e.input_ids) - e.target_start for e in encoded) + 1
            input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, example in enumerate(encoded):
                input_ids[row, width - len(example.input_ids) :] = torch.tensor(example.input_ids)
                attention_mask[row, width - len(example.input_ids) :] = 1
            position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
            logits = model(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                position_ids=position_ids.to(device),
                logits_to_keep=keep,
            ).logits
            for row, (item, example) in enumerate(zip(chunk, encoded)):
                targets = torch.tensor(example.input_ids[example.target_start :], device=logits.device)
                # logits[:, j] predicts token width - keep + j + 1; the targets are the last len(targets) tokens
                predicting = logits[row, keep - 1 - len(targets) : keep - 1]
                if item_kind(item) == "mcq":
                    letters = letters or letter_token_ids(tokenizer)
                    choice = int(predicting[0, letters].argmax())
                    correct[item["id"]] = LETTERS[choice] == item["label"]
                else:
                    correct[item["id"]] = bool(torch.equal(predicting.argmax(dim=-1), targets))
    finally:
        model.train(was_training)
    return correct


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
