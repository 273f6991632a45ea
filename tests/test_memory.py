"""The memory estimator: train-state bytes equal the tensors' own sizes exactly; the rest follows the layouts."""

from __future__ import annotations

import math

import pytest
import torch
from peft import get_peft_model

from peft_cpl import CollaborativeGuard, CPLConfig
from peft_cpl.toolkit.loop import make_optimizer
from peft_cpl.toolkit.memory import estimate_memory, live_tensor_bytes, measure_step_peak, measure_train_state
from peft_cpl.toolkit.tiny import tiny_llama, tiny_llama_config
from peft_cpl.tuner.fused import FusedStep
from peft_cpl.tuner.losses import summed_example_loss

from .test_guard import TARGETS, conflicting_data

TRAIN_STATE = ("trained_values", "gradients", "optimizer_state", "index", "guard")


def optimizer_for(name: str, params, fused: bool, guard=None):
    if name == "adamw8bit":
        cls, kwargs = pytest.importorskip("bitsandbytes").optim.AdamW8bit, {"lr": 1e-3, "min_8bit_size": 512}
    else:
        cls, kwargs = (torch.optim.AdamW, {"lr": 1e-3}) if name == "adamw" else (torch.optim.SGD, {"lr": 0.1})
    return FusedStep(params, cls, guard=guard, **kwargs) if fused else cls(params, **kwargs), kwargs


@pytest.mark.parametrize(("granularity", "density"), [("element", 0.3), ("element", 0.1), ("row", 0.3)])
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("optimizer_name", ["adamw", "sgd", "adamw8bit"])
def test_train_state_bytes_equal_the_summed_tensor_sizes(optimizer_name, fused, granularity, density, monkeypatch):
    """Density 0.3 keeps a bitmask, 0.1 a blocked support (packed.default_form)."""
    if optimizer_name == "adamw8bit":  # tiny tensors: lower bitsandbytes' 8-bit threshold so both paths occur
        monkeypatch.setattr("peft_cpl.toolkit.memory._BNB_MIN_8BIT_SIZE", 512)
    mastered, injection = conflicting_data(7)
    model = get_peft_model(tiny_llama(0), CPLConfig(target_modules=TARGETS, support="random", density=density,
                                                    granularity=granularity))
    guard = CollaborativeGuard(model, mastered=mastered)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer, _ = optimizer_for(optimizer_name, params, fused, guard if fused else None)
    if not fused:
        guard.attach(optimizer)
    model.train()
    peak = {}
    for _ in range(2):
        optimizer.zero_grad(set_to_none=False)
        loss, count = summed_example_loss(model, injection[0])
        (loss / count).backward()
        measured = measure_train_state(model, optimizer)  # after backward: the gradients' peak
        peak = {key: max(peak.get(key, 0), value) for key, value in measured.items()}
        optimizer.step()
    peak = {key: max(peak[key], value) for key, value in measure_train_state(model, optimizer).items()}
    estimate = estimate_memory(model, optimizer=optimizer_name, fused=fused, guard=True)
    for key in TRAIN_STATE:
        if key == "gradients" and fused:
            assert peak[key] == 0  # freed tensor by tensor; the estimate allows the largest one
            assert 0 < estimate.gradients <= max(p.numel() for p in params) * 4
        else:
            assert peak[key] == getattr(estimate, key), key
    assert estimate.trained == sum(p.numel() for p in params)


def test_estimates_for_a_config_on_the_meta_device_follow_density_and_storage():
    config = tiny_llama_config(num_hidden_layers=4, hidden_size=128, intermediate_size=256)
    dense = estimate_memory(config, density=0.6, base="bf16")
    sparse = estimate_memory(config, density=0.05, base="bf16")
    assert sparse.trained == pytest.approx(dense.trained / 12, rel=0.01)
    # value 4, gradient 4, AdamW moments 8 and a bitmask's 1 / (8 * 0.6) bytes (it was 20 with an int32 index)
    assert dense.bytes_per_trained_value == pytest.approx(4 + 4 + 8 + 1 / 4.8, rel=0.01)
    assert dense.bytes_per_trained_value <= 16.5
    wide = tiny_llama_config(num_hidden_layers=16, hidden_size=1024, intermediate_size=2816)
    fused = estimate_memory(wide, density=0.6, base="bf16", optimizer="adamw", fused=True)
    fused8 = estimate_memory(wide, density=0.6, base="bf16", optimizer="adamw8bit", fused=True)
    # the targets, on a model where one tensor's gradient is small against all values (as on any real LLM)
    assert fused.bytes_per_trained_value <= 12.5 and fused8.bytes_per_trained_value <= 6.5
    assert fused8.gradients < fused8.trained_values / 50  # at most one tensor's gradient at a time
    nf4, int8, bf16 = (estimate_memory(config, base=b).base_weights for b in ("nf4", "int8", "bf16"))
    assert nf4 < int8 < bf16
    linears = [m.weight for n, m in tiny_llama(0, **config.to_dict()).named_modules() if n.endswith("proj")]
    # every linear but the head is stored quantized: 2 bytes -> 1 byte and an fp32 scale per row
    assert bf16 - int8 == sum(w.numel() - 4 * w.shape[0] for w in linears)
    checkpointed = estimate_memory(config, batch_size=4, seq_len=512, gradient_checkpointing=True)
    assert checkpointed.activations < estimate_memory(config, batch_size=4, seq_len=512).activations
    selection = estimate_memory(wide)
    assert 4 * selection.targeted < selection.selection_peak <= 4.25 * selection.targeted  # + one module's temporaries
    assert dense.fits(1) and not estimate_memory(config, batch_size=512, seq_len=4096).fits(1)
    assert "training peak" in dense.table() and math.isfinite(dense.bytes_per_trained_value)


