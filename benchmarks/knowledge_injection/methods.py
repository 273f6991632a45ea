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

from peft_cpl import CollaborativeGuard, CPLConfig, export_support, restore_support, select_collaborative
from peft_cpl.toolkit.batches import make_batches
from peft_cpl.toolkit.loop import make_optimizer

from .baselines import AGEM, ReplayBatches, nlora_loss

if TYPE_CHECKING:  # selection.py needs the splits, which need the settings, which need this table
    from .selection import Selection


PAPER_SUPPORT = (None, "element", "injection", "reference", None)  # every collaborative coordinate, chosen on M-ref


@dataclass(frozen=True)
class Method:
    name: str
    kind: str  # "full" (every parameter), "lora", "cpl" (a CPL sparse delta on all linear layers)
    optimizer: str
    lrs: tuple[float, ...]  # its learning-rate sweep on SmolLM2 (see --lr to override)
    about: str
    support: str | None = None  # CPL support kind
    guard: bool = False
    nlora: str | None = None  # N-LoRA penalty form
    agem: bool = False
    replay: bool = False
    density: float | None = None  # CPL: a cap on the collaborative support (None: every collaborative coordinate)
    granularity: str = "element"
    ranking: str = "injection"  # which collaborative coordinates a cap keeps (select_collaborative's ranking)
    reselect: bool = False  # CPL: merge and choose the support again at the current weights every epoch
    mastered: str = "reference"  # the M it may use: "reference" (M-ref) or "generic" (generic.py)
    mastered_fraction: float | None = None  # only this first fraction of M-ref (the size lever)

    @property
    def support_key(self) -> tuple:
        return self.density, self.granularity, self.ranking, self.mastered, self.mastered_fraction


