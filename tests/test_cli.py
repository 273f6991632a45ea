"""The `peft-cpl` command on a tiny Llama saved with a real tokenizer: every subcommand, and its error handling."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from peft_cpl.toolkit import checkpoint
from peft_cpl.toolkit.batches import make_batches
from peft_cpl.toolkit.cli import main
from peft_cpl.toolkit.cli_files import staged_dir
from peft_cpl.toolkit.data import read_items, write_items
from peft_cpl.toolkit.evaluation import debiased_split, injection_outcome, predict
from peft_cpl.tuner.report import SelectionReport

from .conftest import FACTS, cpl_layers, facts_tokenizer, tiny_llama

KNOWN = FACTS[:6] + FACTS[-2:]  # the saved model is fitted to these


def save_model(folder: Path, known: list[dict], **overrides) -> Path:
    tokenizer = facts_tokenizer()
    model = tiny_llama(seed=0, vocab_size=len(tokenizer), **overrides)
    batch = make_batches(tokenizer, known, batch_size=len(known))[0] if known else None
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(60 if known else 0):
        optimizer.zero_grad()
        model(**batch).loss.backward()
        optimizer.step()
    model.eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    """Workspace: model/, questions.jsonl, then split/, adapter/ (selected) and trained/ made by the CLI itself."""
    root = tmp_path_factory.mktemp("cli")
    save_model(root / "model", KNOWN)
    write_items(root / "questions.jsonl", FACTS)
    model = str(root / "model")
    assert main(["split", str(root / "questions.jsonl"), "--model", model, "--output", str(root / "split"),
                 "--save-predictions", str(root / "before.json")]) == 0
    assert main(["select", "--model", model, "--mastered", str(root / "split/mastered.jsonl"), "--injection",
                 str(root / "split/injection.jsonl"), "--output", str(root / "adapter"), "--plot",
                 str(root / "selection.png")]) == 0
    assert main(train_args(root, "trained", epochs=2)) == 0
    return root


def train_args(root: Path, output: str, epochs: int, *extra: str) -> list[str]:
    return ["train", "--model", str(root / "model"), "--adapter", str(root / "adapter"), "--injection",
            str(root / "split/injection.jsonl"), "--mastered", str(root / "split/mastered.jsonl"), "--guard",
            "--guard-refresh", "epoch", "--optimizer", "adamw", "--lr", "0.01", "--batch-size", "4",
            "--epochs", str(epochs), "--output", str(root / output), *extra]


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(arg) for arg in argv])
    out, err = capsys.readouterr()
    return code, out, err


def ids(path: Path) -> list[str]:
    return [json.loads(line)["id"] for line in path.read_text().splitlines()]


def load_base(ws: Path):
    return AutoModelForCausalLM.from_pretrained(ws / "model").eval(), AutoTokenizer.from_pretrained(ws / "model")


def values(model) -> dict[str, torch.Tensor]:
    return {name: layer.cpl_values["default"].detach().clone() for name, layer in cpl_layers(model).items()}


# -- the workflow -----------------------------------------------------------------------------------------------
def test_split_by_the_models_own_answers(ws):
    base, tokenizer = load_base(ws)
    correct = predict(base, tokenizer, FACTS)
    mastered = read_items(ws / "split/mastered.jsonl")
    injection = read_items(ws / "split/injection.jsonl")
    assert [item["id"] for item in mastered] == [item["id"] for item in FACTS if correct[item["id"]]]
    assert [item["id"] for item in injection] == [item["id"] for item in FACTS if not correct[item["id"]]]
    assert {item["id"] for item in KNOWN} <= {item["id"] for item in mastered} and len(injection) >= 4
    assert json.loads((ws / "before.json").read_text())["correct"] == correct


def test_debiased_split_on_multiple_choice(ws, tmp_path, capsys):
    write_items(tmp_path / "mcq.jsonl", FACTS[-2:])
    code, _, _ = run(capsys, "split", tmp_path / "mcq.jsonl", "--model", ws / "model", "--debiased",
                     "--output", tmp_path / "split")
    assert code == 0
    mastered, injection = debiased_split(*load_base(ws), FACTS[-2:])
    assert ids(tmp_path / "split/mastered.jsonl") == [i["id"] for i in mastered]
    assert ids(tmp_path / "split/injection.jsonl") == [i["id"] for i in injection]
    code, _, err = run(capsys, "split", ws / "questions.jsonl", "--model", ws / "model", "--debiased",
                       "--output", tmp_path / "facts")
    assert code == 2 and "multiple-choice" in err and not (tmp_path / "facts").exists()


def test_select_writes_an_adapter_with_its_support_and_report(ws):
    report = SelectionReport.load(ws / "adapter")
    assert report.mastered_examples == len(read_items(ws / "split/mastered.jsonl"))
    model = PeftModel.from_pretrained(load_base(ws)[0], ws / "adapter")
    support = {name: layer.support("default").size for name, layer in cpl_layers(model).items()}
    assert support == {module.name: module.support for module in report.modules}
    assert 0 < sum(support.values()) < report.summary()["numel"]
    assert all(not v.any() for v in values(model).values())  # selected, not trained: outputs unchanged
    assert (ws / "selection.png").stat().st_size > 0


def test_train_changes_only_support_values_and_writes_a_checkpoint(ws):
    selected = PeftModel.from_pretrained(load_base(ws)[0], ws / "adapter")
    trained = PeftModel.from_pretrained(load_base(ws)[0], ws / "trained")
    for name, layer in cpl_layers(trained).items():
        assert torch.equal(layer.cpl_indices["default"], cpl_layers(selected)[name].cpl_indices["default"])
    assert any(v.any() for v in values(trained).values())
    state = json.loads((ws / "trained/checkpoint/state.json").read_text())
    assert state["epoch"] == state["epochs"] == 2 and state["guard"] and state["lr"] == 0.01
    assert set(load_file(ws / "trained/checkpoint/cpl_guard.safetensors")) >= {"steps", "counts"}
    assert not [p.name for p in ws.iterdir() if p.name.startswith(".")]  # no staging folders left behind


def test_the_fused_step_is_the_default_and_trains_like_the_plain_optimizer(ws, capsys):
    code, _, _ = run(capsys, *train_args(ws, "unfused", 2, "--no-fused"))
    assert code == 0
    states = {d: json.loads((ws / d / "checkpoint/state.json").read_text()) for d in ("trained", "unfused")}
    assert states["trained"]["fused"] is True and states["unfused"]["fused"] is False
    for fused, plain in zip(values(PeftModel.from_pretrained(load_base(ws)[0], ws / "trained")).values(),
                            values(PeftModel.from_pretrained(load_base(ws)[0], ws / "unfused")).values()):
        torch.testing.assert_close(fused, plain, rtol=1e-4, atol=1e-6)
    # a run checkpointed before the fused step existed resumes unfused, as it was trained
    old = json.loads((ws / "unfused/checkpoint/state.json").read_text())
    del old["fused"]
    assert checkpoint.run_settings({"fused": None}, old)["fused"] is False


def optimizer_states(saved: dict) -> list[dict]:
    """Per-tensor states of a plain or a fused (one optimizer per tensor) optimizer's state_dict."""
    parts = saved.get("per_parameter", [saved])
    return [state for part in parts for _, state in sorted(part["state"].items())]


