"""Parts of the knowledge-injection benchmark run at different lengths, and resumed parts: what --render and
--resume accept, join and refuse."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.knowledge_injection.pipeline import main
from benchmarks.knowledge_injection.render import render as join
from benchmarks.knowledge_injection.settings import QUICK

METHODS = ["full-adamw", "cpl-guard"]  # a dense step, and a sparse one whose guard is refreshed every epoch
SCALE = QUICK["lr_scale"]  # --quick scales every lr for its tiny model


def run_part(folder: Path, epochs: int, *extra: str) -> dict:
    output = folder / f"part_e{epochs}.md"
    main(["--quick", "--task", "facts", "--seeds", "0", "--methods", *METHODS, "--lr", "full-adamw=1e-3",
          "cpl-guard=3e-3", "--epochs", str(epochs), "--output-md", str(output), *extra])
    return json.loads(output.with_suffix(".json").read_text())


@pytest.fixture(scope="module")
def parts(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("parts")
    run_part(folder, 2)
    run_part(folder, 4)
    return folder / "part_e2.json", folder / "part_e4.json"


def runs_of(path: Path) -> dict[str, dict]:
    report = json.loads(path.read_text())
    return {run["method"]: run for run in report["tasks"]["facts"]["seeds"]["0"]["runs"]}


def test_a_shorter_run_is_the_start_of_a_longer_one(parts):
    """What lets a shorter run stand in for a longer one: training does not depend on the epochs still to come."""
    short, long = runs_of(parts[0]), runs_of(parts[1])
    for method in METHODS:
        last = short[method]["curve"][-1]["step"]
        prefix = [point for point in long[method]["curve"] if point["step"] <= last]
        assert prefix[-1]["step"] == last and long[method]["curve"][-1]["step"] == 2 * last
        assert short[method]["curve"] == prefix, method


def render(tmp_path: Path, *paths: Path) -> dict:
    """The joined task, after writing the report as `--render` does."""
    main(["--render", *map(str, paths), "--output-md", str(tmp_path / "joined.md")])
    return join(list(paths))["tasks"]["facts"]


def with_curve(report: dict, method: str, learned: int) -> dict:
    """The same report with one run's learned counts set (to reach 90% or not); everything else as measured."""
    report = json.loads(json.dumps(report))
    for run in report["tasks"]["facts"]["seeds"]["0"]["runs"]:
        if run["method"] == method:
            run["curve"] = [{**point, "learned": learned if point["step"] else 0} for point in run["curve"]]
    return report


def test_render_takes_the_longer_run_of_each_lr(parts, tmp_path):
    for order in (parts, parts[::-1]):
        task = render(tmp_path, *order)
        assert task["epochs"] == 4
        assert {run["method"]: run["epochs"] for run in task["seeds"]["0"]["runs"]} == dict.fromkeys(METHODS, 4)
        longer = [run["curve"] for run in runs_of(parts[1]).values()]
        assert [run["curve"] for run in task["seeds"]["0"]["runs"]] == longer
        assert task["prefix_differences"] == [0, 0]  # same process and threads: the shorter runs are the prefixes
        text = (tmp_path / "joined.md").read_text()
        assert "stand in" not in text and "ran at both lengths: over their common steps the counts differ by at " \
            "most 0 items (0 in 2 of them" in text


def test_a_shorter_run_stands_in_only_if_it_reached_90_percent(parts, tmp_path):
    short, long = (json.loads(path.read_text()) for path in parts)
    injection = short["tasks"]["facts"]["seeds"]["0"]["sizes"]["injection"]
    long["tasks"]["facts"]["seeds"]["0"]["runs"] = [
        run for run in long["tasks"]["facts"]["seeds"]["0"]["runs"] if run["method"] != "cpl-guard"]
    (tmp_path / "long.json").write_text(json.dumps(long))
    (tmp_path / "reached.json").write_text(json.dumps(with_curve(short, "cpl-guard", injection)))
    task = render(tmp_path, tmp_path / "reached.json", tmp_path / "long.json")
    assert {run["method"]: run["epochs"] for run in task["seeds"]["0"]["runs"]} == {"full-adamw": 4, "cpl-guard": 2}
    assert "1 runs that reached 90% learned within 2 epochs stand in for 4-epoch runs" in (
        tmp_path / "joined.md").read_text()
    (tmp_path / "joined.md").write_text("previous report")
    (tmp_path / "short.json").write_text(json.dumps(with_curve(short, "cpl-guard", injection - 1)))
    refused = rf"cpl-guard at lr {3e-3 * SCALE:g}, seed 0 of task facts, ran 2 epochs and did not reach 90% learned"
    with pytest.raises(SystemExit, match=refused + r".*--epochs 4"):
        render(tmp_path, tmp_path / "short.json", tmp_path / "long.json")
    assert (tmp_path / "joined.md").read_text() == "previous report"


