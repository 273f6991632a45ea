"""CPL on real bitsandbytes 8-bit and 4-bit layers (CPU): training, save/load across storage, merging."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training

from peft_cpl import CPLConfig, CPLLayer
from peft_cpl.toolkit.loop import make_optimizer
from peft_cpl.tuner.bnb import dequantized_weight, is_4bit, is_packed_for_cpu
from peft_cpl.tuner.merge import merge_and_report, merge_into_float

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


def pack_for_cpu(model) -> int:
    """Repack every 4-bit weight as bitsandbytes does on its first eval forward on an AVX512-BF16 CPU."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu

    count = 0
    for module in model.modules():
        if is_4bit(module) and not is_packed_for_cpu(module):
            module.weight.data, module.weight.quant_state = _convert_weight_packed_for_cpu(
                module.weight.data, module.weight.quant_state
            )
            count += 1
    return count


def weight_meanings(model) -> dict[str, torch.Tensor]:
    """What each quantized weight means (dequantized), read from a copy so the model's own layout is left alone."""
    copied = copy.deepcopy(model)
    return {
        name: dequantized_weight(module).float().clone()
        for name, module in copied.named_modules()
        if isinstance(module, (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit))
    }


def assert_close_logits(actual: torch.Tensor, expected: torch.Tensor, fraction: float = 0.01) -> None:
    """Equal up to the bf16 rounding of 4-bit absmax that bnb's packing causes (2^-8); misread weights are not."""
    torch.testing.assert_close(actual, expected, rtol=0, atol=fraction * float(expected.abs().max()))


# (bits, layout): 4-bit weights in bitsandbytes' canonical layout, or repacked for its AVX512-BF16 CPU kernel, which
# bitsandbytes does by itself on such CPUs; forced here so that both layouts are tested on every machine.
STORAGES = [(8, "canonical"), (4, "canonical"), (4, "packed")]
STORAGE_IDS = ["8bit", "4bit", "4bit-packed"]


@pytest.mark.parametrize("optimizer_name", ["adamw", "adamw8bit"])
@pytest.mark.parametrize(("bits", "layout"), STORAGES, ids=STORAGE_IDS)
def test_layers_wrap_quantized_linears_and_train(saved_base, bits, layout, optimizer_name):
    base = load(saved_base, bits)
    model = get_peft_model(base, CPLConfig(target_modules=TARGETS, support="random", density=0.3))
    layers = cpl_layers(model)
    expected = bnb.nn.Linear8bitLt if bits == 8 else bnb.nn.Linear4bit
    assert layers and all(isinstance(layer.get_base_layer(), expected) for layer in layers.values())
    before = logits(model)
    if layout == "packed":
        assert pack_for_cpu(model) == 14
    meanings = weight_meanings(model)
    stored = {n: p.detach().clone() for n, p in model.named_parameters() if ".cpl_values." not in n and p.dim() < 2}
    model.train()
    optimizer = make_optimizer(model, optimizer_name, lr=1e-2)
    assert isinstance(optimizer, bnb.optim.AdamW8bit) == (optimizer_name == "adamw8bit")
    for step in range(3):
        optimizer.zero_grad()
        model(input_ids=IDS, labels=IDS).loss.backward()
        if step == 0:  # gradients reach every layer, the first ones included, whatever the layout was
            assert all(layer.cpl_values["default"].grad.abs().sum() > 0 for layer in layers.values())
        optimizer.step()
    model.eval()
    assert not torch.allclose(logits(model), before)
    after = weight_meanings(model)
    assert after.keys() == meanings.keys() and len(after) == 14
    for name, meaning in meanings.items():
        assert torch.equal(after[name], meaning), name  # what the int8 / 4-bit weights mean is untouched
    assert not any(is_packed_for_cpu(module) for module in model.modules())
    for name, param in model.named_parameters():
        if name in stored:
            assert torch.equal(param.detach(), stored[name]), name  # norms and biases untouched


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