def test_bad_estimator_input_is_refused():
    config = tiny_llama_config()
    for kwargs, message in (({"base": "fp8"}, "base must be"), ({"optimizer": "lion"}, "optimizer must be"),
                            ({"density": 0.0}, "density must be")):
        with pytest.raises(ValueError, match=message):
            estimate_memory(config, **kwargs)
    with pytest.raises(ValueError, match="needs a model"):
        estimate_memory(object())


def test_cli_estimate_prints_the_breakdown_and_the_verdict(tmp_path, capsys):
    from peft_cpl.toolkit.cli import main

    tiny_llama_config(num_hidden_layers=4, hidden_size=128, intermediate_size=256).save_pretrained(tmp_path)
    assert main(["estimate", "--model", str(tmp_path), "--density", "0.3", "--optimizer", "adamw8bit",
                 "--base", "nf4", "--gpu-gib", "1"]) == 0
    out = capsys.readouterr().out
    for part in ("base_weights", "trained_values", "optimizer_state", "index", "activations", "training peak"):
        assert part in out
    assert "training: fits in 1 GiB" in out
    expected = estimate_memory(tiny_llama_config(num_hidden_layers=4, hidden_size=128, intermediate_size=256),
                               density=0.3, optimizer="adamw8bit", base="nf4", fused=True)
    assert f"{expected.bytes_per_trained_value:.2f} B of train state per trained value" in out
    assert main(["estimate", "--model", str(tmp_path / "missing")]) == 2
    assert "no such folder or config file" in capsys.readouterr().err
    assert main(["estimate", "--model", str(tmp_path), "--density", "1.5"]) == 2
    assert "density must be in (0, 1]" in capsys.readouterr().err


def test_estimates_follow_int32_storage_selection_signs_and_empty_supports():
    from peft_cpl import Support, cpl_layers, select_collaborative

    from .conftest import CASES
    from .test_selection import batched, examples

    case = CASES["llama"]
    mastered, injection = batched(examples(case, 6, 5), 3), batched(examples(case, 6, 6), 3)
    for storage in ("compact", "int32"):
        model = get_peft_model(tiny_llama(0), CPLConfig(target_modules=TARGETS, index_storage=storage))
        unselected = estimate_memory(model, density=0.5)
        expected_index = 4 * unselected.trained if storage == "int32" else None
        if expected_index is not None:
            assert unselected.index == expected_index
        select_collaborative(model, mastered, injection, progress=False)  # leaves sign(g_M): 1 B per value
        layer = next(iter(cpl_layers(model).values()))
        layer.set_support("default", Support.empty(layer.delta_shape))  # one layer's support is empty
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-3)
        model.train()
        loss, count = summed_example_loss(model, injection[0])
        (loss / count).backward()
        optimizer.step()
        measured = measure_train_state(model, optimizer)
        estimate = estimate_memory(model)
        for key in TRAIN_STATE:
            assert measured[key] == getattr(estimate, key), (storage, key)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("batch,seq", [(2, 32), (8, 128)])
def test_the_predicted_peak_is_the_measured_peak_of_live_tensors(fused, batch, seq):
    """Activations and gradients peak at the two ends of backward, not together: the sum of the parts would
    over-predict the unfused step by the whole gradient (up to ~20% here)."""
    vocab = 2000
    elsewhere = live_tensor_bytes()  # what other tests left alive in this process; not this run's
    model = get_peft_model(tiny_llama(0, num_hidden_layers=4, hidden_size=256, intermediate_size=512,
                                      vocab_size=vocab), CPLConfig(support="random", density=0.6))
    optimizer = make_optimizer(model, "adamw", 1e-3, fused=fused)
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0))
    model.train()

    def step():
        optimizer.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()

    step()  # the optimizer's state exists before the measured step
    optimizer.zero_grad(set_to_none=True)
    measured = measure_step_peak(step) - elsewhere
    estimate = estimate_memory(model, base="fp32", fused=fused, batch_size=batch, seq_len=seq)
    summed = estimate.base_weights + estimate.train_state + estimate.temporaries + estimate.activations
    assert measured > live_tensor_bytes() - elsewhere  # the step allocated something the profiler saw
    assert 0.9 * measured <= estimate.peak <= 1.3 * measured
    assert estimate.peak < summed or fused
