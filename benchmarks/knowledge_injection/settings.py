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
from .facts import KINDS
from .methods import BY_NAME, DEFAULT_METHODS, Method

ROOT = Path(__file__).resolve().parents[2]

# Measured on the project's machine (2 CPU cores, SmolLM2-135M, fp32), used only to print a time estimate:
EVAL_SECONDS_PER_TOKEN = 6.5 / (184 * 49)  # predict: 6.5 s for 184 items of ~49 tokens at batch 32 (shared prefix)
TRAIN_SECONDS_PER_TOKEN = 3.0 / (8 * 50)  # one fwd+bwd+step at batch 8 of ~50 tokens: ~3 s (selection: the same)
SUPPORT_SETUP_SECONDS = {"random": 15.0, "magnitude": 3.0}  # building the support when the adapter is created
CPL_STEP_FACTOR = 1.4  # a CPL step (sparse delta on ~60% of the linear weights) against a full AdamW step

# Full-run sizes (issue 13): |M| = 120 (60 reference, 60 held out), 48 injection items trained and 16 held out, each
# seed with its own split and order; 4 epochs of 6 steps at batch 8, the watch sets evaluated every 3 steps (9 points
# per curve with the base model's). One run is ~3 min, so a part of the full run (--seeds, --methods) is kept to
# <= 60 min; see the plan in benchmarks/RESULTS.md.
FULL = dict(
    injection=48, injection_held=16, mastered=120, epochs=4, eval_every=3, seeds=[0, 1, 2, 3, 4],
    mcq_pool=240, mcq_injection=48, mcq_injection_held=16, mcq_mastered=120, mcq_epochs=4,
    batch_size=8, eval_batch_size=32, lr_scale=1.0,
)
QUICK = dict(
    injection=8, injection_held=6, mastered=16, epochs=4, eval_every=2, seeds=[0, 1],
    mcq_pool=48, mcq_injection=8, mcq_injection_held=4, mcq_mastered=12, mcq_epochs=2,
    batch_size=4, eval_batch_size=16, lr_scale=20.0,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny random model and synthetic data (no downloads)")
    parser.add_argument("--task", choices=["facts", "mcq", "both"], default="facts",
                        help="facts (default): free-form facts; mcq: the multiple-choice banks (opt-in: SmolLM2's "
                        "MC mastery is mostly answer-letter bias)")
    parser.add_argument("--methods", nargs="+", choices=list(BY_NAME),
                        help=f"methods to run (default: {' '.join(DEFAULT_METHODS)}); with --render, the ones to "
                        "keep from the saved reports (default: all)")
    parser.add_argument("--kinds", nargs="+", choices=list(KINDS), default=list(KINDS), help="fact kinds (facts task)")
    parser.add_argument("--mcq-dir", type=Path, default=ROOT.parent / "shared" / "data" / "mcq",
                        help="folder of multiple-choice JSONL banks ({id, question, label})")
    parser.add_argument("--mcq-split", choices=["paper", "debiased"], default="paper",
                        help="paper: by the model's answers; debiased: right / wrong under all 4 option rotations")
    parser.add_argument("--no-mcq-bias-check", action="store_true",
                        help="skip the letter-bias diagnostics (share of A answers; debiased split counts under the "
                        "paper split): 5 fewer predictions of the MC pool")
    sizes = parser.add_argument_group("sizes (defaults: see FULL / QUICK in knowledge_injection/settings.py)")
    sizes.add_argument("--seeds", type=int, nargs="+", help="each seed: its own split, data order and initialisation")
    sizes.add_argument("--injection", type=int, help="facts: injection items trained on")
    sizes.add_argument("--injection-held", type=int, help="facts: injection items never trained on")
    sizes.add_argument("--mastered", type=int, help="facts: mastered items used (half reference, half held out)")
    sizes.add_argument("--epochs", type=int, help="facts: epochs per run")
    sizes.add_argument("--eval-every", type=int, help="evaluate the watch sets every this many steps")
    sizes.add_argument("--mcq-pool", type=int, help="mcq: questions sampled (evenly per bank) and predicted")
    sizes.add_argument("--mcq-injection", type=int)
    sizes.add_argument("--mcq-injection-held", type=int)
    sizes.add_argument("--mcq-mastered", type=int)
    sizes.add_argument("--mcq-epochs", type=int)
    sizes.add_argument("--batch-size", type=int)
    sizes.add_argument("--eval-batch-size", type=int)
    sizes.add_argument("--lr-scale", type=float, help="multiplies every method's sweep (quick: tiny model)")
    parser.add_argument("--lr", nargs="+", default=[], metavar="METHOD=LR[,LR...]",
                        help="replace a method's learning-rate sweep; with --render, keep only these lrs of it, as "
                        "the reports name them (the report names the rest as left out)")
    parser.add_argument("--cpl-density", type=float, default=None,
                        help="cap CPL's support (default: every collaborative coordinate, as the paper)")
    parser.add_argument("--nlora-lambda", type=float, default=None,
                        help="N-LoRA lambda (default: the RMS over linear-weight coordinates of the mean injection "
                        "gradient at the base weights, so that the L1 pull on each coordinate of dW (lambda) is the "
                        "size of a typical task gradient: no published value exists for this model size)")
    parser.add_argument("--replay-per-batch", type=int, default=2, help="M-ref items added to each batch (replay)")
    parser.add_argument("--collision", action="store_true",
                        help="also measure two-task collision (N-LoRA's metric) on the first seed")
    parser.add_argument("--collision-taus", type=float, nargs="+", default=[0.0, 1e-4, 1e-3, 1e-2],
                        help="collision thresholds, as multiples of each weight's RMS")
    parser.add_argument("--plan-only", action="store_true", help="print the plan and time estimate, then stop")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output-md", type=Path, default=ROOT / "benchmarks" / "results" / "knowledge_injection.md")
    parser.add_argument("--output-json", type=Path, default=None, help="default: --output-md with .json")
    parser.add_argument("--resume", action="store_true",
                        help="keep what --output-json already holds (its other seeds and tasks as they are; the "
                        "runs of these seeds if their splits are the same) and run the rest")
    parser.add_argument("--render", type=Path, nargs="+", metavar="JSON",
                        help="train nothing: write --output-md from these saved reports (parts run separately)")
    args = parser.parse_args(argv)
    if args.methods is None and not args.render:
        args.methods = list(DEFAULT_METHODS)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for key in ("injection", "mastered", "epochs", "eval_every", "batch_size", "eval_batch_size"):
        if getattr(args, key) < 1:
            parser.error(f"--{key.replace('_', '-')} must be at least 1, got {getattr(args, key)}")
    args.output_json = args.output_json or args.output_md.with_suffix(".json")
    args.lr_override = {}
    for entry in args.lr:
        name, _, values = entry.partition("=")
        try:
            lrs = tuple(float(value) for value in values.split(","))
        except ValueError:
            lrs = ()
        if name not in BY_NAME or not lrs or min(lrs) <= 0:
            parser.error(f"--lr expects METHOD=LR[,LR...] with METHOD in {list(BY_NAME)} and positive LRs, "
                         f"got {entry!r}")
        args.lr_override[name] = lrs
    return args


@dataclass
class TaskSettings:
    name: str
    injection: int
    injection_held: int
    mastered: int
    epochs: int


def task_settings(args: argparse.Namespace) -> list[TaskSettings]:
    tasks = []
    if args.task in ("facts", "both"):
        tasks.append(TaskSettings("facts", args.injection, args.injection_held, args.mastered, args.epochs))
    if args.task in ("mcq", "both"):
        tasks.append(TaskSettings("mcq", args.mcq_injection, args.mcq_injection_held, args.mcq_mastered,
                                  args.mcq_epochs))
    return tasks


def lr_grid(args: argparse.Namespace, methods: list[Method]) -> dict[str, list[float]]:
    """Each method's sweep; --quick keeps its middle two points (a pipeline check, not a measurement)."""
    grid = {}
    for method in methods:
        lrs = args.lr_override.get(method.name, method.lrs)
        lrs = lrs[1:3] if args.quick and len(lrs) > 2 and method.name not in args.lr_override else lrs
        grid[method.name] = [lr * args.lr_scale for lr in lrs]
    return grid


def mean_tokens(tokenizer, items: Sequence[dict]) -> float:
    return sum(len(encode(tokenizer, item).input_ids) for item in items) / max(len(items), 1)


def estimate_minutes(args: argparse.Namespace, task: TaskSettings, pool: int, tokens: float,
                     methods: list[Method]) -> float:
    """Rough wall time on 2 CPU cores from the measured per-token costs above, for the requested sizes."""
    train_item, eval_item = tokens * TRAIN_SECONDS_PER_TOKEN, tokens * EVAL_SECONDS_PER_TOKEN
    trained, reference = task.injection, task.mastered // 2
    eval_pass = (task.injection + task.injection_held + task.mastered) * eval_item
    steps = task.epochs * math.ceil(trained / args.batch_size)
    evaluations = math.ceil(steps / args.eval_every)
    seconds = pool * eval_item  # the base model's answers (cached after the first run)
    per_seed = eval_pass + (reference + trained) * train_item * (2 if args.cpl_density else 1)  # baseline, selection
    grid = lr_grid(args, methods)
    for method in methods:
        per_epoch = trained * train_item * (CPL_STEP_FACTOR if method.kind == "cpl" else 1)
        per_epoch += reference * train_item if method.guard else 0  # g_M refresh
        per_epoch += trained * train_item if method.agem else 0  # one reference batch per step
        per_epoch += math.ceil(trained / args.batch_size) * args.replay_per_batch * train_item if method.replay else 0
        per_run = task.epochs * per_epoch + evaluations * eval_pass + SUPPORT_SETUP_SECONDS.get(method.support, 0.0)
        per_run += reference * train_item if method.support == "dense" else 0  # first sign(g_M)
        per_seed += len(grid[method.name]) * per_run
    return (seconds + len(args.seeds) * per_seed) / 60
