"""Issue 18, tuner side: a damaged adapter file is called damaged (file and module named), never "another base"; the
algorithm's entry points refuse a model that is not the PeftModel holding a CPL adapter, saying what to pass."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model, inject_adapter_in_model, set_peft_model_state_dict
from safetensors.torch import load_file

from peft_cpl import CollaborativeGuard, CPLConfig, export_support, restore_support, select_collaborative
from peft_cpl.toolkit.cli import main
from peft_cpl.toolkit.data import write_items

from .conftest import FACTS, cpl_layers, randomize_values, tiny_llama
from .test_cli import save_model

TARGETS = ["q_proj", "v_proj"]
MODULE = "model.layers.1.self_attn.v_proj"
KEY = f"base_model.model.{MODULE}"


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    """model/ (a tiny Llama and its tokenizer), q.jsonl, and adapter/ saved by save_pretrained with random values."""
    root = tmp_path_factory.mktemp("integrity")
    save_model(root / "model", [])
    write_items(root / "q.jsonl", FACTS[:4])
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(root / "model"),
                           CPLConfig(target_modules=TARGETS, support="random", density=0.2))
    randomize_values(model)
    model.save_pretrained(root / "adapter")
    return root


def damaged_copy(ws: Path, tmp_path: Path, key: str, at: int = 3) -> Path:
    """A copy of the adapter with byte `at` of tensor `key` flipped in place on disk (the file's header is kept)."""
    import shutil

    folder = tmp_path / f"damaged-{key.rsplit('.', 1)[-1]}"
    shutil.copytree(ws / "adapter", folder)
    path = folder / "adapter_model.safetensors"
    data = bytearray(path.read_bytes())
    (length,) = struct.unpack_from("<Q", data, 0)
    start, end = json.loads(data[8 : 8 + length])[key]["data_offsets"]
    assert end - start > at
    data[8 + length + start + at] ^= 0xFF
    path.write_bytes(bytes(data))
    return folder


def base(ws: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(ws / "model")


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(arg) for arg in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("kind, expected", [("cpl_values", "values checksum mismatch"),
                                            ("cpl_indices", "corrupted index record")])
def test_flipped_byte_is_damage_naming_file_and_module(ws, tmp_path, kind, expected):
    folder = damaged_copy(ws, tmp_path, f"{KEY}.{kind}")
    with pytest.raises(ValueError) as caught:
        PeftModel.from_pretrained(base(ws), folder)
    message = str(caught.value)
    assert f"{folder / 'adapter_model.safetensors'} is damaged" in message and f"{MODULE}: {expected}" in message
    assert "does not match this base" not in message and "\n" not in message
    assert "layers.0" not in message  # intact modules are not blamed


def test_damaged_state_dict_is_not_blamed_on_the_base(ws, tmp_path):
    """Loaded without the file check (a state dict given directly), damage still reads as damage."""
    folder = damaged_copy(ws, tmp_path, f"{KEY}.cpl_values")
    model = get_peft_model(base(ws), CPLConfig(target_modules=TARGETS, support="random", density=0.2))
    expected = rf"its file is damaged.*\n    .*{MODULE}: values checksum mismatch"
    with pytest.raises(ValueError, match=expected) as caught:
        set_peft_model_state_dict(model, load_file(folder / "adapter_model.safetensors"))
    assert "does not match this base" not in str(caught.value)


def test_adapter_for_another_base_is_still_a_mismatch_not_damage(ws, tmp_path):
    other = tiny_llama(seed=0, vocab_size=base(ws).config.vocab_size, hidden_size=32, intermediate_size=64)
    with pytest.raises(ValueError, match=r"does not match this base model") as caught:
        PeftModel.from_pretrained(other, ws / "adapter")
    assert "damaged" not in str(caught.value)


def test_cli_names_the_damaged_file_in_one_error_line(ws, tmp_path, capsys):
    values = damaged_copy(ws, tmp_path, f"{KEY}.cpl_values")
    code, out, err = run(capsys, "inspect", values)
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert f"{MODULE}: values checksum mismatch" in err and str(values / "adapter_model.safetensors") in err
    assert MODULE[-40:] in out  # the table still shows what the file holds
    code, out, err = run(capsys, "eval", ws / "q.jsonl", "--model", ws / "model", "--adapter", values)
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and "is damaged" in err, err
    assert "does not match this base" not in err and "accuracy" not in out
    index = damaged_copy(ws, tmp_path, f"{KEY}.cpl_indices")
    code, _, err = run(capsys, "inspect", index)
    assert code == 2 and f"{MODULE}: corrupted index record" in err and err.count("\n") == 1, err
    code, _, err = run(capsys, "inspect", ws / "adapter")
    assert code == 0 and err == ""


def test_inspect_warns_of_non_finite_values_saved_so(ws, tmp_path, capsys):
    import shutil

    folder = shutil.copytree(ws / "adapter", tmp_path / "nan")
    path = folder / "adapter_model.safetensors"
    model = PeftModel.from_pretrained(base(ws), ws / "adapter")
    layer = cpl_layers(model)[KEY]
    with torch.no_grad():
        layer.cpl_values["default"][0] = float("nan")
    model.save_pretrained(folder)  # the checksum is of the NaN: intact, but not usable
    assert load_file(path)[f"{KEY}.cpl_values"].isnan().any()
    code, _, err = run(capsys, "inspect", folder)
    assert code == 0 and err.startswith("warning: ") and f"{MODULE}: 1 of" in err and "NaN" in err, err


def _calls(peft_model):
    batches = [{"input_ids": torch.arange(8).reshape(1, 8), "labels": torch.arange(8).reshape(1, 8)}]
    return {
        "select_collaborative": lambda model: select_collaborative(model, batches, batches, progress=False),
        "CollaborativeGuard": lambda model: CollaborativeGuard(model, mastered=batches),
        "export_support": export_support,
        "restore_support": lambda model: restore_support(model, export_support(peft_model)),
    }


def test_entry_points_refuse_a_model_that_is_not_a_cpl_peft_model():
    peft_model = get_peft_model(tiny_llama(), CPLConfig(target_modules=TARGETS, support="random", density=0.2))
    injected = inject_adapter_in_model(CPLConfig(target_modules=TARGETS, support="random", density=0.2),
                                       tiny_llama())
    for call in _calls(peft_model).values():
        with pytest.raises(ValueError, match=r"LlamaForCausalLM has no CPL adapter: wrap it first with "
                                             r"peft\.get_peft_model\(model, peft_cpl\.CPLConfig"):
            call(tiny_llama())
        for model in (peft_model.get_base_model(), injected):
            with pytest.raises(ValueError, match=r"LlamaForCausalLM has CPL layers but is not a PeftModel.*pass "
                                                 r"the PeftModel itself"):
                call(model)
        with pytest.raises(ValueError, match=r"got a dict"):
            call({"input_ids": 0})


def test_export_restore_through_the_tuner_itself():
    """The tuner (PeftModel.base_model) is accepted, and its module names are the PeftModel's."""
    source = get_peft_model(tiny_llama(), CPLConfig(target_modules=TARGETS, support="random", density=0.2))
    target = get_peft_model(tiny_llama(), CPLConfig(target_modules=TARGETS, support="random", density=0.2, seed=1))
    exported = export_support(source.base_model)
    assert exported.supports.keys() == export_support(source).supports.keys()
    restore_support(target.base_model, exported)
    assert all(torch.equal(export_support(target).supports[name].indices, support.indices)
               for name, support in exported.supports.items())