@pytest.mark.parametrize(("bits", "layout"), STORAGES, ids=STORAGE_IDS)
def test_requantized_merge_is_bounded_and_reported(saved_base, bits, layout):
    model = get_peft_model(load(saved_base, bits), CPLConfig(target_modules=TARGETS, support="random", density=0.3))
    randomize_values(model, scale=0.01)  # half the weights' own scale (initializer_range 0.02)
    if layout == "packed":
        merged_twin, twin_report = merge_and_report(copy.deepcopy(model))  # the same weights, never packed
        pack_for_cpu(model)
    with model.disable_adapter():
        base_out = logits(model)
    unmerged = logits(model)
    merged, report = merge_and_report(model)
    if layout == "packed":  # the result of the canonical layout, up to bitsandbytes' bf16 rounding of absmax
        assert report.retained == pytest.approx(twin_report.retained, abs=0.02)
        assert_close_logits(logits(merged), logits(merged_twin), fraction=0.03)  # and requantization's code flips
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


@pytest.mark.parametrize(("bits", "layout"), STORAGES, ids=STORAGE_IDS)
def test_lossless_merge_into_float(saved_base, tmp_path, bits, layout):
    config = CPLConfig(target_modules=TARGETS, support="random", density=0.3)
    quantized = get_peft_model(load(saved_base, bits), config)
    randomize_values(quantized, scale=1e-4)  # small enough to vanish in a requantized merge
    if layout == "packed":
        never_packed = logits(merge_into_float(copy.deepcopy(quantized)))
        pack_for_cpu(quantized)
    # the same adapter on a float twin holding the dequantized weights is the exact reference
    twin = merge_into_float(copy.deepcopy(quantized).unload())
    reference = get_peft_model(twin, CPLConfig(target_modules=TARGETS, support="random", density=0.3))
    for name, layer in cpl_layers(reference).items():
        source = cpl_layers(quantized)[name]
        layer.set_support("default", source.support("default"), source.cpl_values["default"].detach())
    expected = logits(reference)
    quantized_out = logits(quantized)
    merged = merge_into_float(quantized)
    assert not any(isinstance(m, (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit)) for m in merged.modules())
    torch.testing.assert_close(logits(merged), expected, rtol=1e-5, atol=1e-5)
    assert (logits(merged) - quantized_out).abs().max() < 0.05 * quantized_out.abs().max()
    if layout == "packed":
        assert_close_logits(logits(merged), never_packed)
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


def test_wrapping_keeps_4bit_weights_canonical_and_unpacks_a_packed_base(saved_base):
    base = load(saved_base, 4)
    reference = copy.deepcopy(base)
    assert pack_for_cpu(base) == 14  # e.g. the base was evaluated on an AVX512-BF16 CPU before wrapping
    model = get_peft_model(base, CPLConfig(target_modules=["q_proj", "v_proj"], support="random", density=0.3))
    modules = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(modules) == 14  # targeted or not, every 4-bit layer of the model
    assert not any(is_packed_for_cpu(m) for m in modules)
    assert not any(m.support_avx512bf16_for_cpu for m in modules)  # bitsandbytes will not repack them
    logits(model)  # an eval forward without grad: where bitsandbytes would repack
    assert not any(is_packed_for_cpu(m) for m in modules)
    for name, meaning in weight_meanings(reference).items():
        # bitsandbytes' own round trip keeps the codes and rounds absmax to bf16
        wrapped = model.base_model.model.get_submodule(name)
        module = wrapped.get_base_layer() if isinstance(wrapped, CPLLayer) else wrapped
        torch.testing.assert_close(dequantized_weight(module).float(), meaning, rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("reader", ["get_base_weight", "get_delta_weight", "to"])
def test_readers_of_a_packed_4bit_weight_see_the_canonical_weight(saved_base, reader):
    model = get_peft_model(load(saved_base, 4), CPLConfig(target_modules=TARGETS, support="magnitude", density=0.2))
    randomize_values(model, scale=0.01)
    twin = copy.deepcopy(model)  # the same weights, never packed
    pack_for_cpu(model)
    # bitsandbytes' round trip rounds absmax to bf16 (relative 2^-8); a misread layout is off by the weights' scale
    close = {"rtol": 1e-2, "atol": 1e-3}
    for name, layer in cpl_layers(model).items():
        expected = cpl_layers(twin)[name]
        if reader == "get_base_weight":
            torch.testing.assert_close(layer.get_base_weight(), expected.get_base_weight(), **close)
        elif reader == "get_delta_weight":
            torch.testing.assert_close(layer.get_delta_weight("default"), expected.get_delta_weight("default"))
    if reader == "to":
        model.to(torch.device("cpu"))
        assert not any(is_packed_for_cpu(m) for m in model.modules())
    assert_close_logits(logits(model), logits(twin))
