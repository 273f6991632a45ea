"""Collaborative selection once per task, at the base weights, reused by every run (it is deterministic)."""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass, field

import torch
from peft import get_peft_model

from peft_cpl import AdapterSupport, CPLConfig, SelectionReport, export_support, select_collaborative
from peft_cpl.toolkit.batches import make_batches

from .data import Split, World


@dataclass
class Selection:
    report: SelectionReport
    seconds: float
    support: AdapterSupport  # CPL's support and sign(g_M), restored into every CPL run
    collaborative: dict[str, torch.Tensor]  # targeted weight's name -> flat bool mask of {s >= 0 and g_I != 0}
    density: float  # CPL's support fraction: the density of the random / magnitude supports
    nlora_lambda: float
    base_weights: dict[str, torch.Tensor]  # copies of the weights "all-linear" targets, by name in the base model
    variants: dict[tuple, tuple[AdapterSupport, float]] = field(default_factory=dict)  # levers' supports, seconds


def select_once(args: argparse.Namespace, world: World, split: Split) -> Selection:
    """Select on M-ref vs the trained injection items; the targeted weights are those this CPL model wraps."""
    tokenizer = world.tokenizer
    model = get_peft_model(world.fresh_base(), CPLConfig(target_modules="all-linear"))
    mastered = make_batches(tokenizer, split.mastered_ref, args.batch_size)
    injection = make_batches(tokenizer, split.injection, args.batch_size)
    started = time.perf_counter()
    report = select_collaborative(model, mastered, injection, progress=False)
    seconds = time.perf_counter() - started
    collaborative = {}
    for name, support in export_support(model).supports.items():
        mask = torch.zeros(math.prod(support.shape), dtype=torch.bool)
        mask[support.indices] = True
        collaborative[name] = mask
    uncapped = report
    if args.cpl_density is not None:
        started = time.perf_counter()
        report = select_collaborative(model, mastered, injection, density=args.cpl_density, progress=False)
        seconds += time.perf_counter() - started
    support = export_support(model)
    base = model.get_base_model()
    base_weights = {
        name: base.get_submodule(name).get_base_layer().weight.detach().float().cpu().clone()
        for name in support.supports
    }
    rms = math.sqrt(uncapped.total("injection_sq") / max(uncapped.total("numel"), 1))
    nlora_lambda = args.nlora_lambda if args.nlora_lambda is not None else rms
    return Selection(report, seconds, support, collaborative, report.summary()["support_fraction"], nlora_lambda,
                     base_weights)
