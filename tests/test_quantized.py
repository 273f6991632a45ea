"""CPL on real bitsandbytes 8-bit and 4-bit layers (CPU): training, save/load across storage, merging."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training

from peft_cpl import CPLConfig, CPLLayer
from peft_cpl.bnb import merge_and_report, merge_into_float
from peft_cpl.training import make_optimizer

from .conftest import cpl_layers, randomize_values, tiny_llama

bnb = pytest.importorskip("bitsandbytes")
from transformers import AutoModelForCausalLM, BitsAndBytesConfig  # noqa: E402

TARGETS = "all-linear"
IDS = torch.randint(0, 1000, (2, 8), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def saved_base(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama(seed=0).save_pretrained(path)
    return path


def load(path, bits: int | None):
    if bits is None:
        return AutoModelForCausalLM.from_pretrained(path).eval()
    config = BitsAndBytesConfig(load_in_8bit=bits == 8, load_in_4bit=bits == 4, bnb_4bit_compute_dtype=torch.float32)
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=config).eval()


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.mark.parametrize("optimizer_name", ["adamw", "adamw8bit"])
@pytest.mark.parametrize("bits", [8, 4])
def test_layers_wrap_quantized_linears_and_train(saved_base, bits, optimizer_name):
    base = load(saved_base, bits)
    model = get_peft_model(base, CPLConfig(target_modules=TARGETS, support="random", density=0.3))
    layers = cpl_layers(model)
    expected = bnb.nn.Linear8bitLt if bits == 8 else bnb.nn.Linear4bit
    assert layers and all(isinstance(layer.get_base_layer(), expected) for layer in layers.values())
    stored = {n: p.detach().clone() for n, p in model.named_parameters() if ".cpl_values." not in n}
    stored.update({n: b.clone() for n, b in model.named_buffers()})
    before = logits(model)
    model.train()
    optimizer = make_optimizer(model, optimizer_name, lr=1e-2)
    assert isinstance(optimizer, bnb.optim.AdamW8bit) == (optimizer_name == "adamw8bit")
    for _ in range(3):
        optimizer.zero_grad()
        model(input_ids=IDS, labels=IDS).loss.backward()
        optimizer.step()
    model.eval()
    assert not torch.allclose(logits(model), before)
    for name, param in model.named_parameters():
        if ".cpl_values." not in name:
            assert torch.equal(param.detach(), stored[name]), name  # int8 / 4-bit weights untouched
    for name, buffer in model.named_buffers():
        if name in stored:
            assert torch.equal(buffer, stored[name]), name


@pytest.mark.parametrize("bits", [8, 4])
def test_save_load_exact_and_independent_of_base_storage(saved_base, tmp_path, bits):
    model = get_peft_model(load(saved_base, bits), CPLConfig(target_modules=TARGETS, support="magnitude", density=0.2))
    randomize_values(model, scale=0.02)
    expected = logits(model)
    model.save_pretrained(tmp_path / "adapter")
    same = PeftModel.from_pretrained(load(saved_base, bits), tmp_path / "adapter").eval()
    torch.testing.assert_close(logits(same), expected, rtol=0, atol=0)
    # the adapter does not depend on how the base is stored: load it onto the float base, and back
    on_float = PeftModel.from_pretrained(load(saved_base, None), tmp_path / "adapter").eval()
    for name, layer in cpl_layers(on_float).items():
        assert torch.equal(layer.cpl_values["default"], cpl_layers(model)[name].cpl_values["default"])
    on_float.save_pretrained(tmp_path / "from-float")
    back = PeftModel.from_pretrained(load(saved_base, bits), tmp_path / "from-float").eval()
    torch.testing.assert_close(logits(back), expected, rtol=0, atol=0)


@pytest.mark.parametrize("bits", [8, 4])
def test_requantized_merge_is_bounded_and_reported(saved_base, bits):
    model = get_peft_model(load(saved_base, bits), CPLConfig(target_modules=TARGETS, support="random", density=0.3))
    randomize_values(model, scale=0.01)  # half the weights' own scale (initializer_range 0.02)
    with model.disable_adapter():
        base_out = logits(model)
    unmerged = logits(model)
    merged, report = merge_and_report(model)
    assert not any(isinstance(m, CPLLayer) for m in merged.modules())
    assert len(report.modules) == 14 and 0.0 < report.retained <= 1.0
    error = (logits(merged) - unmerged).norm()
    effect = (unmerged - base_out).norm()
    print(f"{bits}-bit: retained {report.retained:.3f}, output error {error / effect:.3f} of the delta's effect")
    assert error < (1 - report.retained + 0.1) * effect  # the output error is what the report says was lost
    assert "retained" in report.table()


def test_tiny_deltas_vanish_on_requantization_and_the_user_is_warned(saved_base):
    model = get_peft_model(load(saved_base, 8), CPLConfig(target_modules=TARGETS, support="random", density=0.3))
    randomize_values(model, scale=1e-5)  # far below half an int8 step (absmax / 254)
    with pytest.warns(UserWarning, match="merge_into_float"):
        _, report = merge_and_report(model)
    assert report.retained < 0.5 and report.vanished_fraction > 0.5


@pytest.mark.parametrize("bits", [8, 4])
def test_lossless_merge_into_float(saved_base, tmp_path, bits):
    config = CPLConfig(target_modules=TARGETS, support="random", density=0.3)
    quantized = get_peft_model(load(saved_base, bits), config)
    randomize_values(quantized, scale=1e-4)  # small enough to vanish in a requantized merge
    # the same adapter on a float twin holding the dequantized weights is the exact reference
    twin = merge_into_float(copy.deepcopy(quantized).unload())
    reference = get_peft_model(twin, CPLConfig(target_modules=TARGETS, support="random", density=0.3))
    for name, layer in cpl_layers(reference).items():
        source = cpl_layers(quantized)[name]
        layer.set_support("default", source.cpl_indices["default"].long(), source.cpl_values["default"].detach())
    expected = logits(reference)
    quantized_out = logits(quantized)
    merged = merge_into_float(quantized)
    assert not any(isinstance(m, (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit)) for m in merged.modules())
    torch.testing.assert_close(logits(merged), expected, rtol=1e-5, atol=1e-5)
    assert (logits(merged) - quantized_out).abs().max() < 0.05 * quantized_out.abs().max()
    merged.save_pretrained(tmp_path / "merged")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(logits(reloaded), logits(merged), rtol=0, atol=0)


def test_kbit_training_preparation_and_gradient_checkpointing(saved_base):
    base = prepare_model_for_kbit_training(
        load(saved_base, 8), use_gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False}
    )
    model = get_peft_model(base, CPLConfig(target_modules=TARGETS, support="random", density=0.1))
    assert model.base_model.model.is_gradient_checkpointing
    model.train()
    loss = model(input_ids=IDS, labels=IDS).loss
    loss.backward()
    grads = [layer.cpl_values["default"].grad for layer in cpl_layers(model).values()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
    # the same gradients as without checkpointing (recomputation is exact in eval-free dropout-less layers)
    plain = get_peft_model(load(saved_base, 8), CPLConfig(target_modules=TARGETS, support="random", density=0.1))
    plain.train()
    plain(input_ids=IDS, labels=IDS).loss.backward()
    for (name, layer), grad in zip(cpl_layers(plain).items(), grads):
        torch.testing.assert_close(layer.cpl_values["default"].grad, grad, rtol=1e-3, atol=1e-6, msg=name)
