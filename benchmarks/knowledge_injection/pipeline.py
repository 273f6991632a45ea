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

from .analysis import chosen_run
from .data import Split, base_answers, make_split, quick_world, real_world
from .methods import BY_NAME, COLLISION_METHODS
from .render import load, render
from .report import git_commit, machine_description, write_report
from .runs import collision_run, counts, run_one
from .selection import select_once
from .settings import estimate_minutes, lr_grid, mean_tokens, parse_args, task_settings


def split_ids(split: Split) -> dict[str, list[str]]:
    return {key: [item["id"] for item in getattr(split, key)] for key in split.sizes()}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.render:
        report = render(args.render, args.methods, args.lr_override)  # lrs as the reports name them
        write_report(args.output_md, report)
        print(f"Wrote {args.output_md} from {len(args.render)} saved report(s).")
        return report
    started = time.time()
    tasks = task_settings(args)
    methods = [BY_NAME[name] for name in args.methods]
    resuming = args.resume and not args.plan_only and args.output_json.is_file()
    earlier_report = load(args.output_json) if resuming else {}
    previous, previous_methods = earlier_report.get("tasks", {}), earlier_report.get("methods", [])
    for task in tasks:  # before the model is built: one part holds runs of one length and one evaluation grid
        saved = previous.get(task.name)
        now = {"epochs": task.epochs, "eval_every": args.eval_every, "batch_size": args.batch_size}
        if saved is not None and (differ := [key for key, value in now.items() if saved.get(key) != value]):
            raise SystemExit(f"--resume: task {task.name} in {args.output_json} was run with "
                             + ", ".join(f"{key} {saved.get(key)}" for key in differ) + ", this run has "
                             + ", ".join(f"{key} {now[key]}" for key in differ) + "; resume with those settings, "
                             "or write to another --output-json (--render joins parts of different lengths)")
    if args.quick:
        torch.set_num_threads(1)  # a tiny model gains nothing from threads, and loses a lot on a busy machine
    print("Building the model and data ...")
    world = quick_world(args) if args.quick else real_world(args, tasks)
    grid = lr_grid(args, methods)
    report = {
        "command": " ".join(shlex.quote(part) for part in ["python", *sys.orig_argv[1:]]),
        "machine": machine_description(args.device), "model": world.description, "commit": git_commit(),
        "date": time.strftime("%Y-%m-%d %H:%M"), "settings": {k: str(v) for k, v in vars(args).items()},
        "methods": [method.name for method in methods], "tasks": {},
    }
    estimates = {}
    for task in tasks:
        pool = world.items[task.name]
        tokens = mean_tokens(world.tokenizer, pool)
        estimates[task.name] = None if args.quick else estimate_minutes(args, task, len(pool), tokens, methods)
        estimate = "" if args.quick else f"; estimated {estimates[task.name]:.0f} min on 2 CPU cores"
        print(f"[{task.name}] plan: {len(pool)} questions (~{tokens:.0f} tokens each); per seed injection "
              f"{task.injection} trained + {task.injection_held} held out, mastered {task.mastered} (half "
              f"reference); seeds {args.seeds}; {len(methods)} methods x their lrs x {task.epochs} epochs, counted "
              f"every {args.eval_every} steps{estimate}")
        for method in methods:
            sweep = ", ".join(f"{lr:.2g}" for lr in grid[method.name])
            print(f"    {method.name:<15} {method.optimizer:<6} lr {sweep}")
    if not args.quick:
        print(f"Estimated total: {sum(estimates.values()):.0f} min.")
    if args.plan_only:
        return report

    running = {task.name for task in tasks}
    report["tasks"] = {name: task for name, task in previous.items() if name not in running}  # kept as they were
    report["methods"] = list(dict.fromkeys([*previous_methods, *report["methods"]]))

    def save() -> None:
        atomic.write_text(args.output_json, json.dumps(report, indent=1))

    for task in tasks:
        task_started = time.time()
        base = world.fresh_base()
        print(f"[{task.name}] the base model's answers to {len(world.items[task.name])} questions ...")
        mastered, injection, info = base_answers(args, world, task, base)
        result = {"task": task.name, "split": info, "epochs": task.epochs, "eval_every": args.eval_every,
                  "batch_size": args.batch_size, "lr_grid": grid, "estimate_minutes": estimates[task.name],
                  "seeds": {}}
        if task.name in previous:  # --resume: the earlier methods, sweeps and seeds not run now stay in the report
            swept = previous[task.name]["lr_grid"]
            result["lr_grid"] = {method: sorted({*swept.get(method, []), *grid.get(method, [])})
                                 for method in {**swept, **grid}}
            result["seeds"] = dict(previous[task.name]["seeds"])
        report["tasks"][task.name] = result
        print(f"[{task.name}] {len(mastered)} mastered, {len(injection)} not; by relation: {info['relations']}")
        splits = {seed: make_split(task, mastered, injection, info, seed) for seed in args.seeds}
        for seed, split in splits.items():  # before any run: a resumed seed must have the split it had
            earlier = result["seeds"].get(str(seed))
            if earlier is not None and earlier["ids"] != split_ids(split):
                raise SystemExit(f"--resume: seed {seed} of task {task.name} in {args.output_json} has another split "
                                 "than this run's (another pool, model or sizes?); resume with the settings it was "
                                 "run with, or write to another --output-json")
        for seed, split in splits.items():
            if len(split.mastered_ref) < 1 or len(split.injection) < 2:
                print(f"[{task.name}] seed {seed} skipped: too few mastered or injection items {split.sizes()}")
                continue
            baseline = counts(predict(base, world.tokenizer, split.eval_items, batch_size=args.eval_batch_size),
                              split)
            print(f"[{task.name}] seed {seed}: split {split.sizes()}; base on the watch sets: {baseline}; "
                  "collaborative selection ...")
            selection = select_once(args, world, split)
            summary = selection.report.summary()
            outcome = {
                "seed": seed, "sizes": split.sizes(), "baseline": baseline,
                "ids": split_ids(split),
                "selection": summary, "selection_seconds": selection.seconds, "nlora_lambda": selection.nlora_lambda,
                "runs": [], "collision": [],
            }
            earlier = result["seeds"].get(str(seed))
            if earlier is not None:
                outcome["runs"] = list(earlier["runs"])
                print(f"[{task.name}] seed {seed}: {len(outcome['runs'])} runs kept from {args.output_json}")
            result["seeds"][str(seed)] = outcome
            print(f"[{task.name}] seed {seed}: {summary['collaborative_fraction']:.1%} collaborative, CPL density "
                  f"{selection.density:.3f}, cos(g_M, g_I) {summary['cosine']:+.3f} ({selection.seconds:.0f} s)")
            plan = [(method, lr) for method in methods for lr in grid[method.name]]
            done = {(run["method"], run["lr"]) for run in outcome["runs"]}
            plan = [(method, lr) for method, lr in plan if (method.name, lr) not in done]
            for method, lr in tqdm(plan, desc=f"{task.name} seed {seed}"):
                outcome["runs"].append(run_one(args, world, task, split, selection, method, lr, seed, baseline))
                gc.collect()
                save()
            if args.collision and task.name == "facts" and seed == args.seeds[0]:
                for method in [m for m in methods if m.name in COLLISION_METHODS]:
                    runs = [run for run in outcome["runs"] if run["method"] == method.name]
                    lr = chosen_run(runs, len(split.injection))["lr"]
                    print(f"[{task.name}] collision: {method.name} at lr {lr:.2g}, two tasks in sequence ...")
                    outcome["collision"].append(collision_run(args, world, task, split, selection, method, lr, seed))
                    gc.collect()
                    save()
            outcome["finished"] = True
            save()
        del base
        result["elapsed_minutes"] = (time.time() - task_started) / 60
        save()
    report["elapsed_minutes"] = (time.time() - started) / 60
    save()
    write_report(args.output_md, report)
    print(f"Wrote {args.output_md}, {args.output_json} and the plots ({report['elapsed_minutes']:.1f} min in all).")
    return report
