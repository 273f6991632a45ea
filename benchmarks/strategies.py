"""Which forward/backward strategy for a sparse delta, by density and device: measured per layer shape.

Strategies (one linear layer, forward + backward with gradients for the input and the delta values):
- fold:        W + delta rebuilt (not kept) and one matmul; dense weight grad gathered to the support (the
               library's path in every precision at density >= functional.COORDINATEWISE_GRAD_BELOW), with the
               support kept as a bitmask, as 16-bit block offsets (packed.py; the "form" column says which of the
               two the layers choose) or as an int32 index (0.1.0)
- additive:    base matmul + a matmul with the dense delta (0.1.0's path for half-precision and quantized bases)
- row:         whole output rows only: a small matmul with the (rows x in) block (the library's row path)
- gather:      fold forward, but the values' gradient computed coordinate by coordinate (sum_t g[t,r] x[t,c])
               instead of a dense grad_W GEMM (the library's path below COORDINATEWISE_GRAD_BELOW, set from
               this table: it wins only at the lowest densities)
- csr:         additive with torch.sparse CSR for the delta (benchmark only)

    python benchmarks/strategies.py                   # SmolLM2 shapes, 512 tokens, CPU (or CUDA if present)
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.benchmark import Measurement, Timer

from peft_cpl.tuner import functional as SF
from peft_cpl.tuner import packed as P
from peft_cpl.tuner.support import Support, expand_rows


def gradient_path(threshold: float, run):
    """`run` with the library's coordinate-wise gradient forced on (threshold 1) or off (threshold 0)."""

    def forced():
        saved = SF.COORDINATEWISE_GRAD_BELOW
        SF.COORDINATEWISE_GRAD_BELOW = threshold
        try:
            run()
        finally:
            SF.COORDINATEWISE_GRAD_BELOW = saved

    return forced


def csr_linear(x, weight, indices, values, shape):
    rows, cols = indices // shape[1], indices % shape[1]
    crow = torch.zeros(shape[0] + 1, dtype=torch.int64, device=x.device)
    crow[1:] = torch.cumsum(torch.bincount(rows, minlength=shape[0]), 0)
    delta = torch.sparse_csr_tensor(crow, cols, values, size=shape)
    return F.linear(x, weight) + torch.sparse.mm(delta, x.reshape(-1, shape[1]).T).T.reshape(*x.shape[:-1], shape[0])


def strategies(x, weight, indices, values, shape, rows, row_values) -> dict:
    """One forward+backward per strategy, as closures over this layer's tensors.

    "fold bitmask" and "fold blocked" keep the support in the two compact forms of packed.py; "fold int32" as 0.1.0
    did, an int32 index per value.
    """
    out_features = shape[0]
    packed = P.pack(Support.of_indices(indices, shape))
    bitmask, blocked, flat = (P.pack(Support.of_indices(indices, shape), form=form)
                              for form in (P.BITMASK, P.BLOCKED, P.FLAT))

    def additive():
        (F.linear(x, weight) + SF.sparse_delta_linear(x, None, None, [packed], [values])).sum().backward()

    def row():
        (F.linear(x, weight) + SF.row_delta_linear(x, rows, row_values, out_features)).sum().backward()

    def fold(support=packed):
        SF.sparse_delta_linear(x, weight, None, [support], [values]).sum().backward()

    return {
        "fold bitmask": gradient_path(0.0, lambda: fold(bitmask)),
        "fold blocked": gradient_path(0.0, lambda: fold(blocked)),
        "fold int32": gradient_path(0.0, lambda: fold(flat)),
        "additive": gradient_path(0.0, additive),
        "row": row,
        "gather": gradient_path(1.0, lambda: fold(flat)),
        "csr": lambda: csr_linear(x, weight, indices, values, shape).sum().backward(),
    }


def measure(fn: Callable[[], object], repeats: int) -> float:
    """Median milliseconds of `repeats` timed calls; torch's Timer runs 2 warm-up calls before each and syncs the
    device."""
    timer = Timer("fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())  # Timer's default: 1 thread
    return Measurement.merge([timer.timeit(1) for _ in range(repeats)])[0].median * 1000


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
    names = ("dense W", "fold bitmask", "fold blocked", "fold int32", "additive", "row", "gather", "csr", "form",
             "index B/value")
    header = f"{'shape':>10} {'density':>7} " + " ".join(f"{name:>12}" for name in names)
    print(header)
    print("-" * len(header))
    for text in args.shapes.split(","):
        out_features, in_features = map(int, text.split("x"))
        shape = (out_features, in_features)
        torch.manual_seed(0)
        weight = torch.randn(shape, device=device)
        x = torch.randn(args.tokens, in_features, device=device, requires_grad=True)
        full_weight = weight.clone().requires_grad_(True)
        dense_ms = measure(lambda w=full_weight, inputs=x: F.linear(inputs, w).sum().backward(), args.repeats)
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
                    times[name] = measure(run, repeats)
                except RuntimeError as error:  # e.g. sparse kernels missing on a backend
                    print(f"  {name} unavailable: {error}")
                    times[name] = float("nan")
            form = P.default_form(count, weight.numel())  # the layers' choice, and its bytes
            print(f"{text:>10} {density:>7} {dense_ms:>12.2f} " + " ".join(f"{times[n]:>12.2f}" for n in runs)
                  + f" {form:>12} {P.packed_bytes(count, weight.numel())[form] / count:>12.3f}")


if __name__ == "__main__":
    main()
