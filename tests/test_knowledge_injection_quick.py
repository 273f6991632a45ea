"""benchmarks/knowledge_injection --quick: the whole pipeline on a tiny random model writes consistent outputs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "knowledge_injection"  # a package: run by path, through its __main__.py
METHODS = [
    "full-sgd", "full-adamw", "lora", "nlora", "nlora-released", "random", "magnitude", "agem", "replay", "cpl",
    "cpl-guard", "authors-rule",
]
SPARSE_AND_NLORA = {"lora", "nlora", "nlora-released", "random", "magnitude", "cpl"}


@pytest.fixture(scope="module")
def outputs(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("knowledge_injection")
    completed = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--output-md", str(folder / "ki.md")],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    return folder


def test_every_output_is_written(outputs):
    assert (outputs / "ki.md").is_file() and (outputs / "ki.json").is_file()
    for task in ("facts", "mcq"):
        plot = outputs / f"ki_{task}.png"
        assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_json_has_every_method_with_counts_in_bounds(outputs):
    report = json.loads((outputs / "ki.json").read_text())
    assert report["methods"] == METHODS
    for name in ("facts", "mcq"):
        task = report["tasks"][name]
        sizes = task["sizes"]
        assert sizes["injection"] > 0 and sizes["mastered_ref"] > 0 and sizes["mastered_held"] > 0
        assert {run["method"] for run in task["runs"]} == set(METHODS)
        assert len(task["runs"]) == len(METHODS) * len(task["lr_factors"])
        for run in task["runs"]:
            assert [row["epoch"] for row in run["epochs"]] == list(range(1, task["epochs"] + 1))
            for row in run["epochs"]:
                assert 0 <= row["learned"] <= sizes["injection"]
                assert 0 <= row["forgotten_in"] <= sizes["mastered_ref"]
                assert 0 <= row["forgotten_out"] <= sizes["mastered_held"]
                assert 0 <= row["heldout_correct"] <= sizes["injection_held"]
            assert run["trainable"] > 0 and run["train_seconds"] >= 0 and run["peak_rss_mb"] > 0
            assert 0.0 <= run["update_outside_collaborative"] <= 1.0
        by_method = {run["method"]: run for run in task["runs"]}
        # CPL trains only collaborative coordinates, so none of its update lies outside that set
        assert by_method["cpl"]["update_outside_collaborative"] == pytest.approx(0.0, abs=1e-12)
        # random and magnitude supports are sized at CPL's density
        cpl_values = by_method["cpl"]["trainable"]
        assert abs(by_method["random"]["trainable"] - cpl_values) <= 1 + 0.001 * cpl_values
        assert by_method["full-adamw"]["trainable"] > by_method["cpl"]["trainable"]
    # the sets are disjoint: no item is both trained on and measured as mastered or held out
    ids = report["tasks"]["facts"]["ids"]
    seen = [item for key in ids for item in ids[key]]
    assert len(seen) == len(set(seen))


def test_collision_is_reported_for_sparse_methods_and_nlora(outputs):
    facts = json.loads((outputs / "ki.json").read_text())["tasks"]["facts"]
    entries = {entry["method"]: entry for entry in facts["collision"]}
    assert set(entries) == SPARSE_AND_NLORA
    for entry in entries.values():
        assert all(0.0 <= rate <= 1.0 for rate in entry["collision"].values())
    for name in ("random", "magnitude", "cpl"):  # exact for sparse supports: exactly non-zero = in both supports
        assert entries[name]["collision"]["0.0"] <= entries[name]["support_overlap"] + 1e-12


def test_markdown_has_a_row_per_method(outputs):
    text = (outputs / "ki.md").read_text()
    assert f"`python {SCRIPT} --quick --output-md" in text  # the exact command is recorded
    for task in ("facts", "mcq"):
        section = text.split(f"## Task: {task}")[1].split("## Task:")[0]
        best_table = section.split("### Best setting")[1].split("###")[0]
        for method in METHODS:
            assert f"\n| {method} |" in best_table, (task, method)
        assert f"ki_{task}.png" in section


def test_render_rebuilds_the_same_markdown_from_saved_reports(outputs, tmp_path):
    """Tasks run as separate jobs (`--task facts`, `--task mcq`) are joined by `--render` into one report."""
    report = json.loads((outputs / "ki.json").read_text())
    parts = []
    for name, task in report["tasks"].items():
        part = tmp_path / f"{name}.json"
        part.write_text(json.dumps({**report, "tasks": {name: task}}))
        parts.append(str(part))
    completed = subprocess.run(
        [sys.executable, str(SCRIPT), "--render", *parts, "--output-md", str(tmp_path / "joined.md")],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    assert (tmp_path / "joined.md").read_text() == (outputs / "ki.md").read_text()


def test_render_refuses_what_is_not_a_finished_report_and_keeps_the_old_output(tmp_path):
    output = tmp_path / "ki.md"
    output.write_text("previous report")
    not_report = tmp_path / "other.json"
    not_report.write_text(json.dumps({"hello": 1}))
    unfinished = tmp_path / "unfinished.json"
    keys = {"command": "", "machine": "", "model": "", "commit": "", "date": "", "methods": []}
    unfinished.write_text(json.dumps({**keys, "tasks": {"facts": {"runs": []}}}))
    for path, message in ((tmp_path / "missing.json", "cannot read"), (not_report, "not a report"),
                          (unfinished, "no finished task")):
        completed = subprocess.run(
            [sys.executable, str(SCRIPT), "--render", str(path), "--output-md", str(output)],
            cwd=ROOT, capture_output=True, text=True, timeout=120,
        )
        assert completed.returncode != 0 and message in completed.stderr and "Traceback" not in completed.stderr
    assert output.read_text() == "previous report"
