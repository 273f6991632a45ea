"""The methods compared, and each one built the same way from a fresh base so that only the method differs."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from peft_cpl import CollaborativeGuard, CPLConfig, restore_support, select_collaborative
from peft_cpl.toolkit.batches import make_batches
from peft_cpl.toolkit.loop import make_optimizer

from .baselines import AGEM, ReplayBatches, nlora_loss

if TYPE_CHECKING:  # selection.py needs the splits, which need the settings, which need this table
    from .selection import Selection


@dataclass(frozen=True)
class Method:
    name: str
    kind: str  # "full" (every parameter), "lora", "cpl" (a CPL sparse delta on all linear layers)
    optimizer: str
    lr: float  # centre of its sweep on SmolLM2 (see --lr to override)
    about: str
    support: str | None = None  # CPL support kind
    guard: bool = False
    nlora: str | None = None  # N-LoRA penalty form
    agem: bool = False
    replay: bool = False


# Sweep centres, from a pilot on the capitals (16 trained, 2 epochs of 2 steps at batch 8): SGD at 3e-3 learned 11/16
# after 2 steps and CPL (AdamW) at 3e-4 learned 10/16, so the centres sit ~3x lower, where 12 steps of the full run
# should learn most items and the x0.25 / x4 ends learn little / overshoot. AdamW on the full model, and LoRA, are set
# from the usual ratios to sparse AdamW (about 1/3 and 5x); the per-epoch points fill in the curves between.
SGD_LR, SPARSE_LR, FULL_ADAMW_LR, LORA_LR = 1e-3, 1e-4, 3e-5, 5e-4
METHODS = [
    Method("full-sgd", "full", "sgd", SGD_LR, "full fine-tuning, plain SGD (the paper's optimizer)"),
    Method("full-adamw", "full", "adamw", FULL_ADAMW_LR, "full fine-tuning, AdamW"),
    Method("lora", "lora", "adamw", LORA_LR, "LoRA r=16, alpha=32, all linear layers"),
    Method("nlora", "lora", "adamw", LORA_LR, "N-LoRA: LoRA + lambda*||scaling*B@A||_1 (paper form)", nlora="paper"),
    Method("nlora-released", "lora", "adamw", LORA_LR, "N-LoRA as released: lambda*||A@B||_1, r x r, square layers",
           nlora="released"),
    Method("random", "cpl", "adamw", SPARSE_LR, "random sparse support at CPL's density (SHiRA-like)",
           support="random"),
    Method("magnitude", "cpl", "adamw", SPARSE_LR, "top-|W| support at CPL's density (Super-Tuning-like)",
           support="magnitude"),
    Method("agem", "full", "adamw", FULL_ADAMW_LR, "full fine-tuning, AdamW, A-GEM projection on M-ref batches",
           agem=True),
    Method("replay", "full", "adamw", FULL_ADAMW_LR, "full fine-tuning, AdamW, M-ref items replayed in every batch",
           replay=True),
    Method("cpl", "cpl", "adamw", SPARSE_LR, "CPL: static collaborative support (select_collaborative)",
           support="collaborative"),
    Method("cpl-guard", "cpl", "adamw", SPARSE_LR,
           "CPL static support + per-step guard (sign g_M refreshed each epoch)", support="collaborative", guard=True),
    Method("authors-rule", "cpl", "sgd", SGD_LR, "authors' per-step rule: dense support + guard each epoch, SGD",
           support="dense", guard=True),
]
BY_NAME = {method.name: method for method in METHODS}
COLLISION_METHODS = ("lora", "nlora", "nlora-released", "random", "magnitude", "cpl")


@dataclass
class Built:
    model: nn.Module
    optimizer: torch.optim.Optimizer  # with A-GEM attached when the method has it
    agem: AGEM | None
    guard: CollaborativeGuard | None
    loss_fn: Callable | None
    batches: Sequence[dict]
    setup_seconds: float  # selection time charged to the run (CPL: the cached selection's measured time)


def build(args: argparse.Namespace, tokenizer, method: Method, lr: float, base: nn.Module, injection: list[dict],
          mastered_ref: list[dict], selection: Selection, cached_support: bool, random_seed: int) -> Built:
    """The method on `base`, ready to train on `injection` (already in the shared order) with `mastered_ref` as M."""
    size = args.batch_size
    mastered_batches = make_batches(tokenizer, mastered_ref, size)
    injection_batches = make_batches(tokenizer, injection, size)
    setup = 0.0
    torch.manual_seed(args.seed)  # LoRA's A initialisation: identical for LoRA and N-LoRA
    if method.kind == "full":
        model = base
    elif method.kind == "lora":
        model = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear"))
    else:
        density = selection.density if method.support in ("random", "magnitude") else None
        config = CPLConfig(target_modules="all-linear", support=method.support, density=density, seed=random_seed)
        model = get_peft_model(base, config)
        if method.support == "collaborative":
            if cached_support:
                restore_support(model, selection.support)
                setup = selection.seconds
            else:
                started = time.perf_counter()
                select_collaborative(model, mastered_batches, injection_batches, density=args.cpl_density,
                                     progress=False)
                setup = time.perf_counter() - started
    optimizer = make_optimizer(model, method.optimizer, lr)
    agem = None
    if method.agem:
        agem = AGEM(model, mastered_batches, seed=args.seed)
        agem.attach(optimizer)  # for the optimizer's lifetime: it is built for this one run
    guard = CollaborativeGuard(model, mastered=mastered_batches, refresh="epoch") if method.guard else None
    loss_fn = nlora_loss(selection.nlora_lambda, method.nlora) if method.nlora else None
    batches = injection_batches
    if method.replay:
        chunks = [injection[start : start + size] for start in range(0, len(injection), size)]
        batches = ReplayBatches(tokenizer, chunks, mastered_ref, args.replay_per_batch, seed=args.seed)
    return Built(model, optimizer, agem, guard, loss_fn, batches, setup)
