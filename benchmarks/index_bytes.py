"""Bytes per stored coordinate of a CPL adapter file (values, indices, total) across densities, beside PEFT's SHiRA.

Model: SmolLM2-135M's geometry (hidden 576, MLP 1536, 9 heads / 3 KV heads) with 2 layers and random weights:
bytes per coordinate do not depend on the weights' values or on how many layers there are. Supports: random
(unstructured: the hardest case for any index code), magnitude (top |W|), and whole rows. SHiRA is measured by saving
a real PEFT SHiRA adapter on the same model and dividing its file size by its coordinate count.

    python benchmarks/index_bytes.py
"""

from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path

import torch
from peft import ShiraConfig, get_peft_model
from safetensors import safe_open
from transformers import LlamaConfig, LlamaForCausalLM

import peft_cpl


def smollm2_geometry(layers: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=layers,
        num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config)


def file_breakdown(directory: Path) -> tuple[int, int, int, int]:
    """(file bytes, value bytes, index bytes, coordinates) of a saved adapter."""
    path = directory / "adapter_model.safetensors"
    values = indices = coordinates = 0
    with safe_open(path, framework="pt") as handle:
        for key in handle.keys():  # noqa: SIM118 -- safe_open is not iterable
            tensor = handle.get_tensor(key)
            size = tensor.numel() * tensor.element_size()
            if "indices" in key:
                indices += size
            else:
                values += size
                coordinates += tensor.numel()
    return path.stat().st_size, values, indices, coordinates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--densities", type=float, nargs="+", default=[0.01, 0.03, 0.1, 0.3, 0.5, 1.0])
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        shira = get_peft_model(smollm2_geometry(args.layers), ShiraConfig(r=32, target_modules="all-linear"))
        shira.save_pretrained(Path(scratch) / "shira")
        shira_file, _, shira_index, shira_coords = file_breakdown(Path(scratch) / "shira")
        shira_per_coordinate = shira_file / shira_coords
        print(f"PEFT SHiRA r=32 (random mask): {shira_coords:,} coordinates, {shira_per_coordinate:.2f} B/coord "
              f"in the file, of which indices {shira_index / shira_coords:.2f} B/coord\n")
        header = (f"{'support':<10} {'density':>7} {'coords':>11} {'file B/c':>9} {'values B/c':>10} "
                  f"{'index B/c':>9} {'SHiRA file (same coords)':>25} {'ratio':>6}")
        print(header)
        print("-" * len(header))
        for support, granularity in (("random", "element"), ("magnitude", "element"), ("random", "row")):
            for density in args.densities:
                if support == "random" and density == 1.0:
                    config = peft_cpl.CPLConfig(support="dense")
                else:
                    config = peft_cpl.CPLConfig(support=support, density=density, granularity=granularity)
                model = get_peft_model(smollm2_geometry(args.layers), config)
                target = Path(scratch) / f"{support}-{granularity}-{density}"
                model.save_pretrained(target)
                size, values, indices, coords = file_breakdown(target)
                shira_same = shira_per_coordinate * coords
                label = support if granularity == "element" else "rows"
                print(f"{label:<10} {density:>7.2f} {coords:>11,} {size / coords:>9.3f} {values / coords:>10.3f} "
                      f"{indices / coords:>9.3f} {shira_same / 2**20:>21.1f} MiB {shira_same / size:>6.2f}x")
                del model
        print(f"\nEntropy bound for an unstructured support at density 1%: "
              f"{_entropy_bits_per_coordinate(0.01) / 8:.3f} B/coord; at 10%: "
              f"{_entropy_bits_per_coordinate(0.1) / 8:.3f}; at 30%: {_entropy_bits_per_coordinate(0.3) / 8:.3f}")


def _entropy_bits_per_coordinate(density: float) -> float:
    if density <= 0 or density >= 1:
        return 0.0
    return -(density * math.log2(density) + (1 - density) * math.log2(1 - density)) / density


if __name__ == "__main__":
    main()
