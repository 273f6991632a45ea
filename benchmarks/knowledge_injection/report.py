"""The report: markdown tables and plots from the saved JSON, so that parts run separately can be joined (--render)."""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
from pathlib import Path

import numpy as np
import torch

import peft_cpl
from peft_cpl.tuner import atomic

from .analysis import LEVELS, METRICS, at_level, chosen_run, mean_ci, paired, seed_summary, verdict
from .methods import METHODS
from .settings import ROOT

BASELINES = ("full-adamw", "lora", "replay", "cpl", "cpl-guard", "cpl-d0.05")  # paired tables against each present
ANSWERED_BY_ALL = ("full-adamw", "lora")  # plain-words answers for every method; against the others, CPL's family
SUMMARY_KEYS = [f"forgotten_out@{level:g}" for level in LEVELS] + ["forgotten_in@0.9", "area_forgotten_out",
                                                                     "area_forgotten_in"]
DIFF_KEYS = [f"forgotten_out@{level:g}" for level in LEVELS] + ["area_forgotten_out", "forgotten_in@0.9"]
ANSWER_KEYS = ("forgotten_out@0.5", "forgotten_out@0.9", "area_forgotten_out")


def ci_cell(values: list[float], seeds: int) -> str:
    """mean [95% CI], and how many seeds it rests on when fewer than all."""
    if not values:
        return "not reached"
    mean, low, high = mean_ci(values)
    text = f"{mean:.1f}" if low is None else f"{mean:.1f} [{low:.1f}, {high:.1f}]"
    return text if len(values) == seeds else f"{text} (n={len(values)})"


def summaries(task: dict) -> dict[str, dict[int, dict]]:
    """method -> seed -> the summary of its chosen run on that seed."""
    table: dict[str, dict[int, dict]] = {}
    for seed, outcome in task["seeds"].items():
        injection = outcome["sizes"]["injection"]
        for method in dict.fromkeys(run["method"] for run in outcome["runs"]):
            runs = [run for run in outcome["runs"] if run["method"] == method]
            table.setdefault(method, {})[int(seed)] = seed_summary(chosen_run(runs, injection), injection)
    return table


def label(key: str) -> str:
    metric, _, level = key.partition("@")
    where = "out" if metric.endswith("out") else "in"
    return f"area fgt {where} (0-90%)" if key.startswith("area") else f"fgt {where} @{float(level):.0%}"


def describe(name: str, task: dict, seeds: list[str], methods: list[str]) -> list[str]:
    sizes, split = task["seeds"][seeds[0]]["sizes"], task["split"]
    lines = [f"## Task: {name}", "",
             f"- Split {split['split']}: of {split['pool']} questions, {split['mastered_available']} mastered and "
             f"{split['injection_available']} not. Each seed draws its own sets, evenly over the relations: "
             f"injection {sizes['injection']} trained + {sizes['injection_held']} held out, mastered "
             f"{sizes['mastered_ref']} reference (M-ref) + {sizes['mastered_held']} held out (M-held)."]
    if "relations" in split:
        lines.append("- Relations (mastered / not): " + ", ".join(
            f"{rel} {c['mastered']}/{c['injection']}" for rel, c in split["relations"].items()) + ".")
    if "mastered_label_A_share" in split:
        lines.append(f"- Letter bias: {split['mastered_label_A_share']:.0%} of the mastered questions have gold "
                     f"answer A (pool: {split['pool_label_A_share']:.0%}).")
    unfinished = [seed for seed in seeds if not task["seeds"][seed].get("finished")]
    lines.append(f"- Seeds: {', '.join(seeds)} ({len(seeds)}); each run: {task['epochs']} epochs at batch "
                 f"{task['batch_size']}, the watch sets counted every {task['eval_every']} steps"
                 + (f"; seeds {', '.join(unfinished)} were stopped part-way (their finished runs are used)"
                    if unfinished else "") + ".")
    shorter = [run for seed in seeds for run in task["seeds"][seed]["runs"] if run.get("epochs", task["epochs"])
               < task["epochs"]]
    if shorter:
        lengths = sorted({run["epochs"] for run in shorter})
        lines.append(f"- Joined from parts of {', '.join(map(str, lengths))} and {task['epochs']} epochs: "
                     f"{len(shorter)} runs that reached 90% learned within {', '.join(map(str, lengths))} epochs "
                     f"stand in for {task['epochs']}-epoch runs. Training does not depend on the epochs still to come "
                     "(constant lr, epoch e shuffled with seed + e), so every summary point is already in their "
                     "curves; their curves end earlier.")
    if differences := task.get("prefix_differences"):
        lines.append(f"- {len(differences)} (method, lr, seed) ran at both lengths: over their common steps the "
                     f"counts differ by at most {max(differences)} items (0 in {differences.count(0)} of them; parts "
                     "run with other torch thread counts round differently).")
    lines.append("- Selection at the base weights, per seed: " + "; ".join(
        f"seed {seed}: {task['seeds'][seed]['selection']['collaborative_fraction']:.1%} collaborative, CPL density "
        f"{task['seeds'][seed]['selection']['support_fraction']:.3f}" for seed in seeds) + ".")
    lines.append("- Sweeps (fixed before any result): " + "; ".join(
        f"{method} " + ", ".join(f"{lr:.2g}" for lr in lrs) for method, lrs in task["lr_grid"].items()
        if method in methods) + ".")
    if left_out := {method: lrs for method, lrs in task.get("lrs_left_out", {}).items() if method in methods}:
        lines.append("- Left out of this report (`--lr` at `--render`; the rule chose among the rest): " + "; ".join(
            f"{method} " + ", ".join(f"{lr:.2g}" for lr in lrs) for method, lrs in left_out.items()) + ".")
    return lines


