"""Which forward/backward strategy for a sparse delta, by density and device: measured per layer shape.

Strategies (one linear layer, forward + backward with gradients for the input and the delta values):
- fold:        W + delta rebuilt (not kept) and one matmul; dense weight grad gathered to the support (the
               library's path for fp32 bases)
- additive:    base matmul + a matmul with the dense delta (the library's path for half-precision and quantized
               bases, where W + delta would round small updates away)
- row:         whole output rows only: a small matmul with the (rows x in) block (the library's row path)
- gather-grad: fold forward, but the values' gradient computed coordinate by coordinate (sum_t g[t,r] x[t,c])
               instead of a dense grad_W GEMM (benchmark only: it loses everywhere on CPU, see the table)
- csr:         additive with torch.sparse CSR for the delta (benchmark only)

    python benchmarks/strategies.py                   # SmolLM2 shapes, 512 tokens, CPU (or CUDA if present)
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F

from peft_cpl import functional as SF
from peft_cpl.support import expand_rows

from timing import timed  # benchmarks/timing.py


def gather_grad_linear(x, weight, indices, values, shape):
    """Fold forward, coordinate-wise backward for the values (chunked)."""

    class GatherGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, values):
            ctx.save_for_backward(x, values)
            return F.linear(x, SF.scatter_delta(shape, indices, values, base=weight))

        @staticmethod
        def backward(ctx, grad):
            x, values = ctx.saved_tensors
            grad_x = grad @ SF.scatter_delta(shape, indices, values, base=weight)
            g_t, x_t = grad.reshape(-1, shape[0]).T.contiguous(), x.reshape(-1, shape[1]).T.contiguous()
            rows, cols = indices // shape[1], indices % shape[1]
            grad_values = torch.empty_like(values)
            for start in range(0, indices.numel(), 16384):
                part = slice(start, start + 16384)
                grad_values[part] = (g_t[rows[part]] * x_t[cols[part]]).sum(1)
            return grad_x, grad_values

    return GatherGrad.apply(x, values)


def csr_linear(x, weight, indices, values, shape):
    rows, cols = indices // shape[1], indices % shape[1]
    crow = torch.zeros(shape[0] + 1, dtype=torch.int64, device=x.device)
    crow[1:] = torch.cumsum(torch.bincount(rows, minlength=shape[0]), 0)
    delta = torch.sparse_csr_tensor(crow, cols, values, size=shape)
    return F.linear(x, weight) + torch.sparse.mm(delta, x.reshape(-1, shape[1]).T).T.reshape(*x.shape[:-1], shape[0])


def strategies(x, weight, indices, values, shape, rows, row_values) -> dict:
    """One forward+backward per strategy, as closures over this layer's tensors."""
    out_features = shape[0]

    def additive():
        (F.linear(x, weight) + SF.sparse_delta_linear(x, None, None, indices, values, shape)).sum().backward()

    def row():
        (F.linear(x, weight) + SF.row_delta_linear(x, rows, row_values, out_features)).sum().backward()

    return {
        "fold": lambda: SF.sparse_delta_linear(x, weight, None, indices, values, shape).sum().backward(),
        "additive": additive,
        "row": row,
        "gather": lambda: gather_grad_linear(x, weight, indices, values, shape).sum().backward(),
        "csr": lambda: csr_linear(x, weight, indices, values, shape).sum().backward(),
    }


def measure(fn, repeats: int, device: str) -> float:
    """Median milliseconds after one warm-up call."""
    fn()
    return statistics.median(timed(fn, repeats, device)) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--densities", type=float, nargs="+", default=[0.001, 0.01, 0.1, 0.3, 0.5])
    parser.add_argument("--shapes", default="576x576,1536x576,576x1536", help="out x in, comma-separated")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = args.device
    print(f"device {device}, {args.tokens} tokens, fp32, ms per forward+backward (median of {args.repeats})")
    names = ("dense W", "fold", "additive", "row", "gather", "csr")
    header = f"{'shape':>10} {'density':>7} " + " ".join(f"{name:>8}" for name in names)
    print(header)
    print("-" * len(header))
    for text in args.shapes.split(","):
        out_features, in_features = map(int, text.split("x"))
        shape = (out_features, in_features)
        torch.manual_seed(0)
        weight = torch.randn(shape, device=device)
        x = torch.randn(args.tokens, in_features, device=device, requires_grad=True)
        full_weight = weight.clone().requires_grad_(True)
        dense_ms = measure(
            lambda w=full_weight, inputs=x: F.linear(inputs, w).sum().backward(), args.repeats, device
        )
        for density in args.densities:
            count = max(1, round(density * weight.numel()))
            indices = torch.sort(torch.randperm(weight.numel(), device=device)[:count]).values
            values = torch.zeros(count, device=device, requires_grad=True)
            rows = torch.randperm(out_features, device=device)[: max(1, round(density * out_features))].sort().values
            row_values = torch.zeros(rows.numel() * in_features, device=device, requires_grad=True)
            assert expand_rows(rows, shape).numel() == row_values.numel()
            runs = strategies(x, weight, indices, values, shape, rows, row_values)
            times = {}
            for name, run in runs.items():
                repeats = 1 if name == "gather" and density > 0.05 else args.repeats
                try:
                    times[name] = measure(run, repeats, device)
                except RuntimeError as error:  # e.g. sparse kernels missing on a backend
                    print(f"  {name} unavailable: {error}")
                    times[name] = float("nan")
            print(f"{text:>10} {density:>7} {dense_ms:>8.2f} " + " ".join(f"{times[n]:>8.2f}" for n in runs))


if __name__ == "__main__":
    main()