# The sweeps, fixed before any result of the seeded benchmark was seen. Each spans 30x, from under- to over-training
# in the run's 24 steps, around what earlier pilots found (RESULTS.md, and an outside run on other fact kinds): full
# fine-tuning with AdamW learned most facts at 3e-5 and forgot far more at 1e-4; sparse AdamW (CPL) learned at 1e-4 as
# fast as full AdamW at 3e-5; LoRA learned at ~5e-4; SGD at ~1e-3 to 3e-3.
FULL_ADAMW_LRS = (1e-5, 3e-5, 1e-4, 3e-4)
SPARSE_LRS = (3e-5, 1e-4, 3e-4, 1e-3)
LORA_LRS = (1e-4, 3e-4, 1e-3, 3e-3)
SGD_LRS = (3e-4, 1e-3, 3e-3, 1e-2)
METHODS = [
    Method("full-adamw", "full", "adamw", FULL_ADAMW_LRS, "full fine-tuning, AdamW"),
    Method("lora", "lora", "adamw", LORA_LRS, "LoRA r=16, alpha=32, all linear layers"),
    Method("nlora", "lora", "adamw", LORA_LRS, "N-LoRA: LoRA + lambda*||scaling*B@A||_1 (paper form)",
           nlora="paper"),
    Method("replay", "full", "adamw", FULL_ADAMW_LRS, "full fine-tuning, AdamW, M-ref items replayed in every batch",
           replay=True),
    Method("random", "cpl", "adamw", SPARSE_LRS, "random sparse support at CPL's density (SHiRA-like)",
           support="random"),
    Method("magnitude", "cpl", "adamw", SPARSE_LRS, "top-|W| support at CPL's density (Super-Tuning-like)",
           support="magnitude"),
    Method("cpl", "cpl", "adamw", SPARSE_LRS, "CPL: static collaborative support (select_collaborative)",
           support="collaborative"),
    Method("cpl-guard", "cpl", "adamw", SPARSE_LRS,
           "CPL static support + per-step guard (sign g_M refreshed each epoch)", support="collaborative", guard=True),
    Method("authors-rule", "cpl", "sgd", SGD_LRS, "authors' per-step rule: dense support + guard each epoch, SGD",
           support="dense", guard=True),
    # not in the default set (the brief's list): kept for the screening of levers and for comparison with 0.1.0
    Method("full-sgd", "full", "sgd", SGD_LRS, "full fine-tuning, plain SGD (the paper's optimizer)"),
    Method("nlora-released", "lora", "adamw", LORA_LRS, "N-LoRA as released: lambda*||A@B||_1, r x r, square layers",
           nlora="released"),
    Method("agem", "full", "adamw", FULL_ADAMW_LRS, "full fine-tuning, AdamW, A-GEM projection on M-ref batches",
           agem=True),
    # levers (issue 13): each is an experiment against "cpl" on the same seeds, recorded in RESULTS.md
    *[Method(f"cpl-d{density:g}", "cpl", "adamw", SPARSE_LRS, f"CPL capped at density {density:g} (top |g_I|)",
             support="collaborative", density=density) for density in (0.2, 0.05, 0.01)],
    *[Method(f"cpl-s-d{density:g}", "cpl", "adamw", SPARSE_LRS,
             f"CPL capped at density {density:g} (top s = g_M * g_I)", support="collaborative", density=density,
             ranking="contribution") for density in (0.2, 0.05)],
    *[Method(f"cpl-spec-d{density:g}", "cpl", "adamw", SPARSE_LRS,
             f"CPL capped at density {density:g} (top |g_I| / (|g_M| + mean |g_M|))", support="collaborative",
             density=density, ranking="specific") for density in (0.2, 0.05, 0.01)],
    *[Method(f"cpl-rows-d{density:g}", "cpl", "adamw", SPARSE_LRS, f"CPL, whole rows, density {density:g}",
             support="collaborative", density=density, granularity="row") for density in (0.2, 0.05)],
    Method("cpl-guard-d0.05", "cpl", "adamw", SPARSE_LRS, "CPL capped at density 0.05 + per-step guard",
           support="collaborative", guard=True, density=0.05),
    *[Method(f"cpl-guard-spec-d{density:g}", "cpl", "adamw", SPARSE_LRS,
             f"CPL capped at density {density:g} (ranking \"specific\") + per-step guard", support="collaborative",
             guard=True, density=density, ranking="specific") for density in (0.2, 0.05)],
    Method("cpl-guard-rows-d0.05", "cpl", "adamw", SPARSE_LRS, "CPL, whole rows, density 0.05 + per-step guard",
           support="collaborative", guard=True, density=0.05, granularity="row"),
    Method("cpl-replay", "cpl", "adamw", SPARSE_LRS, "CPL + M-ref items replayed in every batch",
           support="collaborative", replay=True),
    Method("cpl-m0.25", "cpl", "adamw", SPARSE_LRS, "CPL selected on the first quarter of M-ref (the size of M)",
           support="collaborative", mastered_fraction=0.25),
    Method("cpl-generic-m", "cpl", "adamw", SPARSE_LRS,
           "CPL selected on a generic M: the base model's own replies to 48 broad questions, no curated facts",
           support="collaborative", mastered="generic"),
    Method("cpl-guard-generic-m", "cpl", "adamw", SPARSE_LRS,
           "CPL + per-step guard, both on the generic M (no curated facts)", support="collaborative", guard=True,
           mastered="generic"),
    Method("cpl-reselect", "cpl", "adamw", SPARSE_LRS, "CPL, support chosen again at the current weights each epoch",
           support="collaborative", reselect=True),
]
DEFAULT_METHODS = [method.name for method in METHODS[:9]]
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
    torch.manual_seed(random_seed)  # LoRA's A initialisation: identical for LoRA and N-LoRA
    if method.kind == "full":
        model = base
    elif method.kind == "lora":
        model = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear"))
    else:
        density = selection.density if method.support in ("random", "magnitude") else None
        config = CPLConfig(target_modules="all-linear", support=method.support, density=density, seed=random_seed)
        model = get_peft_model(base, config)
        if method.support == "collaborative":
            key = method.support_key
            if cached_support and key == PAPER_SUPPORT:
                restore_support(model, selection.support)
                setup = selection.seconds
            elif cached_support and key in selection.variants:
                support, setup = selection.variants[key]
                restore_support(model, support)
            else:
                started = time.perf_counter()
                density, granularity, ranking, _, _ = key
                select_collaborative(model, mastered_batches, injection_batches, progress=False,
                                     density=args.cpl_density if density is None else density,
                                     granularity=granularity, ranking=ranking)
                setup = time.perf_counter() - started
                if cached_support:  # the same for every lr of this seed: chosen once, charged to each run
                    selection.variants[key] = (export_support(model), setup)
    optimizer = make_optimizer(model, method.optimizer, lr)
    agem = None
    if method.agem:
        agem = AGEM(model, mastered_batches, seed=random_seed)
        agem.attach(optimizer)  # for the optimizer's lifetime: it is built for this one run
    guard = CollaborativeGuard(model, mastered=mastered_batches, refresh="epoch") if method.guard else None
    loss_fn = nlora_loss(selection.nlora_lambda, method.nlora) if method.nlora else None
    batches = injection_batches
    if method.replay:
        chunks = [injection[start : start + size] for start in range(0, len(injection), size)]
        batches = ReplayBatches(tokenizer, chunks, mastered_ref, args.replay_per_batch, seed=random_seed)
    return Built(model, optimizer, agem, guard, loss_fn, batches, setup)
