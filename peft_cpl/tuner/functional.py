"""The sparse-delta math as plain functions on tensors, used by every CPL layer.

A delta is (support, values): a `PackedSupport` (packed.py: the support as a layer keeps it) and one value per
support coordinate, in the flat order of the weight as stored. The autograd function below never keeps a dense
weight-sized tensor alive between forward and backward: the effective weight is rebuilt where it is needed and the
dense weight gradient exists only inside the layer's backward, where it is gathered down to the support.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from . import packed as P
from .packed import PackedSupport


def scatter_delta(
    supports: Sequence[PackedSupport],
    values: Sequence[torch.Tensor],
    *,
    base: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Dense `base + sum of the deltas` (or the deltas alone when `base` is None) as a new tensor."""
    dtype = dtype or (base.dtype if base is not None else values[0].dtype)
    if base is None:
        dense = torch.zeros(supports[0].shape, dtype=dtype, device=values[0].device)
    else:
        dense = base.detach().to(dtype=dtype, copy=True)
    for support, delta in zip(supports, values):
        P.add_into(dense, support, delta)
    return dense


def effective_weight(
    weight: torch.Tensor | Callable[[], torch.Tensor] | None,
    supports: Sequence[PackedSupport],
    values: Sequence[torch.Tensor],
    dtype: torch.dtype,
) -> torch.Tensor:
    """(W + deltas) in the compute `dtype`: summed in fp32, where a half-precision or dequantized W is exact, then
    rounded once, as mixed precision rounds its fp32 master weights. The trained values themselves stay exact.

    `weight` is the base weight, a function returning it (dequantized: quantized bases), or None (deltas alone).
    """
    dense = weight() if callable(weight) else weight
    if dense is None or dense.dtype == dtype == torch.float32:
        return scatter_delta(supports, values, base=dense, dtype=dtype)
    return scatter_delta(supports, values, base=dense, dtype=torch.float32).to(dtype)


class _SparseDeltaLinear(torch.autograd.Function):
    """y = x @ (W + sum of deltas)^T + b with gradients for x and the delta values only (W and b frozen).

    One GEMM forward and one for the input gradient, in every precision; a quantized W is dequantized (by
    bitsandbytes) in the forward and again in the backward, never kept between them.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, supports, transposed, *values):
        effective = effective_weight(weight, supports, values, x.dtype)
        out = x @ effective if transposed else F.linear(x, effective)
        del effective
        if bias is not None:
            out = out + bias.to(out.dtype)
        if callable(weight):
            ctx.save_for_backward(x, *values)
            ctx.weight = weight
        else:
            ctx.save_for_backward(x, weight, *values)
        ctx.supports, ctx.transposed, ctx.callable_weight = supports, transposed, callable(weight)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.callable_weight:
            x, *values = ctx.saved_tensors
            weight = ctx.weight
        else:
            x, weight, *values = ctx.saved_tensors
        grad_x = grad_bias = None
        # expanded once for both uses below, and freed with this layer's backward
        supports = [P.expanded(support, value.numel()) for support, value in zip(ctx.supports, values)]
        if ctx.needs_input_grad[0]:
            effective = effective_weight(weight, supports, values, grad_out.dtype)
            grad_x = grad_out @ effective.T if ctx.transposed else grad_out @ effective
            del effective
        if ctx.needs_input_grad[2]:
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
        grad_values = [
            support_weight_grad(grad_out, x, support, ctx.transposed, value.numel()).to(value.dtype)
            if wanted else None
            for support, value, wanted in zip(supports, values, ctx.needs_input_grad[5:])
        ]
        return grad_x, None, grad_bias, None, None, *grad_values


# Below this density the support's gradient is computed coordinate by coordinate instead of through the dense
# grad_out^T x GEMM. Measured on CPU (benchmarks/strategies.py, SmolLM2 shapes, 512 tokens): coordinate-wise is ~25%
# faster at 0.1%, breaks even near 0.4% and is 1.4-1.6x slower at 1%. Not measured on GPU.
COORDINATEWISE_GRAD_BELOW = 0.003


def weight_grad_factors(
    grad_out: torch.Tensor, x: torch.Tensor, transposed: bool = False, dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(left, right) with the linear layer's weight gradient, as the weight is stored, equal to left^T @ right.

    grad_W = grad_out^T x for nn.Linear's (out, in) weight; x^T grad_out for Conv1D's (in, out) weight.
    """
    dtype = dtype or grad_out.dtype
    grad_2d = grad_out.reshape(-1, grad_out.shape[-1]).to(dtype)
    x_2d = x.reshape(-1, x.shape[-1]).to(dtype)
    return (x_2d, grad_2d) if transposed else (grad_2d, x_2d)


