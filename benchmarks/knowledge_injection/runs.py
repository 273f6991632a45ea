"""One run of a method (train a fresh base, count after every epoch), and the two-task run that measures collision."""

from __future__ import annotations

import argparse
import math
import resource
import threading
import time

import torch
from peft import PeftModel
from torch import nn
from tqdm.auto import tqdm

from peft_cpl import export_support
from peft_cpl.toolkit.evaluation import predict
from peft_cpl.toolkit.loop import train

from .baselines import collision_rate
from .data import Split, World
from .generic import generic_mastered
from .methods import Method, build
from .selection import Selection
from .settings import TaskSettings


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


def counts(correct: dict[str, bool], split: Split) -> dict[str, int]:
    return {
        "learned": sum(correct[item["id"]] for item in split.injection),
        "forgotten_in": sum(not correct[item["id"]] for item in split.mastered_ref),
        "forgotten_out": sum(not correct[item["id"]] for item in split.mastered_held),
        "heldout_correct": sum(correct[item["id"]] for item in split.injection_held),
    }


def weights(model: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    """CPU float copies of the weights of the named linear modules of a plain (not PEFT-wrapped) model."""
    return {name: model.get_submodule(name).weight.detach().float().cpu().clone() for name in names}


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


def mastered_for(args: argparse.Namespace, world: World, split: Split, method: Method) -> list[dict]:
    """The mastered items the method may use (M-ref, a first part of it, or the generic M); forgetting is counted on
    M-ref and M-held whatever it used."""
    if method.mastered == "generic":
        return generic_mastered(world, args.eval_batch_size)
    if method.mastered_fraction is None:
        return split.mastered_ref
    return split.mastered_ref[: max(1, round(method.mastered_fraction * len(split.mastered_ref)))]


def run_one(args: argparse.Namespace, world: World, task: TaskSettings, split: Split, selection: Selection,
            method: Method, lr: float, seed: int, baseline: dict) -> dict:
    """Train a fresh base with `method` at `lr`; the watch sets are counted every --eval-every steps (the curve)."""
    record: dict = {"method": method.name, "lr": lr, "seed": seed, "optimizer": method.optimizer,
                    "epochs": task.epochs, "curve": [{"step": 0, **baseline}]}
    eval_seconds = 0.0
    steps_per_epoch = math.ceil(len(split.injection) / args.batch_size)
    last_step = task.epochs * steps_per_epoch
    with PeakMemory() as memory:
        mastered = mastered_for(args, world, split, method)
        built = build(args, world.tokenizer, method, lr, world.fresh_base(), split.injection, mastered, selection,
                      cached_support=True, random_seed=seed)
        started, charged = time.perf_counter(), built.setup_seconds  # the selection, once, whether cached or not
        model = built.model
        record["trainable"] = sum(param.numel() for param in model.parameters() if param.requires_grad)

        def evaluate(step: int) -> None:
            nonlocal eval_seconds
            if step % args.eval_every and step != last_step:
                return
            begin = time.perf_counter()
            correct = predict(model, world.tokenizer, split.eval_items, batch_size=args.eval_batch_size)
            eval_seconds += time.perf_counter() - begin
            row = {"step": step, **counts(correct, split)}
            record["curve"].append(row)
            tqdm.write(f"  seed {seed} {task.name} {method.name:<13} lr {lr:.2g} step {step:>3}: learned "
                       f"{row['learned']}/{len(split.injection)}, forgotten {row['forgotten_in']}/"
                       f"{len(split.mastered_ref)} in-set, {row['forgotten_out']}/{len(split.mastered_held)} "
                       f"out-of-set, held-out injection {row['heldout_correct']}/{len(split.injection_held)}")

        if not method.reselect:
            record["losses"] = train(model, built.batches, epochs=task.epochs, optimizer=built.optimizer,
                                     guard=built.guard, loss_fn=built.loss_fn, seed=seed, on_step_end=evaluate,
                                     progress=False)
        else:  # one epoch at a time (same order as above: epoch e shuffles with seed + e), then merge and select again
            record["losses"], setup = [], built.setup_seconds
            for epoch in range(task.epochs):
                if epoch:
                    built = build(args, world.tokenizer, method, lr, model.merge_and_unload(), split.injection,
                                  mastered, selection, cached_support=False, random_seed=seed)
                    model, setup = built.model, setup + built.setup_seconds
                offset = epoch * steps_per_epoch
                record["losses"] += train(model, built.batches, epochs=1, optimizer=built.optimizer,
                                          guard=built.guard, loss_fn=built.loss_fn, seed=seed + epoch,
                                          on_step_end=lambda step, offset=offset: evaluate(step + offset),
                                          progress=False)
            built.setup_seconds = setup
        record["train_seconds"] = time.perf_counter() - started - eval_seconds + charged
    record.update(eval_seconds=eval_seconds, selection_seconds_included=built.setup_seconds,
                  peak_rss_mb=memory.peak_mb, start_rss_mb=memory.start_mb, peak_gpu_mb=memory.gpu_peak_mb)
    if built.guard is not None:
        record["guard_revert_fraction"] = built.guard.revert_fraction
    if built.agem is not None:
        record["agem_projected_steps"] = f"{built.agem.projected}/{built.agem.steps}"
    _, deltas = merged_deltas(model, selection.base_weights)
    record["update_outside_collaborative"] = outside_collaborative_share(deltas, selection.collaborative)
    return record


def collision_run(args: argparse.Namespace, world: World, task: TaskSettings, split: Split, selection: Selection,
                  method: Method, lr: float, seed: int) -> dict:
    """Two injection tasks learned in sequence (task 1 merged, then a fresh adapter for task 2); their collision."""
    half = len(split.injection) // 2
    first, second = split.injection[:half], split.injection[half:]
    deltas, supports = [], []
    model = world.fresh_base()
    base_weights = reference = selection.base_weights
    mastered = mastered_for(args, world, split, method)
    stages = ((first, mastered), (second, mastered + first))  # task 1 is known once learned
    for index, (task_items, known) in enumerate(stages):
        built = build(args, world.tokenizer, method, lr, model, task_items, known, selection, cached_support=False,
                      random_seed=seed + index)
        if method.kind == "cpl":
            supports.append({name: s.indices for name, s in export_support(built.model).supports.items()})
        train(built.model, built.batches, epochs=task.epochs, optimizer=built.optimizer, guard=built.guard,
              loss_fn=built.loss_fn, seed=seed, progress=False)
        model, delta = merged_deltas(built.model, reference)
        deltas.append(delta)
        reference = weights(model, list(reference))
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
