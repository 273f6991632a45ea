"""Scores -> support: which coordinates of a weight get a trainable value.

Every support in CPL is "the best-scoring eligible units, capped at a density", where a unit is a coordinate
(granularity "element") or a whole output row (granularity "row"). Random, magnitude and collaborative supports differ
only in their scores and eligibility, so they share `choose_support`. Plain functions on tensors, no model in sight.
"""

from __future__ import annotations

import zlib

import torch


def choose_support(
    unit_scores: torch.Tensor,
    shape: tuple[int, ...],
    *,
    eligible: torch.Tensor | None = None,
    density: float | None = None,
    granularity: str = "element",
    output_dim: int = 0,
) -> torch.Tensor:
    """Sorted flat int64 indices (into the weight as stored) of the chosen support.

    Args:
        unit_scores: higher = preferred; shaped like the weight ("element") or one per output row ("row").
        shape: the weight's stored shape.
        eligible: boolean mask over units that may be chosen (None = all).
        density: cap as a fraction of the weight's units (None = every eligible unit).
        granularity: "element" or "row".
        output_dim: which dimension of `shape` indexes output rows (1 for Conv1D's (in, out) layout).
    """
    units = top_units(unit_scores.reshape(-1), None if eligible is None else eligible.reshape(-1), density)
    if granularity == "element":
        return units
    return expand_rows(units, shape, output_dim)


def top_units(scores: torch.Tensor, eligible: torch.Tensor | None, density: float | None) -> torch.Tensor:
    """Sorted ids of the highest-scoring eligible entries of a 1-D score vector, at most `density` of them."""
    candidates = None if eligible is None else torch.nonzero(eligible).squeeze(1)
    available = scores.numel() if candidates is None else candidates.numel()
    budget = available if density is None else min(available, _budget(density, scores.numel()))
    if budget == available:
        chosen = torch.arange(available, device=scores.device) if candidates is None else candidates
    else:
        pool = scores if candidates is None else scores[candidates]
        top = torch.topk(pool.float(), budget, sorted=False).indices
        chosen = top if candidates is None else candidates[top]
    return torch.sort(chosen.to(torch.int64)).values


def per_row(tensor: torch.Tensor, output_dim: int = 0) -> torch.Tensor:
    """(num_output_rows, row_length) view of a 2-D weight-shaped tensor."""
    if tensor.dim() != 2:
        raise ValueError(f"granularity='row' needs a 2-D weight, got shape {tuple(tensor.shape)}")
    return tensor.movedim(output_dim, 0)


def expand_rows(rows: torch.Tensor, shape: tuple[int, ...], output_dim: int = 0) -> torch.Tensor:
    """Sorted flat indices of every coordinate of the given output rows."""
    num_out = shape[output_dim]
    row_len = shape[1 - output_dim]
    inner = torch.arange(row_len, device=rows.device)
    if output_dim == 0:
        flat = rows[:, None] * row_len + inner[None, :]
    else:  # stored (row_len, num_out): output row j is column j
        flat = inner[None, :] * num_out + rows[:, None]
    return torch.sort(flat.reshape(-1)).values


def _budget(density: float, numel: int) -> int:
    return max(1, round(density * numel)) if numel else 0


def random_scores(shape: tuple[int, ...], seed: int, module_name: str) -> torch.Tensor:
    """Uniform scores, reproducible per (seed, module name) whatever order modules are visited in."""
    mixed = (seed * 1_000_003 + zlib.crc32(module_name.encode())) % 2**63
    return torch.rand(shape, generator=torch.Generator(device="cpu").manual_seed(mixed))
