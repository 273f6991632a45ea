"""Unit scores of every kind of support: random, magnitude, collaborative. The one place supports differ.

Each function returns (scores, eligible) over units: coordinates ("element") or output rows ("row"). `choose_support`
then keeps the best eligible units within the density cap.
"""

from __future__ import annotations

import zlib

import torch

from .support import Support, choose_support, per_row

RANKINGS = ("injection", "contribution", "specific")


def random_scores(shape: tuple[int, ...], seed: int, module_name: str) -> torch.Tensor:
    """Uniform scores, reproducible per (seed, module name) whatever order modules are visited in."""
    mixed = (seed * 1_000_003 + zlib.crc32(module_name.encode())) % 2**63
    return torch.rand(shape, generator=torch.Generator(device="cpu").manual_seed(mixed))


def magnitude_scores(weight: torch.Tensor, granularity: str, output_dim: int = 0) -> torch.Tensor:
    """|W| (Super-Tuning-like); per row, the row's L1 norm."""
    scores = weight.detach().float().abs()
    return per_row(scores, output_dim).sum(dim=1) if granularity == "row" else scores


def collaborative_scores(
    g_m: torch.Tensor, g_i: torch.Tensor, granularity: str, ranking: str, output_dim: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eligible: s = g_M * g_I >= 0 and g_I != 0 (per row: the row's summed s >= 0, some g_I != 0).

    Ranked by "injection" (|g_I|, per row ||g_I||^2: the first-order drop of the injection loss per unit step),
    "contribution" (s itself), or "specific" (|g_I| / (|g_M| + mean |g_M|), per row with squared norms): coordinates
    the injection set needs and the mastered set barely uses, so that a second-order rise of the mastered loss is
    least likely. The mean in the denominator keeps coordinates with g_M ~ 0 from winning on noise in g_I.
    """
    if ranking not in RANKINGS:
        raise ValueError(f"ranking must be one of {RANKINGS}, got {ranking!r}")
    contribution = g_m * g_i
    if granularity == "element":
        eligible = (contribution >= 0) & (g_i != 0)
        if ranking == "specific":
            mastered = g_m.abs()
            return g_i.abs() / (mastered + mastered.mean()), eligible
        return (g_i.abs() if ranking == "injection" else contribution), eligible
    row_contribution = per_row(contribution, output_dim).sum(dim=1)
    eligible = (row_contribution >= 0) & per_row(g_i != 0, output_dim).any(dim=1)
    injection = per_row(g_i.square(), output_dim).sum(dim=1)
    if ranking == "specific":
        mastered = per_row(g_m.square(), output_dim).sum(dim=1)
        return injection / (mastered + mastered.mean()), eligible
    return (injection if ranking == "injection" else row_contribution), eligible


def data_free_support(
    kind: str,
    shape: tuple[int, ...],
    *,
    density: float | None,
    granularity: str,
    output_dim: int,
    seed: int,
    module_name: str,
    weight: torch.Tensor | None = None,
) -> Support:
    """The support of a kind that needs no data ("dense", "random", "magnitude"), chosen when the adapter is made."""
    if kind == "dense":
        return Support.dense(shape)
    if kind == "random":
        units = (shape[output_dim],) if granularity == "row" else shape
        scores = random_scores(units, seed, module_name)
    elif kind == "magnitude":
        if weight is None:
            raise ValueError("a magnitude support needs the base weight")
        scores = magnitude_scores(weight, granularity, output_dim)
    else:
        raise ValueError(f"support '{kind}' is chosen from data (select_collaborative), not when the adapter is made")
    return choose_support(scores, shape, density=density, granularity=granularity, output_dim=output_dim)