def test_render_refuses_a_seed_that_lacks_an_lr_another_part_swept(parts, tmp_path):
    other = json.loads(parts[1].read_text())
    task = other["tasks"]["facts"]
    task["lr_grid"]["full-adamw"] = [3e-4 * SCALE]
    for run in task["seeds"]["0"]["runs"]:
        run["lr"] = 3e-4 * SCALE if run["method"] == "full-adamw" else run["lr"]
    task["seeds"] = {"1": task["seeds"]["0"]}  # seed 1 swept full-adamw at 3e-4 only, seed 0 (the other part) not
    (tmp_path / "other.json").write_text(json.dumps(other))
    with pytest.raises(SystemExit, match=rf"seed 0 of task facts has no run of full-adamw at lr {3e-4 * SCALE:g}"):
        render(tmp_path, parts[1], tmp_path / "other.json")


def test_resume_refuses_another_length_and_joins_the_sweeps(tmp_path):
    run_part(tmp_path, 2)
    saved = tmp_path / "part_e2.json"
    before = saved.read_text()
    with pytest.raises(SystemExit, match=r"was run with epochs 2, this run has epochs 3.*--render joins parts"):
        main(["--quick", "--task", "facts", "--seeds", "0", "--methods", "full-adamw", "--lr", "full-adamw=3e-3",
              "--epochs", "3", "--resume", "--output-md", str(tmp_path / "part_e2.md")])
    assert saved.read_text() == before
    main(["--quick", "--task", "facts", "--seeds", "0", "--methods", "full-adamw", "--lr", "full-adamw=3e-3",
          "--epochs", "2", "--resume", "--output-md", str(tmp_path / "part_e2.md")])
    task = json.loads(saved.read_text())["tasks"]["facts"]
    assert task["lr_grid"] == {"full-adamw": [1e-3 * SCALE, 3e-3 * SCALE], "cpl-guard": [3e-3 * SCALE]}
    assert sorted((run["method"], run["lr"]) for run in task["seeds"]["0"]["runs"]) == [
        ("cpl-guard", 3e-3 * SCALE), ("full-adamw", 1e-3 * SCALE), ("full-adamw", 3e-3 * SCALE)]


def test_render_keeps_only_the_lrs_named_and_says_what_it_left_out(parts, tmp_path):
    """A comparison over part of a sweep (lrs not rerun at a longer length): the rule chooses among the rest, and the
    report names what was left out."""
    other = json.loads(parts[1].read_text())
    kept, left = 1e-3 * SCALE, 3e-4 * SCALE
    task = other["tasks"]["facts"]
    task["lr_grid"]["full-adamw"] = [left]
    task["seeds"]["0"]["runs"] = [{**run, "lr": left} for run in task["seeds"]["0"]["runs"]
                                  if run["method"] == "full-adamw"]
    (tmp_path / "other.json").write_text(json.dumps(other))
    paths = [str(parts[1]), str(tmp_path / "other.json")]
    output = str(tmp_path / "joined.md")
    joined = main(["--render", *paths, "--lr", f"full-adamw={kept:g}", "--output-md", output])["tasks"]["facts"]
    assert sorted((run["method"], run["lr"]) for run in joined["seeds"]["0"]["runs"]) == [
        ("cpl-guard", 3e-3 * SCALE), ("full-adamw", kept)]
    assert joined["lr_grid"]["full-adamw"] == [kept] and joined["lrs_left_out"] == {"full-adamw": [left]}
    assert f"Left out of this report (`--lr` at `--render`; the rule chose among the rest): full-adamw {left:.2g}." \
        in (tmp_path / "joined.md").read_text()
    whole = main(["--render", *paths, "--output-md", output])["tasks"]["facts"]
    assert whole["lr_grid"]["full-adamw"] == [left, kept] and not whole["lrs_left_out"]
    assert "Left out" not in (tmp_path / "joined.md").read_text()
    with pytest.raises(SystemExit, match=r"--lr full-adamw=0\.5 names no lr of full-adamw in these reports"):
        main(["--render", *paths, "--lr", "full-adamw=0.5", "--output-md", output])
    with pytest.raises(SystemExit, match=r"--lr names replay, which none of these reports ran"):
        main(["--render", *paths, "--lr", "replay=1e-4", "--output-md", output])
