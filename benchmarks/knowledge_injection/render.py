"""Join reports saved by separate parts of the benchmark (by seed or by method group) into one."""

from __future__ import annotations

import json
from pathlib import Path

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


def render(paths: list[Path], methods: list[str] | None = None) -> dict:
    """One report from several: seeds are joined, and runs of the same seed are joined by (method, lr); `methods`
    keeps only those (a confirmation's methods out of parts that also hold screened levers).

    The same seed must have the same split in every part (it does when the parts ran on the same pool and model).
    """
    reports = [keep_methods(load(path), methods) for path in paths]
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
            into = merged["tasks"].setdefault(name, {**task, "seeds": {}, "lr_grid": {}})
            for method, lrs in task["lr_grid"].items():
                if into["lr_grid"].setdefault(method, lrs) != lrs:
                    raise SystemExit(f"--render: {path} swept {method} over {lrs}, another part over "
                                     f"{into['lr_grid'][method]}: parts must share the sweep")
            for key in ("epochs", "eval_every", "batch_size"):
                if into[key] != task[key]:
                    raise SystemExit(f"--render: {path} has {key} {task[key]}, another part {into[key]}")
            for seed, outcome in task["seeds"].items():
                if seed not in into["seeds"]:
                    into["seeds"][seed] = {**outcome, "runs": list(outcome["runs"])}
                    continue
                joined = into["seeds"][seed]
                if joined["ids"] != outcome["ids"]:
                    raise SystemExit(f"--render: seed {seed} of task {name} has another split in {path} than in an "
                                     "earlier part (another pool or model?); parts must share them")
                done = {(run["method"], run["lr"]) for run in joined["runs"]}
                joined["runs"] += [run for run in outcome["runs"] if (run["method"], run["lr"]) not in done]
                joined["collision"] = joined.get("collision") or outcome.get("collision", [])
    merged["tasks"] = {name: task for name, task in merged["tasks"].items() if any(
        outcome["runs"] for outcome in task["seeds"].values())}
    if not merged["tasks"]:
        raise SystemExit("--render: no run in these reports; nothing written")
    return merged
