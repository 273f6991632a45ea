"""The report: markdown tables and plots from the saved JSON, so that separately run tasks can be joined (--render)."""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import subprocess
from pathlib import Path

import torch

import peft_cpl
from peft_cpl.tuner import atomic

from .methods import METHODS
from .scoring import best_points, matched_learning
from .settings import ROOT


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

