"""The report folder of `peft-cpl run`: report.md, learning.png and settings.yaml, from what the steps wrote.

Built only from the run's files (history.json, the predictions, the selection report), so it can be rebuilt at any
time and says nothing the files do not.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

from .predictions import read_predictions

EXAMPLES = 5


def plot_learning(history: list[dict], path: Path) -> Path | None:
    """Learned (of the injection set) and forgotten (of the mastered set) after each epoch; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    epochs = [0] + [row["epoch"] for row in history]
    learned = [0.0] + [row["learned"] / max(row["injection"], 1) for row in history]
    forgotten = [0.0] + [row["forgotten"] / max(row["mastered"], 1) for row in history]
    figure, axis = plt.subplots(figsize=(6, 3.6), dpi=110)
    axis.plot(epochs, learned, marker="o", label=f"learned (of {history[0]['injection']} to teach)" if history else "")
    axis.plot(epochs, forgotten, marker="s", label=f"forgotten (of {history[0]['mastered']} known)" if history else "")
    axis.set_xlabel("epoch")
    axis.set_ylabel("fraction")
    axis.set_ylim(-0.03, 1.03)
    axis.set_xticks(epochs)
    axis.grid(alpha=0.3)
    axis.legend(loc="center right")
    axis.set_title("CPL: learned and forgotten after each epoch")
    figure.tight_layout()
    from ..tuner.atomic import atomic_path

    with atomic_path(path) as temp:
        figure.savefig(temp, format="png")
    plt.close(figure)
    return path


def _yaml(settings: dict) -> str:
    import yaml

    return yaml.safe_dump(settings, sort_keys=False, allow_unicode=True)


def _changed(items: list[dict], before, after, learned: bool) -> list[dict]:
    """Up to EXAMPLES items that were wrong and became right (learned), or right and became wrong (forgotten)."""
    changed = [item for item in items if before.correct[item["id"]] != after.correct[item["id"]]
               and after.correct[item["id"]] == learned]
    return changed[:EXAMPLES]


def example_items(items: list[dict], before, after) -> list[dict]:
    """The items the report shows as examples."""
    return _changed(items, before, after, True) + _changed(items, before, after, False)


def _examples(items: list[dict], before, after, learned: bool) -> list[str]:
    rows = []
    for item in _changed(items, before, after, learned):
        cells = [item["id"], item["question"], item.get("answer") or item.get("label"),
                 before.replies.get(item["id"], "-"), after.replies.get(item["id"], "-")]
        rows.append("| " + " | ".join(map(_cell, cells)) + " |")
    return rows


def _cell(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")[:80]


def write_report(output: Path, source: str, items: list[dict], settings: dict, command: list[str]) -> Path:
    """Write report/settings.yaml, report/learning.png and report/report.md; the path of report.md."""
    from ..tuner.atomic import write_text
    from ..tuner.report import SelectionReport

    report = output / "report"
    history = json.loads((report / "history.json").read_text(encoding="utf-8"))
    before = read_predictions(report / "predictions_before.json")
    after = read_predictions(report / "predictions_after.json")
    selection = SelectionReport.load(output / "adapter")
    write_text(report / "settings.yaml", f"# peft-cpl run {shlex.quote(str(Path(source).resolve()))} --config "
               f"settings.yaml --output NEW\n" + _yaml(settings))
    plot = plot_learning(history, report / "learning.png")
    known = sum(before.correct.values())
    last = history[-1]
    lines = [
        "# CPL run report", "",
        f"Command: `{shlex.join(command)}`  ",
        f"Settings: [settings.yaml](settings.yaml) (rerun with `peft-cpl run ITEMS --config "
        f"{report / 'settings.yaml'} --output NEW`); every step's output: [log.txt](log.txt)",
        "", "## Split", "",
        f"{len(items)} items; the model answered {known} correctly before training (mastered, to keep) and "
        f"{len(items) - known} wrongly (injection, to teach). Judge: `--match {settings['match']}`.", "",
        "## Selection", "", selection.sentence(), "",
        "![selection](selection.png)" if (report / "selection.png").is_file() else "(no selection plot)", "",
        "## Training", "",
        "| epoch | learned | forgotten |", "| ---: | ---: | ---: |",
        *(f"| {row['epoch']} | {row['learned']}/{row['injection']} | {row['forgotten']}/{row['mastered']} |"
          for row in history),
        "", "![learned and forgotten per epoch](learning.png)" if plot else "(install matplotlib for the plot)", "",
        f"After {last['epoch']} epochs: learned {last['learned']} of {last['injection']}, forgot {last['forgotten']} "
        f"of {last['mastered']}. Predictions: [before](predictions_before.json), [after](predictions_after.json).",
        "",
    ]
    for title, learned in (("Learned (examples)", True), ("Forgotten (examples)", False)):
        rows = _examples(items, before, after, learned)
        if rows:
            lines += [f"## {title}", "", "| id | question | answer | reply before | reply after |",
                      "| --- | --- | --- | --- | --- |", *rows, ""]
    if (output / "merged").is_dir():
        lines += ["## Merged model", "", f"`{output / 'merged'}`: a Hugging Face model folder with the tokenizer.", ""]
    return write_text(report / "report.md", "\n".join(lines))
