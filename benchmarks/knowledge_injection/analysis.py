"""From curves to verdicts: forgetting at fixed learning levels, the lr rule, and bootstrap CIs over seeds.

Each run is a curve of (learned, forgotten) counts measured every few steps. A method is read at the first point
where its learned count reaches a level (50%, 75%, 90% of the trained injection items), linearly interpolated between
the two measurements around it, and by the area under its forgotten-vs-learned curve up to 90% learned (the mean
forgotten count over that range of learning). The learning rate reported for a method is chosen per seed by one rule,
fixed before any result was seen and the same for every method (`chosen_run`); every summary of that seed then comes
from that one run, so no summary point is picked on its own.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
from scipy import stats

LEVELS = (0.5, 0.75, 0.9)
AREA_UPTO = 0.9
AREA_POINTS = 46  # learned levels 0, 2%, ..., 90% averaged for the area
METRICS = ("forgotten_out", "forgotten_in")  # out-of-set first: M-held is what no method sees


def at_level(curve: Sequence[dict], target: float) -> dict | None:
    """The counts where `learned` first reaches `target` items, interpolated; None if it never does."""
    for index, point in enumerate(curve):
        if point["learned"] >= target:
            if index == 0:
                return {key: float(point[key]) for key in METRICS}
            before = curve[index - 1]
            weight = (target - before["learned"]) / (point["learned"] - before["learned"])
            return {key: before[key] + weight * (point[key] - before[key]) for key in METRICS}
    return None


def area(curve: Sequence[dict], injection: int, metric: str, upto: float = AREA_UPTO) -> float | None:
    """Mean `metric` over learned levels 0..upto of the injection items (the area under the curve / its width)."""
    values = []
    for level in np.linspace(0.0, upto, AREA_POINTS):
        point = at_level(curve, level * injection)
        if point is None:
            return None
        values.append(point[metric])
    return float(np.mean(values))


def chosen_run(runs: Sequence[dict], injection: int) -> dict:
    """The rule for a method's reported lr on one seed: among its runs that reach 90% learned, the one forgetting
    least out of set there (then least in set, then the smaller lr); if none does, the run that learned most."""
    reaching = [(at_level(run["curve"], 0.9 * injection), run) for run in runs]
    reaching = [(point, run) for point, run in reaching if point is not None]
    if reaching:
        return min(reaching, key=lambda pair: (pair[0]["forgotten_out"], pair[0]["forgotten_in"], pair[1]["lr"]))[1]
    return max(runs, key=lambda run: (max(point["learned"] for point in run["curve"]), -run["lr"]))


def seed_summary(run: dict, injection: int) -> dict:
    """Every number the report gives for one (method, seed), all from its chosen run."""
    summary: dict = {"lr": run["lr"], "max_learned": max(point["learned"] for point in run["curve"])}
    for level in LEVELS:
        point = at_level(run["curve"], level * injection)
        for metric in METRICS:
            summary[f"{metric}@{level:g}"] = None if point is None else point[metric]
    for metric in METRICS:
        summary[f"area_{metric}"] = area(run["curve"], injection, metric)
    summary["heldout_end"] = run["curve"][-1]["heldout_correct"]
    return summary


def mean_ci(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float | None, float | None]:
    """(mean, low, high): a percentile bootstrap CI of the mean over seeds (scipy); no CI from fewer than 2."""
    data = np.asarray(values, dtype=float)
    mean = float(data.mean())
    if data.size < 2:
        return mean, None, None
    if np.all(data == data[0]):
        return mean, mean, mean
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy warns that few distinct resamples exist for 2-3 seeds
        result = stats.bootstrap((data,), np.mean, confidence_level=confidence, n_resamples=9999,
                                 method="percentile", rng=np.random.default_rng(0))
    low, high = result.confidence_interval
    return mean, float(low), float(high)


def paired(a: dict[int, float | None], b: dict[int, float | None]) -> list[float]:
    """Per-seed differences a - b, over the seeds where both are defined (the same split and data order)."""
    return [a[seed] - b[seed] for seed in sorted(a) if seed in b and a[seed] is not None and b[seed] is not None]


CONFIDENT_SEEDS = 5  # below this, a CI that excludes 0 is a screening signal, not a verdict


def verdict(low: float | None, high: float | None, seeds: int = CONFIDENT_SEEDS) -> str:
    """Plain words for a CI of (method - baseline) forgetting over `seeds` seeds: negative forgets less.

    A percentile bootstrap over 2-4 seeds spans little more than their range, so there it only says the seeds agree.
    """
    if low is None or high is None or math.isnan(low):
        return "no CI (fewer than 2 seeds)"
    if high < 0 or low > 0:
        direction = "less" if high < 0 else "more"
        return f"forgets {direction}" + (", with confidence" if seeds >= CONFIDENT_SEEDS else
                                          " on every seed (screening)")
    return "not decided (the CI includes 0)"
