"""benchmarks/knowledge_injection --quick: the whole pipeline on a tiny random model writes consistent outputs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.knowledge_injection.pipeline import main

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "knowledge_injection"  # a package: run by path, through its __main__.py
METHODS = ["full-adamw", "lora", "nlora", "replay", "random", "magnitude", "cpl", "cpl-guard", "authors-rule"]
SEEDS = ["0", "1"]


def run_script(*arguments: str) -> subprocess.CompletedProcess:
    """The script as users run it, by path, in its own process."""
    return subprocess.run([sys.executable, str(SCRIPT), *arguments], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def outputs(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("knowledge_injection")
    completed = run_script("--quick", "--task", "both", "--output-md", str(folder / "ki.md"))
    assert completed.returncode == 0, completed.stderr[-4000:]
    return folder


def test_every_output_is_written(outputs):
    assert (outputs / "ki.md").is_file() and (outputs / "ki.json").is_file()
    for task in ("facts", "mcq"):
        assert (outputs / f"ki_{task}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_every_seed_has_every_method_and_lr_with_curves_in_bounds(outputs):
    report = json.loads((outputs / "ki.json").read_text())
    assert report["methods"] == METHODS
    for name in ("facts", "mcq"):
        task = report["tasks"][name]
        assert sorted(task["seeds"]) == SEEDS
        steps_per_epoch = -(-task["seeds"]["0"]["sizes"]["injection"] // task["batch_size"])
        last = task["epochs"] * steps_per_epoch
        expected_steps = sorted({0, *range(task["eval_every"], last + 1, task["eval_every"]), last})
        for seed, outcome in task["seeds"].items():
            sizes = outcome["sizes"]
            assert outcome["finished"] and sizes["injection"] > 0 and sizes["mastered_held"] > 0
            assert {(run["method"], run["lr"]) for run in outcome["runs"]} == {
                (method, lr) for method in METHODS for lr in task["lr_grid"][method]}
            for run in outcome["runs"]:
                assert run["seed"] == int(seed)
                assert [point["step"] for point in run["curve"]] == expected_steps
                assert run["curve"][0] == {"step": 0, **outcome["baseline"]}
                for point in run["curve"]:
                    assert 0 <= point["learned"] <= sizes["injection"]
                    assert 0 <= point["forgotten_in"] <= sizes["mastered_ref"]
                    assert 0 <= point["forgotten_out"] <= sizes["mastered_held"]
                    assert 0 <= point["heldout_correct"] <= sizes["injection_held"]
                assert run["trainable"] > 0 and run["train_seconds"] >= 0 and run["peak_rss_mb"] > 0
            by_method = {run["method"]: run for run in outcome["runs"]}
            # CPL trains only collaborative coordinates, so none of its update lies outside that set
            assert by_method["cpl"]["update_outside_collaborative"] == pytest.approx(0.0, abs=1e-12)
            cpl_values = by_method["cpl"]["trainable"]  # random and magnitude supports are sized at CPL's density
            assert abs(by_method["random"]["trainable"] - cpl_values) <= 1 + 0.001 * cpl_values
            # the sets are disjoint: no item is both trained on and measured as mastered or held out
            seen = [item for key in outcome["ids"] for item in outcome["ids"][key]]
            assert len(seen) == len(set(seen))
    facts = report["tasks"]["facts"]["seeds"]
    assert facts["0"]["ids"] != facts["1"]["ids"]  # each seed has its own split


def test_markdown_has_the_ci_tables_and_a_row_per_method(outputs):
    text = (outputs / "ki.md").read_text()
    assert f"`python {SCRIPT} --quick --task both --output-md" in text  # the exact command is recorded
    for task in ("facts", "mcq"):
        section = text.split(f"## Task: {task}")[1].split("## Task:")[0]
        chosen = section.split("### Each method at its chosen learning rate")[1].split("###")[0]
        for method in METHODS:
            assert f"\n| {method} |" in chosen, (task, method)
        for baseline in ("full-adamw", "lora", "replay", "cpl", "cpl-guard"):  # each baseline present is paired
            assert f"### Paired difference to {baseline} " in section, (task, baseline)
        assert "### In plain words" in section and "Screening only: 2 seed(s)" in section
        assert f"ki_{task}.png" in section


def test_render_joins_parts_run_by_seed_and_by_method(outputs, tmp_path):
    """Parts run separately (some seeds, some methods) are joined by `--render` into the same report."""
    report = json.loads((outputs / "ki.json").read_text())
    parts = []
    for seed in SEEDS:
        for group in (METHODS[:4], METHODS[4:]):
            part = json.loads(json.dumps(report))
            for task in part["tasks"].values():
                outcome = task["seeds"][seed]
                outcome["runs"] = [run for run in outcome["runs"] if run["method"] in group]
                task["seeds"] = {seed: outcome}
            parts.append(tmp_path / f"part-{seed}-{len(parts)}.json")
            parts[-1].write_text(json.dumps(part))
    main(["--render", *map(str, parts), "--output-md", str(tmp_path / "joined.md")])
    body = (outputs / "ki.md").read_text().split("## Task:", 1)[1].replace("ki_", "joined_")
    assert (tmp_path / "joined.md").read_text().split("## Task:", 1)[1] == body


def test_render_keeps_only_the_methods_asked_for(outputs, tmp_path):
    """A confirmation's report out of parts that also hold screened levers: the same rows as parts that held only
    those methods, and a method no part ran is refused."""
    report = json.loads((outputs / "ki.json").read_text())
    kept = ["full-adamw", "lora", "cpl-guard"]
    only = json.loads(json.dumps(report))
    only["methods"] = kept
    for task in only["tasks"].values():
        task["lr_grid"] = {method: lrs for method, lrs in task["lr_grid"].items() if method in kept}
        for outcome in task["seeds"].values():
            outcome["runs"] = [run for run in outcome["runs"] if run["method"] in kept]
    (tmp_path / "all.json").write_text(json.dumps(report))
    (tmp_path / "only.json").write_text(json.dumps(only))
    main(["--render", str(tmp_path / "all.json"), "--methods", *kept, "--output-md", str(tmp_path / "kept.md")])
    main(["--render", str(tmp_path / "only.json"), "--output-md", str(tmp_path / "only.md")])
    text = (tmp_path / "kept.md").read_text()
    assert text.split("## Task:", 1)[1].replace("kept_", "only_") == (
        tmp_path / "only.md").read_text().split("## Task:", 1)[1]
    chosen = text.split("### Each method at its chosen learning rate")[1].split("###")[0]
    assert "\n| cpl |" not in chosen and all(f"\n| {method} |" in chosen for method in kept)
    with pytest.raises(SystemExit, match=r"no saved report has a run of cpl-s-d0\.05"):
        main(["--render", str(tmp_path / "all.json"), "--methods", "lora", "cpl-s-d0.05", "--output-md",
              str(tmp_path / "none.md")])


def test_resume_with_other_seeds_and_methods_keeps_what_the_file_held(tmp_path):
    """A part run in several invocations sharing one JSON: a later one with fewer seeds keeps the other seeds' runs;
    one whose split of a seed differs is refused before any run, and the file stays as it was."""
    output = tmp_path / "part.md"
    common = ["--quick", "--task", "facts", "--output-md", str(output)]
    main([*common, "--seeds", "0", "1", "--methods", "full-adamw", "--lr", "full-adamw=1e-3"])
    main([*common, "--seeds", "1", "--methods", "lora", "--lr", "lora=1e-3", "--resume"])
    seeds = json.loads(output.with_suffix(".json").read_text())["tasks"]["facts"]["seeds"]
    assert {seed: sorted(run["method"] for run in outcome["runs"]) for seed, outcome in seeds.items()} == {
        "0": ["full-adamw"], "1": ["full-adamw", "lora"]}
    before = output.with_suffix(".json").read_text()
    with pytest.raises(SystemExit, match=r"seed 0 of task facts .* has another split"):
        main([*common, "--seeds", "0", "--methods", "lora", "--lr", "lora=1e-3", "--resume", "--injection", "6"])
    assert output.with_suffix(".json").read_text() == before


def test_render_refuses_parts_with_other_splits_for_the_same_seed(outputs, tmp_path):
    report = json.loads((outputs / "ki.json").read_text())
    other = json.loads(json.dumps(report))
    ids = other["tasks"]["facts"]["seeds"]["0"]["ids"]
    ids["injection"], ids["mastered_ref"] = ids["mastered_ref"], ids["injection"]
    (tmp_path / "a.json").write_text(json.dumps(report))
    (tmp_path / "b.json").write_text(json.dumps(other))
    with pytest.raises(SystemExit, match="another split"):
        main(["--render", str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--output-md",
              str(tmp_path / "joined.md")])
    assert not (tmp_path / "joined.md").exists()


def test_render_refuses_what_is_not_a_report_and_keeps_the_old_output(tmp_path):
    output = tmp_path / "ki.md"
    output.write_text("previous report")
    not_report = tmp_path / "other.json"
    not_report.write_text(json.dumps({"hello": 1}))
    empty = tmp_path / "empty.json"
    keys = {"command": "", "machine": "", "model": "", "commit": "", "date": "", "methods": []}
    empty.write_text(json.dumps({**keys, "tasks": {"facts": {"seeds": {}, "lr_grid": {}, "epochs": 1,
                                                            "eval_every": 1, "batch_size": 1}}}))
    old = tmp_path / "old.json"
    old.write_text(json.dumps({**keys, "tasks": {"facts": {"runs": []}}}))
    for path, message in ((tmp_path / "missing.json", "cannot read"), (not_report, "not a report"),
                          (old, "older version"), (empty, "no run")):
        with pytest.raises(SystemExit, match=message):  # a message for the user, not a traceback
            main(["--render", str(path), "--output-md", str(output)])
    assert output.read_text() == "previous report"


def test_levers_of_m_and_ranking_change_the_support_as_stated(tmp_path):
    """The size-of-M and generic-M levers select on another M (so their supports leave M-ref's collaborative set);
    the "specific" ranking keeps within it, at the cap's size."""
    from benchmarks.knowledge_injection.generic import BROAD_QUESTIONS

    levers = ["cpl", "cpl-m0.25", "cpl-generic-m", "cpl-spec-d0.05", "cpl-d0.05"]
    main(["--quick", "--seeds", "0", "--methods", *levers, "--lr", *[f"{name}=0.002" for name in levers],
          "--output-md", str(tmp_path / "levers.md")])
    runs = {run["method"]: run for run in
            json.loads((tmp_path / "levers.json").read_text())["tasks"]["facts"]["seeds"]["0"]["runs"]}
    assert set(runs) == set(levers) and all(len(run["curve"]) > 2 for run in runs.values())
    assert runs["cpl"]["update_outside_collaborative"] == 0.0
    for name in ("cpl-m0.25", "cpl-generic-m"):  # chosen on other data: some of the update conflicts with M-ref
        assert runs[name]["update_outside_collaborative"] > 0.01, name
    assert runs["cpl-spec-d0.05"]["update_outside_collaborative"] == 0.0
    assert runs["cpl-spec-d0.05"]["trainable"] == runs["cpl-d0.05"]["trainable"] < runs["cpl"]["trainable"] // 5
    assert len(BROAD_QUESTIONS) == 48 and len(set(BROAD_QUESTIONS)) == 48
