"""Join reports saved by separate parts of the benchmark (by seed or by method group) into one."""

from __future__ import annotations

import json
import math
from pathlib import Path

from .analysis import AREA_UPTO, LEVELS, at_level

TOP_LEVEL = max(*LEVELS, AREA_UPTO)  # a run that reached it has every summary point in its curve

REPORT_KEYS = {"command", "machine", "model", "commit", "date", "methods", "tasks"}


def load(path: Path) -> dict:
    try:
        report = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise SystemExit(f"--render: cannot read {path} as a report of this script ({error})") from None
    missing = REPORT_KEYS - set(report) if isinstance(report, dict) else REPORT_KEYS
    if missing:
        raise SystemExit(f"--render: {path} is JSON but not a report of this script (no {sorted(missing)})")
    if any(not isinstance(task, dict) or "seeds" not in task for task in report["tasks"].values()):
        raise SystemExit(f"--render: {path} is a report of an older version of this script (no seeds); rerun it")
    return report


def keep_methods(report: dict, methods: list[str] | None) -> dict:
    if methods is None:
        return report
    kept = {**report, "methods": [name for name in report["methods"] if name in methods], "tasks": {}}
    for name, task in report["tasks"].items():
        seeds = {seed: {**outcome, "runs": [run for run in outcome["runs"] if run["method"] in methods]}
                 for seed, outcome in task["seeds"].items()}
        seeds = {seed: outcome for seed, outcome in seeds.items() if outcome["runs"]}
        lr_grid = {method: lrs for method, lrs in task["lr_grid"].items() if method in methods}
        kept["tasks"][name] = {**task, "seeds": seeds, "lr_grid": lr_grid}
    return kept


def among(lr: float, lrs) -> bool:
    """Whether an lr is one of these, as a float read back from JSON or typed on the command line."""
    return any(math.isclose(lr, each, rel_tol=1e-9) for each in lrs)


def keep_lrs(report: dict, lrs: dict[str, list[float]]) -> dict:
    """Only these lrs of a method's sweep; the task records the rest as left out, so the report can say so."""
    def kept(method: str, lr: float) -> bool:
        return method not in lrs or among(lr, lrs[method])

    thinned = {**report, "tasks": {}}
    for name, task in report["tasks"].items():
        left_out = {method: [lr for lr in grid if not kept(method, lr)] for method, grid in task["lr_grid"].items()}
        seeds = {seed: {**outcome, "runs": [run for run in outcome["runs"] if kept(run["method"], run["lr"])]}
                 for seed, outcome in task["seeds"].items()}
        thinned["tasks"][name] = {
            **task, "seeds": {seed: outcome for seed, outcome in seeds.items() if outcome["runs"]},
            "lr_grid": {method: [lr for lr in grid if kept(method, lr)] for method, grid in task["lr_grid"].items()},
            "lrs_left_out": {method: lrs for method, lrs in left_out.items() if lrs}}
    return thinned


def check_lrs_named(reports: list[dict], only_lrs: dict[str, list[float]]) -> None:
    for method, wanted in only_lrs.items():
        swept = {lr for report in reports for task in report["tasks"].values()
                 for lr in task["lr_grid"].get(method, [])}
        if not swept:
            raise SystemExit(f"--render: --lr names {method}, which none of these reports ran (or --methods left "
                             "it out)")
        if unknown := [lr for lr in wanted if not among(lr, swept)]:
            raise SystemExit(f"--render: --lr {method}=" + ",".join(f"{lr:g}" for lr in unknown) + " names no lr "
                             f"of {method} in these reports (swept: {', '.join(f'{lr:g}' for lr in sorted(swept))})")