def support_weight_grad(
    grad_out: torch.Tensor, x: torch.Tensor, support: PackedSupport, transposed: bool = False, count: int | None = None
) -> torch.Tensor:
    """Gradient of a linear layer's weight at the support coordinates only: (grad_out^T x) there.

    `count` (the number of support coordinates, i.e. of values) saves reading it off the support.
    """
    left, right = weight_grad_factors(grad_out, x, transposed)
    count = P.size(support) if count is None else count
    if count >= COORDINATEWISE_GRAD_BELOW * support.numel:
        return P.take(left.T @ right, support)
    indices = P.positions(support)
    left_t, right_t = left.T.contiguous(), right.T.contiguous()
    first, second = indices // right.shape[1], indices % right.shape[1]
    grad = torch.empty(indices.numel(), dtype=left.dtype, device=left.device)
    chunk = max(1, 2**24 // max(left.shape[0], 1))  # at most 2^24 products (64 MB in fp32) at a time
    for start in range(0, indices.numel(), chunk):
        part = slice(start, start + chunk)
        grad[part] = (left_t[first[part]] * right_t[second[part]]).sum(1)
    return grad


def sparse_delta_linear(
    x: torch.Tensor,
    weight: torch.Tensor | Callable[[], torch.Tensor] | None,
    bias: torch.Tensor | None,
    supports: Sequence[PackedSupport],
    values: Sequence[torch.Tensor],
    transposed: bool = False,
) -> torch.Tensor:
    """Linear layer with sparse deltas on its weight (a tensor, or a function that dequantizes it); `weight=None`
    gives the deltas' contribution alone.

    `transposed=True` is the Conv1D layout, where the weight is stored (in_features, out_features).
    """
    return _SparseDeltaLinear.apply(x, weight, bias, tuple(supports), transposed, *values)


def row_delta_linear(
    x: torch.Tensor, rows: torch.Tensor, values: torch.Tensor, out_features: int, transposed: bool = False
) -> torch.Tensor:
    """Contribution of a delta made of whole output rows: a small dense matmul, no weight-sized tensor at all.

    `values` follow the flat order of the weight as stored: row by row, or for Conv1D's (in, out) layout input by
    input across the chosen output columns.
    """
    row_values = (values.view(-1, rows.numel()).T if transposed else values.view(rows.numel(), -1)).to(x.dtype)
    partial = F.linear(x, row_values)
    out = x.new_zeros(*x.shape[:-1], out_features)
    return out.index_add(-1, rows, partial)


def sparse_delta_embedding(ids: torch.Tensor, support: PackedSupport, values: torch.Tensor) -> torch.Tensor:
    """Delta rows looked up for `ids`, built only for the rows that occur (cost O(support + batch), not O(weight))."""
    num_rows, dim = support.shape
    indices = P.positions(support)
    unique_ids, inverse = torch.unique(ids, return_inverse=True)
    slot_of_row = torch.full((num_rows,), -1, dtype=torch.int64, device=ids.device)
    slot_of_row[unique_ids] = torch.arange(unique_ids.numel(), device=ids.device)
    flat = indices.to(torch.int64)
    slots = slot_of_row[flat // dim]
    used = slots >= 0
    table = values.new_zeros(unique_ids.numel(), dim)
    table = table.index_put((slots[used], flat[used] % dim), values[used])
    return F.embedding(inverse, table)
