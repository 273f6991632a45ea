"""What one invocation asks for (command line, sizes of the full and quick runs) and what it will cost to run."""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from peft_cpl.toolkit.batches import encode

from . import __doc__ as DESCRIPTION
from .methods import BY_NAME, COLLISION_METHODS, Method

ROOT = Path(__file__).resolve().parents[2]

# Measured on the project's machine (2 CPU cores, SmolLM2-135M, fp32), used only to print a time estimate:
EVAL_SECONDS_PER_TOKEN = 0.1 / 45  # predict: ~0.1 s per item of ~45 tokens
TRAIN_SECONDS_PER_TOKEN = 3.0 / (8 * 50)  # one fwd+bwd+step at batch 8 of ~50 tokens: ~3 s (selection: the same)
SUPPORT_SETUP_SECONDS = {"random": 15.0, "magnitude": 3.0}  # building the support when the adapter is created
CPL_STEP_FACTOR = 1.7  # a CPL step (sparse delta on ~60% of the linear weights): ~1.7x a full SGD step (pilot)

# Full-run sizes, chosen to fit ~90 min on 2 CPU cores (see the printed plan): facts is the primary task and gets a
# 3-point sweep (x0.25, x1, x4) of 3 epochs (3 steps each at batch 8); |M| = 64 so that a 2% forgetting budget allows
# one item; MC items are ~2.6x longer (~124 tokens), so MC gets 2 points (x0.5, x2) of 2 epochs on smaller sets.
FULL = dict(
    injection=24, injection_held=8, mastered=64, epochs=3, lr_factors=[0.25, 1.0, 4.0],
    mcq_pool=160, mcq_injection=16, mcq_injection_held=8, mcq_mastered=32, mcq_epochs=2, mcq_lr_factors=[0.5, 2.0],
    batch_size=8, eval_batch_size=32, lr_scale=1.0,
)
QUICK = dict(
    injection=8, injection_held=6, mastered=16, epochs=3, lr_factors=[0.5, 2.0],
    mcq_pool=48, mcq_injection=8, mcq_injection_held=4, mcq_mastered=12, mcq_epochs=2, mcq_lr_factors=[1.0],
    batch_size=4, eval_batch_size=16, lr_scale=20.0,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny random model and synthetic data (no downloads)")
    parser.add_argument("--task", choices=["facts", "mcq", "both"], default="both")
    parser.add_argument("--methods", nargs="+", choices=list(BY_NAME), default=list(BY_NAME))
    parser.add_argument("--relations", nargs="+", default=["capital"], help="country_facts relations (facts task)")
    parser.add_argument("--mcq-dir", type=Path, default=ROOT.parent / "shared" / "data" / "mcq",
                        help="folder of multiple-choice JSONL banks ({id, question, label})")
    parser.add_argument("--mcq-split", choices=["paper", "debiased"], default="paper",
                        help="paper: by the model's answers; debiased: right / wrong under all 4 option rotations")
    parser.add_argument("--no-mcq-bias-check", action="store_true",
                        help="skip the letter-bias diagnostics (share of A answers; debiased split counts under the "
                        "paper split): 5 fewer predictions of the MC pool")
    sizes = parser.add_argument_group("sizes (defaults: see FULL / QUICK in knowledge_injection/settings.py)")
    sizes.add_argument("--injection", type=int, help="facts: injection items trained on")
    sizes.add_argument("--injection-held", type=int, help="facts: injection items never trained on")
    sizes.add_argument("--mastered", type=int, help="facts: mastered items used (half reference, half held out)")
    sizes.add_argument("--epochs", type=int, help="facts: epochs per run")
    sizes.add_argument("--lr-factors", type=float, nargs="+", help="facts: sweep = method centre x these")
    sizes.add_argument("--mcq-pool", type=int, help="mcq: questions sampled (evenly per bank) and predicted")
    sizes.add_argument("--mcq-injection", type=int)
    sizes.add_argument("--mcq-injection-held", type=int)
    sizes.add_argument("--mcq-mastered", type=int)
    sizes.add_argument("--mcq-epochs", type=int)
    sizes.add_argument("--mcq-lr-factors", type=float, nargs="+")
    sizes.add_argument("--batch-size", type=int)
    sizes.add_argument("--eval-batch-size", type=int)
    sizes.add_argument("--lr-scale", type=float, help="multiplies every method's lr centre (quick: tiny model)")
    parser.add_argument("--lr", nargs="+", default=[], metavar="METHOD=LR", help="override a method's lr centre")
    parser.add_argument("--forgetting-budget", type=float, default=0.02, help="max forgotten fraction of |M|")
    parser.add_argument("--cpl-density", type=float, default=None,
                        help="cap CPL's support (default: every collaborative coordinate, as the paper)")
    parser.add_argument("--nlora-lambda", type=float, default=None,
                        help="N-LoRA lambda (default: the RMS over linear-weight coordinates of the mean injection "
                        "gradient at the base weights, so that the L1 pull on each coordinate of dW (lambda) is the "
                        "size of a typical task gradient: no published value exists for this model size)")
    parser.add_argument("--replay-per-batch", type=int, default=2, help="M-ref items added to each batch (replay)")
    parser.add_argument("--no-collision", action="store_true", help="skip the two-task collision measurement")
    parser.add_argument("--collision-taus", type=float, nargs="+", default=[0.0, 1e-4, 1e-3, 1e-2],
                        help="collision thresholds, as multiples of each weight's RMS")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plan-only", action="store_true", help="print the plan and time estimate, then stop")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output-md", type=Path, default=ROOT / "benchmarks" / "results" / "knowledge_injection.md")
    parser.add_argument("--output-json", type=Path, default=None, help="default: --output-md with .json")
    parser.add_argument("--render", type=Path, nargs="+", metavar="JSON",
                        help="train nothing: write --output-md from these saved reports (tasks run separately)")
    args = parser.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.output_json = args.output_json or args.output_md.with_suffix(".json")
    args.lr_override = {}
    for entry in args.lr:
        name, _, value = entry.partition("=")
        if name not in BY_NAME or not value:
            parser.error(f"--lr expects METHOD=LR with METHOD in {list(BY_NAME)}, got {entry!r}")
        args.lr_override[name] = float(value)
    return args