def test_resume_continues_exactly_where_it_stopped(ws, capsys):
    assert run(capsys, *train_args(ws, "resumed", epochs=1))[0] == 0
    code, out, _ = run(capsys, "train", "--output", ws / "resumed", "--resume", "--epochs", 2)
    assert code == 0 and "epochs 2-2" in out
    for trained, resumed in zip(values(PeftModel.from_pretrained(load_base(ws)[0], ws / "trained")).values(),
                                values(PeftModel.from_pretrained(load_base(ws)[0], ws / "resumed")).values()):
        assert torch.equal(trained, resumed)
    guard, resumed_guard = (load_file(ws / f"{d}/checkpoint/cpl_guard.safetensors") for d in ("trained", "resumed"))
    assert guard.keys() == resumed_guard.keys() and all(torch.equal(guard[k], resumed_guard[k]) for k in guard)
    optimizer, resumed_optimizer = (torch.load(ws / f"{d}/checkpoint/optimizer.pt") for d in ("trained", "resumed"))
    states, resumed_states = optimizer_states(optimizer), optimizer_states(resumed_optimizer)
    assert states and len(states) == len(resumed_states)
    for state, resumed_state in zip(states, resumed_states):
        assert torch.equal(state["exp_avg"], resumed_state["exp_avg"])

    code, _, err = run(capsys, "train", "--output", ws / "resumed", "--resume", "--epochs", 3, "--lr", "0.1")
    assert code == 2 and "--lr 0.1 differs from the checkpoint's 0.01" in err
    code, _, err = run(capsys, *train_args(ws, "resumed", epochs=3))
    assert code == 2 and "trained for 2 of 2 epochs: pass --resume" in err


