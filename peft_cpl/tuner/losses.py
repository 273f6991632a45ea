"""Losses summed per example, so mean gradients are exact whatever the batch size."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

LossFn = Callable[[nn.Module, Any], torch.Tensor]


def batch_size(batch: Any) -> int:
    """Number of examples in a batch (dict of tensors, tensor, or tuple/list whose first item is a tensor)."""
    if isinstance(batch, torch.Tensor):
        return batch.shape[0]
    items = batch.values() if isinstance(batch, Mapping) else batch
    for item in items:
        if isinstance(item, torch.Tensor) and item.dim() > 0:
            return item.shape[0]
    raise ValueError("cannot tell the batch size: a batch must be a tensor or hold one (e.g. input_ids)")


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-example mean cross-entropy of next-token predictions over the labelled positions (label != -100)."""
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:].to(logits.device)
    per_token = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1), ignore_index=-100, reduction="none"
    ).view(shift_labels.shape)
    counted = (shift_labels != -100).sum(dim=1)
    if bool((counted == 0).any()):
        raise ValueError("an example has no labelled token (every label is -100): nothing to learn from it")
    return per_token.sum(dim=1) / counted


def summed_example_loss(model: nn.Module, batch: Any, loss_fn: LossFn | None = None) -> tuple[torch.Tensor, int]:
    """(sum over the batch of each example's loss, number of examples).

    Default: the causal-LM loss from `batch["labels"]`, averaged over each example's labelled tokens. A custom
    `loss_fn(model, batch)` may return per-example losses (1-D) or the batch mean (a scalar, as HF models do).
    """
    count = batch_size(batch)
    if loss_fn is None:
        if not isinstance(batch, Mapping) or "labels" not in batch:
            raise ValueError("the default loss needs batches with 'labels'; pass loss_fn=... for other data")
        inputs = {key: value for key, value in batch.items() if key != "labels"}
        losses = token_losses(model(**inputs).logits, batch["labels"])
        return losses.sum(), count
    loss = loss_fn(model, batch)
    if loss.dim() == 0:
        return loss * count, count
    if loss.shape != (count,):
        raise ValueError(f"loss_fn returned shape {tuple(loss.shape)}; expected a scalar or one loss per example")
    return loss.sum(), count
