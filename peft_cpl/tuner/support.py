"""The support of one weight (which coordinates carry a trainable value) and how scores choose it.

A `Support` is the one value that travels from selection to the layer to the adapter file: sorted flat coordinates
into the weight as stored, its shape, and, when it is made of whole output rows, those rows. Granularity is decided
once, by whoever builds the support, and never guessed again from the coordinates. Every kind of support (random,
magnitude, collaborative) is "the best-scoring eligible units, capped at a density" and differs only in its scores
(scoring.py). Plain tensors, no model in sight.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Support:
    """Trainable coordinates of one weight of `shape` (as stored).

    `indices` are sorted, unique flat coordinates. `rows` are the output rows when the support is whole rows
    (`output_dim` says which dimension of `shape` indexes outputs: 1 for transformers' Conv1D); None otherwise.
    """

    shape: tuple[int, ...]
    indices: torch.Tensor
    rows: torch.Tensor | None = None
    output_dim: int = 0

    @classmethod
    def of_indices(cls, indices: torch.Tensor, shape: tuple[int, ...]) -> Support:
        """An element support; checks that the coordinates are sorted, unique and inside the weight."""
        shape = tuple(int(s) for s in shape)
        indices = indices.reshape(-1).to(torch.int64)
        numel = math.prod(shape)
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= numel):
            raise ValueError(f"support indices must lie in [0, {numel}) for a weight of shape {shape}")
        if indices.numel() > 1 and not bool((indices[1:] > indices[:-1]).all()):
            raise ValueError("support indices must be sorted and unique")
        return cls(shape, indices)

    @classmethod
    def of_rows(cls, rows: torch.Tensor, shape: tuple[int, ...], output_dim: int = 0) -> Support:
        """Every coordinate of the given output rows of a 2-D weight."""
        shape = tuple(int(s) for s in shape)
        if len(shape) != 2:
            raise ValueError(f"a row support needs a 2-D weight, got shape {shape}")
        rows = torch.unique(rows.reshape(-1).to(torch.int64))  # sorted
        if rows.numel() and (int(rows[0]) < 0 or int(rows[-1]) >= shape[output_dim]):
            raise ValueError(f"row ids must lie in [0, {shape[output_dim]}) for a weight of shape {shape}")
        return cls(shape, expand_rows(rows, shape, output_dim), rows, output_dim)

    @classmethod
    def dense(cls, shape: tuple[int, ...]) -> Support:
        shape = tuple(int(s) for s in shape)
        return cls(shape, torch.arange(math.prod(shape)))

    @classmethod
    def empty(cls, shape: tuple[int, ...]) -> Support:
        return cls(tuple(int(s) for s in shape), torch.zeros(0, dtype=torch.int64))

    @property
    def size(self) -> int:
        """Number of trainable coordinates."""
        return self.indices.numel()

    @property
    def granularity(self) -> str:
        return "element" if self.rows is None else "row"

    def to(self, device: torch.device | str) -> Support:
        rows = None if self.rows is None else self.rows.to(device)
        return Support(self.shape, self.indices.to(device), rows, self.output_dim)


def index_dtype(numel: int) -> torch.dtype:
    """In-memory dtype of a weight's flat coordinates: int32 while every coordinate fits, int64 beyond."""
    return torch.int32 if numel <= 2**31 else torch.int64


def choose_support(
    unit_scores: torch.Tensor,
    shape: tuple[int, ...],
    *,
    eligible: torch.Tensor | None = None,
    density: float | None = None,
    granularity: str = "element",
    output_dim: int = 0,
) -> Support:
    """The highest-scoring eligible units, at most `density` of the weight's units.

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
        return Support(tuple(int(s) for s in shape), units)
    return Support.of_rows(units, shape, output_dim)


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