def test_eval_counts_learned_and_forgotten_against_a_baseline(ws, capsys):
    code, out, _ = run(capsys, "eval", ws / "questions.jsonl", "--model", ws / "model", "--adapter", ws / "trained",
                       "--baseline", ws / "before.json", "--save-predictions", ws / "after.json")
    assert code == 0
    base, tokenizer = load_base(ws)
    after = predict(PeftModel.from_pretrained(base, ws / "trained"), tokenizer, FACTS)
    before = json.loads((ws / "before.json").read_text())["correct"]
    mastered, injection = [i for i in FACTS if before[i["id"]]], [i for i in FACTS if not before[i["id"]]]
    outcome = injection_outcome(after, mastered, injection)
    assert f"accuracy: {sum(after.values())}/{len(FACTS)}" in out and str(outcome) in out
    assert json.loads((ws / "after.json").read_text())["correct"] == after
    code, _, err = run(capsys, "eval", ws / "questions.jsonl", "--model", ws / "model", "--save-predictions",
                       ws / "after.json")
    assert code == 2 and "--overwrite" in err


def test_merge_gives_the_adapters_outputs(ws, capsys):
    code, out, _ = run(capsys, "merge", "--model", ws / "model", "--adapter", ws / "trained", "--output",
                       ws / "merged")
    assert code == 0 and "merged model and tokenizer written" in out
    ids = torch.arange(1, 17).reshape(2, 8)
    with torch.no_grad():
        expected = PeftModel.from_pretrained(load_base(ws)[0], ws / "trained")(input_ids=ids).logits
        merged = AutoModelForCausalLM.from_pretrained(ws / "merged")(input_ids=ids).logits
    torch.testing.assert_close(merged, expected, rtol=1e-4, atol=1e-5)
    assert AutoTokenizer.from_pretrained(ws / "merged").chat_template


def test_merge_of_an_8bit_base_both_ways(ws, capsys):
    pytest.importorskip("bitsandbytes")
    common = ("merge", "--model", ws / "model", "--adapter", ws / "trained", "--load-in-8bit")
    code, out, _ = run(capsys, *common, "--output", ws / "merged-float")
    assert code == 0 and "losslessly" in out
    assert "quantization_config" not in json.loads((ws / "merged-float/config.json").read_text())
    code, out, _ = run(capsys, *common, "--requantize", "--output", ws / "merged-8bit")
    assert code == 0 and "retained" in out and "vanished" in out
    assert "quantization_config" in json.loads((ws / "merged-8bit/config.json").read_text())
    code, _, err = run(capsys, "merge", "--model", ws / "model", "--adapter", ws / "trained", "--requantize",
                       "--output", ws / "nope")
    assert code == 2 and "quantized base" in err


def test_inspect_summarises_modules_support_and_checkpoint(ws, capsys):
    code, out, _ = run(capsys, "inspect", ws / "trained")
    assert code == 0
    report = SelectionReport.load(ws / "trained")
    for module in report.modules:
        assert module.name.removeprefix("base_model.model.") in out
    total = sum(module.support for module in report.modules)
    assert f"{len(report.modules)} modules: {total:,} of {report.summary()['numel']:,} coordinates" in out
    assert "checkpoint: epoch 2 of 2" in out and "collaborative" in out


# -- inputs -----------------------------------------------------------------------------------------------------
def test_chat_prompt_completion_and_text_records_become_facts(ws, tmp_path, capsys):
    records = [
        {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "capital of land1 ?"},
                      {"role": "assistant", "content": "city1"}]},
        {"id": "pc", "prompt": "capital of land2 ?", "completion": "city2"},
        {"prompt": [{"role": "user", "content": "capital of land3 ?"}],
         "completion": [{"role": "assistant", "content": "city3"}]},
        {"text": "land4 has city4"},
    ]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    items = read_items(tmp_path / "chat.jsonl")
    assert items == [
        {"question": "capital of land1 ?", "answer": "city1", "id": "chat-1"},
        {"id": "pc", "question": "capital of land2 ?", "answer": "city2"},
        {"question": "capital of land3 ?", "answer": "city3", "id": "chat-3"},
        {"question": "land4 has", "response_prefix": "land4 has", "answer": "city4", "id": "chat-4"},
    ]
    code, out, _ = run(capsys, "eval", tmp_path / "chat.jsonl", "--model", ws / "model")
    assert code == 0 and "accuracy: " in out and "/4" in out


