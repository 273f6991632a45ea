"""The points the report compares methods at: best under a forgetting budget, unconstrained, at matched learning."""

from __future__ import annotations


def forgotten(row: dict) -> int:
    return row["forgotten_in"] + row["forgotten_out"]


def best_points(runs: list[dict], method: str, budget: float, mastered_total: int) -> tuple[tuple | None, tuple]:
    """((run, epoch row) best under the forgetting budget or None, unconstrained best): most learned, then least
    forgotten, then most held-out correct, then the smaller lr."""
    points = [(run, row) for run in runs if run["method"] == method for row in run["epochs"]]

    def key(point: tuple) -> tuple:
        return point[1]["learned"], -forgotten(point[1]), point[1]["heldout_correct"], -point[0]["lr"]

    admissible = [point for point in points if forgotten(point[1]) <= budget * mastered_total]
    return (max(admissible, key=key) if admissible else None), max(points, key=key)


def matched_learning(runs: list[dict], method: str, target: int) -> dict | None:
    """The point with the least forgetting among those that learned at least `target` items."""
    points = [row for run in runs if run["method"] == method for row in run["epochs"] if row["learned"] >= target]
    return min(points, key=lambda row: (forgotten(row), -row["learned"])) if points else None
