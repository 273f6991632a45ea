"""Loading a CPL adapter: exact in a fresh process, and refused loudly (with nothing loaded) when it does not fit."""

from __future__ import annotations

import struct
import subprocess
import sys
import textwrap

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

from peft_cpl import CPLConfig
from peft_cpl.tuner.codec import encode_support
from peft_cpl.tuner.support import Support

from .conftest import cpl_layers, randomize_values, tiny_llama

TARGETS = ["q_proj", "v_proj", "down_proj", "embed_tokens"]


@pytest.fixture
def saved(tmp_path):
    """A trained-looking adapter on a tiny Llama, with per-module support sizes decided after config time."""
    model = get_peft_model(tiny_llama(seed=0), CPLConfig(target_modules=TARGETS))
    generator = torch.Generator().manual_seed(0)
    for index, layer in enumerate(cpl_layers(model).values()):
        numel = layer.delta_shape[0] * layer.delta_shape[1]
        count = (index * 97) % numel
        chosen = torch.sort(torch.randperm(numel, generator=generator)[:count]).values
        layer.set_support("default", Support.of_indices(chosen, layer.delta_shape))
    randomize_values(model)
    ids = torch.arange(16).reshape(2, 8)
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    model.save_pretrained(tmp_path / "adapter")
    torch.save({"ids": ids, "expected": expected}, tmp_path / "expected.pt")
    return tmp_path


def test_fresh_process_restores_outputs_exactly(saved):
    script = textwrap.dedent(
        f"""
        import torch
        import peft_cpl  # registers CPL; must precede PeftModel.from_pretrained
        from peft import PeftModel
        from transformers import LlamaConfig, LlamaForCausalLM
        torch.manual_seed(0)
        base = LlamaForCausalLM(LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)).eval()
        model = PeftModel.from_pretrained(base, r"{saved / 'adapter'}")
        data = torch.load(r"{saved / 'expected.pt'}")
        with torch.no_grad():
            out = model(input_ids=data["ids"]).logits
        assert torch.equal(out, data["expected"]), (out - data["expected"]).abs().max()
        print("exact")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "exact" in result.stdout


def test_loading_without_importing_peft_cpl_fails_naming_the_type(saved):
    """Documented limit: PEFT has no plugin entry points, so `import peft_cpl` must come first."""
    script = f"from peft import PeftConfig; PeftConfig.from_pretrained(r'{saved / 'adapter'}')"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "CPL" in result.stderr


def _load(path, **overrides):
    return PeftModel.from_pretrained(tiny_llama(seed=0, **overrides), path)


def test_shape_mismatch_names_module_and_shapes(saved):
    with pytest.raises(ValueError, match=r"q_proj: adapter was made for a weight of shape \(64, 64\), base has"):
        _load(saved / "adapter", hidden_size=32, intermediate_size=64)


def test_missing_and_unknown_modules(saved):
    with pytest.raises(ValueError, match=r"layers\.2\.self_attn\.q_proj: no entry in the adapter file"):
        _load(saved / "adapter", num_hidden_layers=3)
    with pytest.raises(ValueError, match=r"layers\.1\.self_attn\.q_proj: in the adapter file but not a CPL module"):
        _load(saved / "adapter", num_hidden_layers=1)


def _rewrite(path, edit):
    file = path / "adapter" / "adapter_model.safetensors"
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file)


def test_corrupted_index_record(saved):
    def flip(tensors):
        record = tensors["base_model.model.model.layers.0.mlp.down_proj.cpl_indices"]
        record[-1] ^= 0x01

    _rewrite(saved, flip)
    with pytest.raises(ValueError, match=r"layers\.0\.mlp\.down_proj: corrupted index record .*checksum"):
        _load(saved / "adapter")


def test_corrupted_values(saved):
    def nudge(tensors):
        tensors["base_model.model.model.layers.1.self_attn.v_proj.cpl_values"][3] += 1.0

    _rewrite(saved, nudge)
    with pytest.raises(ValueError, match=r"layers\.1\.self_attn\.v_proj: values checksum mismatch"):
        _load(saved / "adapter")


def test_indices_out_of_range(saved):
    def widen(tensors):
        key = "base_model.model.model.layers.0.self_attn.q_proj"
        values = tensors[f"{key}.cpl_values"]
        indices = torch.arange(values.numel()) * 0 + torch.arange(values.numel()) + (64 * 64 - values.numel() + 5)
        record = encode_support(Support.of_indices(indices, (64, 64 + 1)), values)  # valid for a wider weight...
        record[12:28] = torch.frombuffer(bytearray(struct.pack("<2q", 64, 64)), dtype=torch.uint8)  # ...claims 64x64
        tensors[f"{key}.cpl_indices"] = record

    _rewrite(saved, widen)
    with pytest.raises(ValueError, match=r"layers\.0\.self_attn\.q_proj: corrupted index record .*out of range"):
        _load(saved / "adapter")


def test_truncated_file(saved):
    file = saved / "adapter" / "adapter_model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) - 100])
    with pytest.raises(ValueError, match="truncated or corrupted"):
        _load(saved / "adapter")


def test_failed_load_adapter_leaves_the_model_as_it_was(saved, tmp_path):
    model = PeftModel.from_pretrained(tiny_llama(seed=0), saved / "adapter")
    ids = torch.arange(16).reshape(2, 8)
    with torch.no_grad():
        before = model(input_ids=ids).logits
    other = get_peft_model(tiny_llama(seed=0, num_hidden_layers=1), CPLConfig(target_modules=TARGETS))
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match="nothing was loaded"):
        model.load_adapter(tmp_path / "other", adapter_name="other")
    assert list(model.peft_config) == ["default"]
    assert all(set(layer.cpl_values) == {"default"} for layer in cpl_layers(model).values())
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)


def test_tied_weights_are_refused():
    with pytest.raises(ValueError, match="tied embeddings"):
        get_peft_model(tiny_llama(tie_word_embeddings=True), CPLConfig(target_modules=["embed_tokens"]))


def test_unsupported_module_type_is_named():
    with pytest.raises(TypeError, match="LlamaRMSNorm"):
        get_peft_model(tiny_llama(), CPLConfig(target_modules=["input_layernorm"]))