def markdown_task(name: str, task: dict) -> list[str]:
    seeds = sorted(task["seeds"], key=int)
    sizes = task["seeds"][seeds[0]]["sizes"]
    table = summaries(task)
    methods = list(table)
    n = len(seeds)
    lines = describe(name, task, seeds, methods)
    lines += ["", "### Each method at its chosen learning rate", "",
              "Rule, the same for every method and fixed in advance: per seed, among the lrs whose run reaches 90% "
              "learned, the one forgetting least out of set there (then in set, then the smaller lr); otherwise the "
              f"run that learned most. Cells: forgotten items (out = of {sizes['mastered_held']} M-held, in = of "
              f"{sizes['mastered_ref']} M-ref) where the run first reaches 50 / 75 / 90% of the "
              f"{sizes['injection']} trained items, interpolated between counts; the area is the mean forgotten "
              "count over learned levels 0-90%. Mean over seeds [95% percentile-bootstrap CI]; n = seeds that "
              "reached the level, when fewer than all.", "",
              "| method | lr per seed | reached 90% | " + " | ".join(label(key) for key in SUMMARY_KEYS) + " |",
              "| --- | --- | ---: |" + " ---: |" * len(SUMMARY_KEYS)]
    for method in methods:
        per_seed = table[method]
        reached = sum(summary["forgotten_out@0.9"] is not None for summary in per_seed.values())
        cells = [method, ", ".join(f"{per_seed[seed]['lr']:.2g}" for seed in sorted(per_seed)),
                 f"{reached}/{len(per_seed)}"]
        cells += [ci_cell([s[key] for s in per_seed.values() if s[key] is not None], len(per_seed))
                  for key in SUMMARY_KEYS]
        lines.append("| " + " | ".join(cells) + " |")
    answers = []
    for baseline in [name for name in BASELINES if name in table]:
        lines += ["", f"### Paired difference to {baseline} (method minus {baseline} on the same seed; negative = "
                      "forgets less)", "", "| method | " + " | ".join(label(key) for key in DIFF_KEYS) + " |",
                  "| --- |" + " ---: |" * len(DIFF_KEYS)]
        for method in [name for name in methods if name != baseline]:
            cells = [method]
            for key in DIFF_KEYS:
                differences = paired({seed: s[key] for seed, s in table[method].items()},
                                     {seed: s[key] for seed, s in table[baseline].items()})
                cells.append(ci_cell(differences, n))
                answered = baseline in ANSWERED_BY_ALL or method.startswith("cpl")
                if key in ANSWER_KEYS and differences and answered:
                    answers.append((method, baseline, key, len(differences), *mean_ci(differences)))
            lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "### In plain words", ""]
    if n < 5:
        lines.append(f"- **Screening only: {n} seed(s).** A percentile bootstrap over so few seeds understates the "
                     "uncertainty; nothing below is a confident verdict before the 5-seed confirmation.")
    for method, baseline, key, count, mean, low, high in answers:
        span = "" if low is None else f" (95% CI [{low:+.1f}, {high:+.1f}], {count} seeds)"
        lines.append(f"- {method} vs {baseline}, {label(key)}: {mean:+.1f} items{span}: {verdict(low, high, count)}.")
    lines += ["", f"![forgotten vs learned, {name}]({task['plot']})", ""]
    return lines + every_run(task, seeds)


