"""The benchmark from start to end: for each task, split, select once, sweep every method, measure collision, report.

Every run is saved as soon as it ends, so a stopped benchmark leaves what it measured (see --render).
"""

from __future__ import annotations

import gc
import json
import shlex
import sys
import time

import torch
from tqdm.auto import tqdm

from peft_cpl.toolkit.evaluation import predict
from peft_cpl.tuner import atomic

from .data import make_split, quick_world, real_world
from .methods import BY_NAME, COLLISION_METHODS
from .report import git_commit, machine_description, plot_task, render, write_markdown
from .runs import collision_run, counts, run_one
from .scoring import best_points
from .selection import select_once
from .settings import estimate_minutes, mean_tokens, parse_args, task_settings


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
        "command": " ".join(shlex.quote(part) for part in ["python", *sys.orig_argv[1:]]),
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
            result["runs"].append(run_one(args, world, task, split, selection, method, lr))
            gc.collect()
            save()
        if not args.no_collision and task.name == "facts":
            mastered_total = len(split.mastered_ref) + len(split.mastered_held)
            for method in [m for m in methods if m.name in COLLISION_METHODS]:
                under, best = best_points(result["runs"], method.name, args.forgetting_budget, mastered_total)
                lr = (under or best)[0]["lr"]
                print(f"[{task.name}] collision: {method.name} at lr {lr:.2g}, two tasks in sequence ...")
                result["collision"].append(collision_run(args, world, task, split, selection, method, lr))
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


