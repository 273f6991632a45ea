"""The toolkit's one model loader: a base model and its tokenizer, from a local Hugging Face folder or the embedded
default (SmolLM2-135M-Instruct, see default_model.py), optionally quantized with bitsandbytes.

The CLI, the demo and the examples load through `load_model`; torch and transformers are imported only when a model
is loaded, so the CLI's help does not pay for them.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

DEFAULT_MODEL = "smollm2"  # the name that stands for the embedded SmolLM2-135M-Instruct
QUANTIZATIONS = ("8bit", "4bit")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def model_path(name_or_path: str | os.PathLike | None = None) -> Path:
    """A local Hugging Face model folder; None or 'smollm2' is the embedded SmolLM2-135M-Instruct (converted once)."""
    if name_or_path is None or str(name_or_path) == DEFAULT_MODEL:
        from .default_model import default_model_path

        return default_model_path()
    path = Path(name_or_path)
    if not path.is_dir():
        raise FileNotFoundError(
            f"model folder not found: {path} (give a local Hugging Face model folder or '{DEFAULT_MODEL}')"
        )
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a Hugging Face model folder: it has no config.json")
    return path


def load_model(
    name_or_path: str | os.PathLike | None = None, quantize: str | None = None, dtype: torch.dtype | None = None
):
    """(model in eval mode, tokenizer) from `model_path(name_or_path)`.

    `quantize` is None, '8bit' or '4bit' (bitsandbytes; 4-bit computes in `dtype`); `dtype` defaults to float32.
    4-bit weights are kept in bitsandbytes' canonical layout from the start, so that every CPU computes the same
    numbers before any evaluation (tuner/bnb.py). The tokenizer must have a chat template: prompts are built with it.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from ..tuner.bnb import keep_canonical_layout

    if quantize not in (None, *QUANTIZATIONS):
        raise ValueError(f"quantize must be None or one of {QUANTIZATIONS}, got {quantize!r}")
    if quantize and importlib.util.find_spec("bitsandbytes") is None:
        raise ValueError(f"quantize={quantize!r} needs bitsandbytes: pip install 'peft-cpl[bnb]'")
    dtype = torch.float32 if dtype is None else dtype
    path = model_path(name_or_path)
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise FileNotFoundError(f"{path} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}): save the model's "
                                "tokenizer there with tokenizer.save_pretrained(folder)")
    kwargs: dict = {"dtype": dtype}
    if quantize:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_8bit=quantize == "8bit", load_in_4bit=quantize == "4bit", bnb_4bit_compute_dtype=dtype
        )
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs).eval()
    keep_canonical_layout(model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if not tokenizer.chat_template:
        raise ValueError(f"the tokenizer in {path} has no chat template: prompts are built with it")
    return model, tokenizer
