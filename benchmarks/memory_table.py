"""The memory estimator's table for 1.5B-8B models: which CPL settings fit in 16, 24 and 48 GiB.

    python benchmarks/memory_table.py                    # writes benchmarks/results/memory_table.md
    python benchmarks/memory_table.py --configs benchmarks/configs/qwen2.5-7b.json --batch 4 --seq 512

The models are built from their published configs (benchmarks/configs/*.json) on the meta device: no weights are
needed. Train-state bytes (values, gradients, optimizer state, index) are exact; activations are the estimator's
estimate (peft_cpl/toolkit/memory.py), here with gradient checkpointing.
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

from transformers import AutoConfig

from peft_cpl.toolkit.memory import cpl_model_on_meta, estimate_memory
from peft_cpl.tuner import atomic

CONFIGS = sorted((Path(__file__).parent / "configs").glob("*.json"))
BUDGETS_GIB = (16, 24, 48)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", type=Path, nargs="+", default=CONFIGS)
    parser.add_argument("--densities", type=float, nargs="+", default=[0.6, 0.3, 0.05])
    parser.add_argument("--bases", nargs="+", default=["bf16", "int8", "nf4"])
    parser.add_argument("--optimizers", nargs="+", default=["adamw", "adamw8bit"])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/memory_table.md"))
    args = parser.parse_args()
    lines = [
        f"Batch {args.batch} x {args.seq}, gradient checkpointing, fp32 trained values, no guard. GiB. 'fits' lists "
        f"the budgets ({', '.join(map(str, BUDGETS_GIB))} GiB) that hold the training peak; selection's peak is the "
        "base plus 4 B per targeted coordinate with the accumulators on the GPU (`accumulate_on=\"cpu\"` leaves "
        "one module's temporaries there instead).",
        "",
        "| model | density | base | optimizer | fused | B / trained value | train state | training peak | "
        "selection peak | fits |",
        "| --- | ---: | --- | --- | --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for path in args.configs:
        model = cpl_model_on_meta(AutoConfig.from_pretrained(path))  # built once, estimated many times
        for density, base, optimizer, fused in itertools.product(
            args.densities, args.bases, args.optimizers, (False, True)
        ):
            estimate = estimate_memory(
                model, density=density, base=base, optimizer=optimizer, fused=fused, batch_size=args.batch,
                seq_len=args.seq, gradient_checkpointing=True,
            )
            fits = [str(gib) for gib in BUDGETS_GIB if estimate.fits(gib, selection=False)]
            lines.append(
                f"| {path.stem} | {density} | {base} | {optimizer} | {'yes' if fused else 'no'} | "
                f"{estimate.bytes_per_trained_value:.2f} | {estimate.train_state / 2**30:.1f} | "
                f"{estimate.peak / 2**30:.1f} | {(estimate.base_weights + estimate.selection_peak) / 2**30:.1f} | "
                f"{', '.join(fits) or '-'} |"
            )
    text = "\n".join(lines) + "\n"
    print(text)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_text(args.output, text)


if __name__ == "__main__":
    main()