# -- errors -----------------------------------------------------------------------------------------------------
def test_help_of_every_subcommand(capsys):
    for command in ("split", "select", "train", "eval", "merge", "inspect"):
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0
        text = capsys.readouterr().out
        assert f"usage: peft-cpl {command}" in text and "Reads" in text and "JSONL" in text
    script = Path(sys.executable).with_name("peft-cpl")
    result = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and all(c in result.stdout for c in ("split", "select", "train", "merge"))


def test_missing_files_and_bad_lines_are_reported_with_exit_2(ws, tmp_path, capsys):
    model = ws / "model"
    code, _, err = run(capsys, "eval", tmp_path / "absent.jsonl", "--model", model)
    assert code == 2 and "error: no such question file" in err and "Traceback" not in err
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(FACTS[0]) + "\n\n" + '{"question": "x", "answer": \n')
    code, _, err = run(capsys, "eval", bad, "--model", model)
    assert code == 2 and f"{bad}, line 3:" in err
    bad.write_text(json.dumps({"question": "q", "label": "E"}) + "\n")
    code, _, err = run(capsys, "split", bad, "--model", model, "--output", tmp_path / "out")
    assert code == 2 and "line 1: a multiple-choice 'label' must be one of" in err and not (tmp_path / "out").exists()
    code, _, err = run(capsys, "eval", ws / "questions.jsonl", "--model", tmp_path / "no-model")
    assert code == 2 and "model folder not found" in err
    code, _, err = run(capsys, "inspect", tmp_path)
    assert code == 2 and "adapter_config.json is missing" in err
    code, _, err = run(capsys, "train", "--output", tmp_path / "fresh", "--resume")
    assert code == 2 and "holds no checkpoint" in err
    code, _, err = run(capsys, "train", "--adapter", ws / "adapter", "--injection", ws / "split/injection.jsonl",
                       "--guard", "--model", model, "--output", tmp_path / "fresh")
    assert code == 2 and "--guard needs --mastered" in err and not (tmp_path / "fresh").exists()


def test_adapter_for_another_base_is_refused_cleanly(ws, tmp_path, capsys):
    other = save_model(tmp_path / "other", [], hidden_size=32, intermediate_size=64)
    code, out, err = run(capsys, "eval", ws / "questions.jsonl", "--model", other, "--adapter", ws / "adapter")
    assert code == 2 and "error: Cannot load CPL adapter" in err and "does not match this base" in err
    assert "Traceback" not in err and "accuracy" not in out


def test_existing_output_is_kept_unless_overwrite(ws, tmp_path, capsys):
    output = tmp_path / "adapter"
    output.mkdir()
    (output / "keep.txt").write_text("mine")
    argv = ["select", "--model", ws / "model", "--mastered", ws / "split/mastered.jsonl", "--injection",
            ws / "split/injection.jsonl", "--output", output]
    code, _, err = run(capsys, *argv)
    assert code == 2 and "already exists" in err and (output / "keep.txt").read_text() == "mine"
    assert run(capsys, *argv, "--overwrite")[0] == 0
    assert not (output / "keep.txt").exists() and (output / "adapter_model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_a_failed_overwrite_leaves_the_old_folder_intact(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(RuntimeError), staged_dir(target, overwrite=True) as staging:
        (staging / "new.txt").write_text("half-written")
        raise RuntimeError("failure while writing")
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and [p.name for p in target.iterdir()] == ["old.txt"]
    with staged_dir(target, overwrite=True) as staging:
        (staging / "new.txt").write_text("new")
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and [p.name for p in target.iterdir()] == ["new.txt"]


def test_select_defaults_are_the_librarys():
    """The CLI writes its defaults as literals (so `peft-cpl --help` imports no torch); they must not drift."""
    import inspect

    from peft_cpl.toolkit.cli import build_parser
    from peft_cpl.tuner.config import CPLConfig
    from peft_cpl.tuner.selection import select_collaborative

    args = build_parser().parse_args(["select", "--mastered", "m.jsonl", "--injection", "i.jsonl", "--output", "out"])
    assert args.ranking == inspect.signature(select_collaborative).parameters["ranking"].default
    config = CPLConfig()
    assert (args.granularity, args.delta_dtype, args.density) == (config.granularity, config.delta_dtype,
                                                                  config.density)