def every_run(task: dict, seeds: list[str]) -> list[str]:
    lines = ["### Every run", "", "Curve points: step: learned / forgotten in / forgotten out / held-out I.", "",
             "| seed | method | lr | curve | train s | eval s | extra |",
             "| ---: | --- | ---: | --- | ---: | ---: | --- |"]
    for seed in seeds:
        for run in task["seeds"][seed]["runs"]:
            curve = ", ".join(f"{p['step']}: {p['learned']}/{p['forgotten_in']}/{p['forgotten_out']}/"
                              f"{p['heldout_correct']}" for p in run["curve"])
            extra = []
            if "guard_revert_fraction" in run:
                extra.append(f"guard reverted {run['guard_revert_fraction']:.1%}")
            if "agem_projected_steps" in run:
                extra.append(f"A-GEM projected {run['agem_projected_steps']} steps")
            extra.append(f"update off collab. set {run['update_outside_collaborative']:.1%}")
            lines.append(f"| {seed} | {run['method']} | {run['lr']:.2g} | {curve} | {run['train_seconds']:.0f} | "
                         f"{run['eval_seconds']:.0f} | {'; '.join(extra)} |")
    collision = task["seeds"][seeds[0]].get("collision")
    if collision:
        taus = list(collision[0]["collision"])
        lines += ["", f"### Collision between two injection tasks learned in sequence (seed {seeds[0]})", "",
                  "| method | lr | " + " | ".join(f"collision tau={tau}" for tau in taus)
                  + " | support overlap | task 1 retained | task 2 learned | fgt in | fgt out |",
                  "| --- | ---: |" + " ---: |" * (len(taus) + 5)]
        for entry in collision:
            overlap = f"{entry['support_overlap']:.2%}" if "support_overlap" in entry else "-"
            one, two = entry["task_sizes"]
            lines.append(f"| {entry['method']} | {entry['lr']:.2g} | "
                         + " | ".join(f"{entry['collision'][tau]:.2%}" for tau in taus)
                         + f" | {overlap} | {entry['task1_retained']}/{one} | {entry['task2_learned']}/{two} | "
                         f"{entry['forgotten_in']} | {entry['forgotten_out']} |")
    return lines + [""]


def write_report(path: Path, report: dict) -> None:
    """The markdown and one plot per task, next to it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["# Knowledge injection: learned vs forgotten, over seeds", "",
             f"- Command: `{report['command']}`",
             f"- Machine: {report['machine']}",
             f"- Model: {report['model']}; commit {report['commit']}; {report['date']}",
             "- Methods: " + "; ".join(f"**{m.name}** {m.about} ({m.optimizer})" for m in METHODS
                                      if m.name in report["methods"]), ""]
    for name, task in report["tasks"].items():
        if not any(outcome["runs"] for outcome in task["seeds"].values()):
            continue
        task["plot"] = f"{path.stem}_{name}.png"
        plot_task(path.parent / task["plot"], name, task)
        lines += markdown_task(name, task)
    atomic.write_text(path, "\n".join(lines) + "\n")


def chosen_curves(task: dict, method: str) -> list[tuple[dict, int]]:
    chosen = []
    for outcome in task["seeds"].values():
        runs = [run for run in outcome["runs"] if run["method"] == method]
        if runs:
            chosen.append((chosen_run(runs, outcome["sizes"]["injection"]), outcome["sizes"]["injection"]))
    return chosen


def plot_task(path: Path, name: str, task: dict) -> None:
    """Mean forgotten vs learned over seeds (each seed's chosen run), with its 95% bootstrap band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = np.linspace(0.0, 1.0, 41)
    figure, axes = plt.subplots(1, 2, figsize=(13, 5), sharex=True)
    colors = plt.get_cmap("tab10")
    for index, method in enumerate(summaries(task)):
        chosen = chosen_curves(task, method)
        for axis, metric in zip(axes, METRICS):
            xs, means, lows, highs = [], [], [], []
            for level in levels:
                values = [point[metric] for run, injection in chosen
                          if (point := at_level(run["curve"], level * injection)) is not None]
                if len(values) < max(1, (len(chosen) + 1) // 2):  # drawn while at least half the seeds reach it
                    break
                mean, low, high = mean_ci(values)
                xs.append(level)
                means.append(mean)
                lows.append(mean if low is None else low)
                highs.append(mean if high is None else high)
            color = colors(index % 10)
            axis.plot(xs, means, color=color, label=method, linewidth=1.5, linestyle="-" if index < 10 else "--")
            axis.fill_between(xs, lows, highs, color=color, alpha=0.12)
    sizes = next(iter(task["seeds"].values()))["sizes"]
    for axis, metric in zip(axes, METRICS):
        out = metric.endswith("out")
        axis.set_title(f"{name}: forgotten {'out of set (M-held)' if out else 'in set (M-ref)'}, "
                       f"{len(task['seeds'])} seeds, mean and 95% CI")
        axis.set_xlabel(f"learned (fraction of {sizes['injection']} trained injection items)")
        axis.set_ylabel(f"forgotten (items of {sizes['mastered_held' if out else 'mastered_ref']})")
        axis.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="upper left")
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

