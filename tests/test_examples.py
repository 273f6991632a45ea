"""Every example in examples/ runs end to end on the tiny model (`--tiny`) and does what it says."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from peft_cpl.toolkit.hf_trainer import GUARD_STATE_FILE

from .conftest import cpl_layers

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture
def example(monkeypatch):
    """Import an example as a script would see it (examples/ on sys.path, for its `_common` and `_tiny` helpers)."""
    monkeypatch.syspath_prepend(str(EXAMPLES))

    def load(name: str):
        spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load


def test_every_example_is_tested():
    tested = {"quickstart", "knowledge_injection_trainer", "trl_sft", "quantized_8bit", "multi_process"}
    assert {path.stem for path in EXAMPLES.glob("*.py") if not path.stem.startswith("_")} == tested


def test_quickstart(example, tmp_path):
    result = example("quickstart").main(["--tiny", "--output", str(tmp_path)])
    assert result["losses"][-1] < result["losses"][0] and result["outcome"].learned > 0
    assert result["reloaded_equal"] and result["merged_max_diff"] < 1e-4
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "adapter" / "selection_report.json").is_file()


def test_knowledge_injection_trainer_and_its_resume(example, tmp_path):
    module = example("knowledge_injection_trainer")
    first = module.main(["--tiny", "--epochs", "1", "--output", str(tmp_path)])
    assert first["steps"] == 2 and first["guard"].steps == 2 and first["guard"].reverted > 0
    assert (tmp_path / "checkpoint-2" / GUARD_STATE_FILE).is_file()
    resumed = module.main(["--tiny", "--epochs", "3", "--resume", "--output", str(tmp_path)])
    assert resumed["steps"] == 6 and resumed["guard"].steps == 6  # the guard's count continued from the checkpoint
    assert resumed["outcome"].learned > 0
    state = json.loads((tmp_path / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["global_step"] == 6


def test_trl_sft(example, tmp_path):
    pytest.importorskip("trl")
    pytest.importorskip("datasets")
    result = example("trl_sft").main(["--tiny", "--output", str(tmp_path)])
    assert result["steps"] == 8 and result["outcome"].learned > 0
    layers = cpl_layers(result["model"])
    assert layers and all(layer.cpl_values["default"].numel() > 0 for layer in layers.values())
    assert any(layer.cpl_values["default"].detach().any() for layer in layers.values())
    reloaded = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tmp_path / "tiny-base"), tmp_path / "adapter"
    )
    for name, layer in cpl_layers(reloaded).items():
        assert torch.equal(layer.cpl_values["default"], layers[name].cpl_values["default"])


def test_quantized_8bit(example, tmp_path):
    pytest.importorskip("bitsandbytes")
    result = example("quantized_8bit").main(["--tiny", "--output", str(tmp_path)])
    assert 0 < result["report"].retained <= 1
    assert sum(result["unmerged"].values()) > 0
    agree = sum(result["float"][key] == result["unmerged"][key] for key in result["unmerged"])
    assert agree >= len(result["unmerged"]) - 1  # lossless up to the int8 kernels' activation rounding
    assert not hasattr(result["float_model"].config, "quantization_config")


def test_multi_process_under_accelerate_launch(tmp_path):
    """Two CPU processes: the same support on both, a plain accelerate loop and the Trainer, written by one."""
    import os
    import re
    import subprocess
    import sys

    from .test_distributed import free_port

    launched = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
         "--main_process_port", str(free_port()), str(EXAMPLES / "multi_process.py"), "--tiny", "--epochs", "2",
         "--output", str(tmp_path)],
        capture_output=True, text=True, timeout=240, cwd=EXAMPLES, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert launched.returncode == 0, launched.stderr[-4000:]
    assert "(the same support on all 2 processes)" in launched.stdout
    for name in ("loop", "trainer"):
        assert launched.stdout.count(f"{name}: adapter saved to") == 1  # by the main process only
        assert (tmp_path / f"adapter-{name}" / "adapter_model.safetensors").is_file()
        learned = re.search(rf"{name}: learned (\d+)/", launched.stdout)
        assert learned and int(learned.group(1)) > 0, launched.stdout