def render(paths: list[Path], methods: list[str] | None = None,
           only_lrs: dict[str, list[float]] | None = None) -> dict:
    """One report from several: seeds are joined, and runs of the same seed are joined by (method, lr); `methods`
    keeps only those (a confirmation's methods out of parts that also hold screened levers), and `only_lrs` those
    lrs of a method's sweep (a comparison over part of it, for instance where some lrs were not rerun longer: the
    report names what it left out).

    The same seed must have the same split in every part (it does when the parts ran on the same pool and model).
    Parts may differ in length (`--epochs`): the report has the longest, and a shorter run stands in for a longer one
    only if it reached 90% learned, because training does not depend on the number of epochs still to come
    (constant lr, epoch e shuffled with seed + e), so every summary point of the longer run is already in its curve.
    """
    reports = [keep_methods(load(path), methods) for path in paths]
    check_lrs_named(reports, only_lrs or {})
    reports = [keep_lrs(report, only_lrs or {}) for report in reports]
    if methods is not None:
        found = {name for report in reports for name in report["methods"]}
        if missing := [name for name in methods if name not in found]:
            raise SystemExit(f"--render: no saved report has a run of {', '.join(missing)}; drop it from --methods "
                             "or add the part that ran it")
        kept = [(path, report) for path, report in zip(paths, reports) if report["methods"]]
        paths, reports = [path for path, _ in kept], [report for _, report in kept]
    merged: dict = {key: "; ".join(dict.fromkeys(str(report[key]) for report in reports))
                    for key in ("command", "machine", "model", "commit", "date")}
    merged["methods"] = list(dict.fromkeys(name for report in reports for name in report["methods"]))
    merged["tasks"] = {}
    for path, report in zip(paths, reports):
        for name, task in report["tasks"].items():
            into = merged["tasks"].setdefault(name, {**task, "seeds": {}, "lr_grid": {}, "lrs_left_out": {}})
            for key in ("eval_every", "batch_size"):
                if into[key] != task[key]:
                    raise SystemExit(f"--render: {path} has {key} {task[key]}, another part {into[key]}")
            into["epochs"] = max(into["epochs"], task["epochs"])
            for method, lrs in task["lr_grid"].items():
                into["lr_grid"][method] = sorted({*into["lr_grid"].get(method, []), *lrs})
            for method, lrs in task["lrs_left_out"].items():
                into["lrs_left_out"][method] = sorted({*into["lrs_left_out"].get(method, []), *lrs})
            for seed, outcome in task["seeds"].items():
                runs = [{**run, "epochs": run.get("epochs", task["epochs"])} for run in outcome["runs"]]
                if seed not in into["seeds"]:
                    into["seeds"][seed] = {**outcome, "runs": runs}
                    continue
                joined = into["seeds"][seed]
                if joined["ids"] != outcome["ids"]:
                    raise SystemExit(f"--render: seed {seed} of task {name} has another split in {path} than in an "
                                     "earlier part (another pool or model?); parts must share them")
                index = {(run["method"], run["lr"]): position for position, run in enumerate(joined["runs"])}
                for run in runs:
                    position = index.get((run["method"], run["lr"]))
                    if position is None:
                        joined["runs"].append(run)
                    elif run["epochs"] != joined["runs"][position]["epochs"]:
                        shorter, longer = sorted((run, joined["runs"][position]), key=lambda each: each["epochs"])
                        into.setdefault("prefix_differences", []).append(prefix_difference(shorter, longer))
                        joined["runs"][position] = longer  # the longer run of the same (method, lr, seed)
                joined["collision"] = joined.get("collision") or outcome.get("collision", [])
    merged["tasks"] = {name: task for name, task in merged["tasks"].items() if any(
        outcome["runs"] for outcome in task["seeds"].values())}
    if not merged["tasks"]:
        raise SystemExit("--render: no run in these reports; nothing written")
    for name, task in merged["tasks"].items():
        check_runs(name, task)
    return merged


def prefix_difference(shorter: dict, longer: dict) -> int:
    """The largest difference of any count between two runs of one (method, lr, seed) over their common steps:
    0 when the shorter is the start of the longer, as it is when both ran with the same torch build and threads."""
    common = {point["step"]: point for point in longer["curve"]}
    return max(abs(point[key] - common[point["step"]][key]) for point in shorter["curve"] if point["step"] in common
               for key in point if key != "step")


def check_runs(name: str, task: dict) -> None:
    """Every seed swept every lr of its methods, and a run shorter than the report reached 90% learned."""
    for seed, outcome in task["seeds"].items():
        present = {(run["method"], run["lr"]) for run in outcome["runs"]}
        for method in dict.fromkeys(run["method"] for run in outcome["runs"]):
            if missing := [lr for lr in task["lr_grid"].get(method, []) if (method, lr) not in present]:
                raise SystemExit(f"--render: seed {seed} of task {name} has no run of {method} at lr "
                                 f"{', '.join(f'{lr:g}' for lr in missing)}, which another part swept; add the part "
                                 "that ran it, or run it (the lr rule needs the whole sweep on every seed)")
        for run in outcome["runs"]:
            if run["epochs"] < task["epochs"] and at_level(run["curve"], TOP_LEVEL * outcome["sizes"]["injection"]) \
                    is None:
                raise SystemExit(f"--render: {run['method']} at lr {run['lr']:g}, seed {seed} of task {name}, ran "
                                 f"{run['epochs']} epochs and did not reach {TOP_LEVEL:.0%} learned, and no part ran "
                                 f"it for {task['epochs']}: run it with --epochs {task['epochs']} into a part of "
                                 "this render")
