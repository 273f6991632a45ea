"""The benchmark's reading of curves: levels, area, the lr rule and the bootstrap CIs, on curves worked by hand."""

from __future__ import annotations

import pytest

from benchmarks.knowledge_injection.analysis import (
    area,
    at_level,
    chosen_run,
    mean_ci,
    paired,
    seed_summary,
    verdict,
)
from benchmarks.knowledge_injection.facts import KINDS, fact_pool, relation


def curve(*points: tuple[int, int, int]) -> list[dict]:
    """(learned, forgotten_in, forgotten_out) every 3 steps from step 0."""
    return [{"step": 3 * index, "learned": learned, "forgotten_in": fin, "forgotten_out": fout, "heldout_correct": 0}
            for index, (learned, fin, fout) in enumerate(points)]


def test_a_level_is_read_at_its_first_crossing_interpolated_between_counts():
    rising = curve((0, 0, 0), (4, 1, 2), (8, 3, 6), (6, 9, 9), (10, 4, 8))
    assert at_level(rising, 0) == {"forgotten_out": 0.0, "forgotten_in": 0.0}
    assert at_level(rising, 6) == pytest.approx({"forgotten_out": 4.0, "forgotten_in": 2.0})  # halfway from 4 to 8
    assert at_level(rising, 8) == pytest.approx({"forgotten_out": 6.0, "forgotten_in": 3.0})
    # 9 is first reached between (6 learned: 9, 9) and (10: 4, 8), after the dip: 3/4 of the way
    assert at_level(rising, 9) == pytest.approx({"forgotten_out": 8.25, "forgotten_in": 5.25})
    assert at_level(rising, 11) is None


def test_area_is_the_mean_forgetting_over_learning_levels_and_needs_the_whole_range():
    linear = curve((0, 0, 0), (10, 5, 10))  # forgotten_out = learned: mean over 0..9 learned is 4.5
    assert area(linear, 10, "forgotten_out") == pytest.approx(4.5)
    assert area(linear, 10, "forgotten_in") == pytest.approx(2.25)
    assert area(curve((0, 0, 0), (8, 1, 1)), 10, "forgotten_out") is None  # never reaches 90%


def test_the_lr_rule_takes_least_out_of_set_forgetting_among_runs_that_reach_90_percent():
    runs = [
        {"lr": 1e-5, "curve": curve((0, 0, 0), (5, 0, 0))},  # forgets nothing, but never learns enough
        {"lr": 3e-5, "curve": curve((0, 0, 0), (10, 1, 4))},
        {"lr": 1e-4, "curve": curve((0, 0, 0), (10, 5, 2))},  # least out of set at 90%: chosen
        {"lr": 3e-4, "curve": curve((0, 0, 0), (10, 0, 2))},  # ties at 2 out, fewer in: chosen over 1e-4
    ]
    assert chosen_run(runs, 10)["lr"] == 3e-4
    assert chosen_run(runs[:3], 10)["lr"] == 1e-4
    assert chosen_run(runs[:1], 10)["lr"] == 1e-5  # none reaches 90%: the one that learned most
    summary = seed_summary(runs[2], 10)
    assert summary["lr"] == 1e-4 and summary["max_learned"] == 10
    assert summary["forgotten_out@0.5"] == pytest.approx(1.0) and summary["forgotten_in@0.9"] == pytest.approx(4.5)


def test_bootstrap_ci_brackets_the_mean_and_narrows_with_agreement():
    mean, low, high = mean_ci([1.0, 2.0, 3.0, 4.0, 10.0])
    assert mean == pytest.approx(4.0) and low < mean < high and low >= 1.0 and high <= 10.0
    assert mean_ci([2.0, 2.0, 2.0]) == (2.0, 2.0, 2.0)
    assert mean_ci([3.0]) == (3.0, None, None)
    wide = mean_ci([0.0, 10.0, 0.0, 10.0, 5.0])
    narrow = mean_ci([4.0, 6.0, 4.0, 6.0, 5.0])
    assert (narrow[2] - narrow[1]) < (wide[2] - wide[1])


def test_paired_differences_and_verdicts():
    assert paired({0: 3.0, 1: None, 2: 5.0}, {0: 1.0, 1: 2.0, 2: 6.0, 3: 0.0}) == [2.0, -1.0]
    assert verdict(-3.0, -0.5).startswith("forgets less")
    assert verdict(0.5, 3.0).startswith("forgets more")
    assert verdict(-1.0, 1.0).startswith("not decided")
    assert verdict(None, None).startswith("no CI")
    assert verdict(-3.0, -0.5, seeds=2) == "forgets less on every seed (screening)"  # 2 seeds: no confident verdict
    assert verdict(0.5, 3.0, seeds=4).endswith("(screening)") and verdict(-1.0, 1.0, seeds=2).startswith("not")


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_every_fact_kind_gives_valid_items_with_unique_ids(kind):
    items = fact_pool([kind])
    assert len(items) >= 100
    assert len({item["id"] for item in items}) == len(items)
    for item in items:
        assert set(item) == {"id", "question", "answer", "response_prefix"}
        assert all(isinstance(value, str) and value.strip() == value and value for value in item.values())
    assert len({relation(item) for item in items}) >= 2
    assert fact_pool([kind]) == items  # the same pool every time (fictional facts come from a fixed seed)