@dataclass
class TaskSettings:
    name: str
    injection: int
    injection_held: int
    mastered: int
    epochs: int
    lr_factors: list[float]


def task_settings(args: argparse.Namespace) -> list[TaskSettings]:
    tasks = []
    if args.task in ("facts", "both"):
        tasks.append(TaskSettings("facts", args.injection, args.injection_held, args.mastered, args.epochs,
                                  args.lr_factors))
    if args.task in ("mcq", "both"):
        tasks.append(TaskSettings("mcq", args.mcq_injection, args.mcq_injection_held, args.mcq_mastered,
                                  args.mcq_epochs, args.mcq_lr_factors))
    return tasks


def mean_tokens(tokenizer, items: Sequence[dict]) -> float:
    return sum(len(encode(tokenizer, item).input_ids) for item in items) / max(len(items), 1)


def estimate_minutes(args: argparse.Namespace, task: TaskSettings, pool: int, tokens: float,
                     methods: list[Method]) -> float:
    """Rough wall time on 2 CPU cores from the measured per-token costs above, for the requested sizes."""
    train_item, eval_item = tokens * TRAIN_SECONDS_PER_TOKEN, tokens * EVAL_SECONDS_PER_TOKEN
    trained, reference = task.injection, task.mastered // 2
    eval_pass = (task.injection + task.injection_held + task.mastered) * eval_item
    predictions = 1
    if task.name == "mcq":
        check = not args.no_mcq_bias_check
        predictions = (4 if args.mcq_split == "debiased" else 1 + 4 * check) + check
    seconds = pool * predictions * eval_item + eval_pass  # the split, the bias check, the base model's counts
    seconds += (reference + trained) * train_item * (2 if args.cpl_density else 1)  # selection
    for method in methods:
        per_epoch = trained * train_item * (CPL_STEP_FACTOR if method.kind == "cpl" else 1) + eval_pass
        per_epoch += reference * train_item if method.guard else 0  # g_M refresh
        per_epoch += trained * train_item if method.agem else 0  # one reference batch per step
        per_epoch += math.ceil(trained / args.batch_size) * args.replay_per_batch * train_item if method.replay else 0
        seconds += len(task.lr_factors) * (task.epochs * per_epoch + SUPPORT_SETUP_SECONDS.get(method.support, 0.0))
        seconds += len(task.lr_factors) * reference * train_item if method.support == "dense" else 0  # first sign(g_M)
    if not args.no_collision and task.name == "facts":
        for method in methods:
            if method.name in COLLISION_METHODS:
                seconds += task.epochs * trained * train_item + eval_pass
                seconds += (2 * reference + 1.5 * trained) * train_item if method.name == "cpl" else 0
    return seconds / 60
