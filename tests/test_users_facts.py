"""Users' own facts (issue 16): answers as models give them (the generation judge), the file formats users have,
the split's diagnostics, and `peft-cpl run` from a file to a report, with its bad inputs."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from peft_cpl.toolkit.cli import main
from peft_cpl.toolkit.data import read_items, write_items
from peft_cpl.toolkit.evaluation import predict
from peft_cpl.toolkit.judge import answer_in_reply, normalize
from peft_cpl.toolkit.tiny import fit, item_texts, tiny_llama, tiny_tokenizer

from .conftest import FACTS, cpl_layers
from .test_cli import KNOWN, save_model

PLAIN = [{"id": item["id"], "question": item["question"], "answer": item["answer"]} for item in FACTS[:12]]


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("facts")
    save_model(root / "model", KNOWN)
    return root


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(arg) for arg in argv])
    out, err = capsys.readouterr()
    return code, out, err


# -- the generation judge ---------------------------------------------------------------------------------------
def test_normalisation_and_aliases_as_squad_does():
    assert normalize("  The Capital, of  FRANCE is: Paris!  ") == "capital of france is paris"
    fact = {"question": "capital of France?", "answer": "Paris", "answers": ["Lutetia"]}
    assert answer_in_reply("The capital of France is Paris.", fact)
    assert answer_in_reply("It was called Lutetia.", fact)
    assert not answer_in_reply("Parisians live there.", fact)  # whole words only
    assert answer_in_reply("The U.S.A.", {"question": "q", "answer": "USA"})


def test_a_model_that_answers_in_sentences_is_right_by_generation_and_wrong_by_prefix():
    """Taught to reply "it is cityK", the model knows the facts; the prefix rule (the reply must start with the
    answer) says it knows none of them, the generation judge says it knows them all; auto picks by the prefix."""
    taught = [{"id": f"t{k}", "question": f"capital of land{k} ?", "answer": f"it is city{k}"} for k in range(4)]
    asked = [{**item, "answer": item["answer"].removeprefix("it is ")} for item in taught]
    tokenizer = tiny_tokenizer(item_texts(taught))
    model = fit(tiny_llama(vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id), tokenizer, taught,
                steps=80, lr=1e-2)
    replies: dict[str, str] = {}
    assert set(predict(model, tokenizer, asked, match="prefix").values()) == {False}
    assert set(predict(model, tokenizer, asked, match="generate", replies=replies).values()) == {True}
    assert replies["t2"].startswith("it is city2")
    assert predict(model, tokenizer, asked) == predict(model, tokenizer, asked, match="generate")  # auto, no prefix
    prefixed = [{**item, "response_prefix": "it is"} for item in asked]
    assert predict(model, tokenizer, prefixed) == predict(model, tokenizer, prefixed, match="prefix")
    with pytest.raises(ValueError, match="match must be one of"):
        predict(model, tokenizer, asked, match="contains")


# -- formats ----------------------------------------------------------------------------------------------------
def test_every_format_gives_the_same_items(tmp_path):
    rows = [{"id": item["id"], "Q": item["question"], "A": item["answer"]} for item in PLAIN]
    (tmp_path / "f.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (tmp_path / "f.json").write_text(json.dumps(rows))
    with open(tmp_path / "f.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["id", "Q", "A"])
        writer.writeheader()
        writer.writerows(rows)
    dataset = datasets.Dataset.from_list(rows)
    dataset.to_parquet(tmp_path / "f.parquet")
    dataset.save_to_disk(tmp_path / "saved")
    datasets.DatasetDict(train=dataset).save_to_disk(tmp_path / "one_split")
    for source in ("f.jsonl", "f.json", "f.csv", "f.parquet", "saved", "one_split"):
        assert read_items(tmp_path / source, question_field="Q", answer_field="A") == PLAIN, source
    assert read_items(dataset, question_field="Q", answer_field="A") == PLAIN
    datasets.DatasetDict(train=dataset, test=dataset).save_to_disk(tmp_path / "two")
    with pytest.raises(ValueError, match="holds the splits train, test: give the folder of one split"):
        read_items(tmp_path / "two")


def test_csv_cells_stay_as_written_and_errors_name_the_row_and_field(tmp_path):
    (tmp_path / "years.csv").write_text("question,answer\nWhen did it end?,1945\nHow much?,1.50\n")
    assert [item["answer"] for item in read_items(tmp_path / "years.csv")] == ["1945", "1.50"]
    (tmp_path / "gap.csv").write_text("question,answer\nq1,a1\nq2,\n")
    with pytest.raises(ValueError, match=r"gap\.csv, row 2: an item needs .* 'answer'"):
        read_items(tmp_path / "gap.csv")
    with pytest.raises(ValueError, match=r"--question-field 'Question': no such column; the columns are 'question'"):
        read_items(tmp_path / "gap.csv", question_field="Question")
    (tmp_path / "other.csv").write_text("prompt_text,gold\nq1,a1\n")
    with pytest.raises(ValueError, match=r"row 1: not an item.*'prompt_text', 'gold'.*--question-field"):
        read_items(tmp_path / "other.csv")


@pytest.mark.parametrize(("name", "content", "message"), [
    ("empty.jsonl", b"", "is empty: it holds no items"),
    ("blank.jsonl", b"\n  \n", "is empty: it holds no items"),
    ("header.csv", b"question,answer\n", "has a header but no rows"),
    ("broken.parquet", b"PAR1 this is not parquet", "cannot be read as PARQUET"),
    ("latin1.csv", "question,answer\nq,caf\xe9\n".encode("latin-1"), "not UTF-8 text"),
    ("facts.txt", b"q? a", "unknown file type '.txt'"),
])
def test_unreadable_files_are_one_error_naming_the_file(tmp_path, capsys, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ValueError, match=message):
        read_items(tmp_path / name)
    code, _, err = run(capsys, "split", tmp_path / name, "--model", tmp_path / "unused", "--output", tmp_path / "o")
    assert code == 2 and err.startswith(f"error: {tmp_path / name}") and not (tmp_path / "o").exists()


# -- split: diagnostics and the judge flag ----------------------------------------------------------------------
def test_split_warns_when_the_model_knows_almost_nothing_and_shows_its_replies(ws, tmp_path, capsys):
    write_items(tmp_path / "unknown.jsonl", FACTS[6:12])
    code, out, err = run(capsys, "split", tmp_path / "unknown.jsonl", "--model", ws / "model", "--output",
                         tmp_path / "s", "--match", "prefix", "--show", "2")
    assert code == 0 and "warning: the model answers only 0 of 6 items (0.0%)" in err and "--match generate" in err
    assert "replies to 2 wrongly answered facts" in out and out.count("the model said") == 2
    write_items(tmp_path / "known.jsonl", FACTS[:6])
    code, _, err = run(capsys, "split", tmp_path / "known.jsonl", "--model", ws / "model", "--output",
                       tmp_path / "k", "--save-predictions", tmp_path / "k.json")
    assert code == 0 and "already answers 6 of 6 items" in err
    saved = json.loads((tmp_path / "k.json").read_text())
    assert saved["match"] == "auto" and set(saved["correct"].values()) == {True} and len(saved["items"]) == 6


def test_an_item_longer_than_the_context_is_refused_by_name_before_any_work(tmp_path, capsys):
    save_model(tmp_path / "short", [], max_position_embeddings=32)
    long = {"id": "long-one", "question": " ".join(["capital of land1 ?"] * 12), "answer": "city1"}
    write_items(tmp_path / "q.jsonl", [*FACTS[:2], long])
    for command in ("split", "eval", "run"):
        argv = [command, tmp_path / "q.jsonl", "--model", tmp_path / "short"]
        code, out, err = run(capsys, *argv, *([] if command == "eval" else ["--output", tmp_path / "o"]))
        assert code == 2 and "item 'long-one'" in err and "over the model's context of 32" in err, command
        assert not (tmp_path / "o").exists() and "accuracy" not in out
    write_items(tmp_path / "ok.jsonl", FACTS[:2])
    short, ok, long_items = tmp_path / "short", tmp_path / "ok.jsonl", tmp_path / "q.jsonl"
    code, _, err = run(capsys, "select", "--model", short, "--mastered", ok, "--injection", long_items, "--output",
                       tmp_path / "o")
    assert code == 2 and "item 'long-one'" in err and not (tmp_path / "o").exists()
    assert run(capsys, "select", "--model", short, "--mastered", ok, "--injection", ok, "--output",
               tmp_path / "adapter")[0] == 0
    code, _, err = run(capsys, "train", "--model", short, "--adapter", tmp_path / "adapter", "--injection",
                       long_items, "--output", tmp_path / "o")
    assert code == 2 and "item 'long-one'" in err and not (tmp_path / "o").exists()


# -- peft-cpl run -----------------------------------------------------------------------------------------------
def values(folder: Path, base: Path) -> list[torch.Tensor]:
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), folder)
    return [layer.cpl_values["default"].detach().clone() for layer in cpl_layers(model).values()]


@pytest.fixture(scope="module")
def facts_csv(ws) -> Path:
    with open(ws / "facts.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "Q", "A", "response_prefix"])
        writer.writerows([item["id"], item["question"], item["answer"], item["response_prefix"]]
                         for item in FACTS[:12])
    return ws / "facts.csv"


def test_run_goes_from_a_csv_to_a_report_and_resumes(ws, facts_csv, capsys):
    (ws / "run.yaml").write_text("model: model\nepochs: 2\nlr: 1e-2\nbatch_size: 4\nguard: true\n"
                                 "question-field: Q\nanswer_field: A\n")
    code, out, err = run(capsys, "run", facts_csv, "--config", ws / "run.yaml", "--merge", "--output", ws / "out")
    assert code == 0, err
    report = ws / "out/report"
    assert {"report.md", "learning.png", "selection.png", "predictions_before.json", "predictions_after.json",
            "history.json", "settings.yaml", "log.txt"} <= {path.name for path in report.iterdir()}
    assert (report / "learning.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    history = json.loads((report / "history.json").read_text())
    assert [row["epoch"] for row in history] == [1, 2] and history[0]["injection"] == 6  # the model knows f0..f5
    text = (report / "report.md").read_text()
    assert "| 2 | " in text and "learning.png" in text and "--config" in text and "peft-cpl run" in text
    assert (ws / "out/merged/config.json").is_file() and "epoch 2/2: learned" in out
    assert not [path.name for path in (ws / "out").iterdir() if path.name.startswith(".")]

    # the saved settings rerun the same run; an interrupted run (stopped after epoch 1) resumes to the same adapter
    code, _, err = run(capsys, "run", facts_csv, "--config", report / "settings.yaml", "--epochs", 1, "--output",
                       ws / "part")
    assert code == 0, err
    code, _, err = run(capsys, "run", facts_csv, "--output", ws / "part", "--lr", "0.5", "--resume")
    assert code == 2 and "--resume: lr is 0.5 here but 0.01" in err
    code, _, err = run(capsys, "run", facts_csv, "--output", ws / "part", "--resume", "--epochs", 2)
    assert code == 0, err
    for full, resumed in zip(values(ws / "out/trained", ws / "model"), values(ws / "part/trained", ws / "model")):
        assert torch.equal(full, resumed)
    assert json.loads((ws / "part/report/history.json").read_text()) == history
    code, _, err = run(capsys, "run", facts_csv, "--output", ws / "part")
    assert code == 2 and "pass --resume to continue it, or pass --overwrite" in err


def test_run_trains_with_the_guard_unless_told_not_to(tmp_path):
    """The guard is `run`'s default (the seeded benchmark's finding); --no-guard or `guard: false` in a config turns
    it off, and a flag wins over the config either way."""
    from peft_cpl.toolkit.cli import build_parser
    from peft_cpl.toolkit.cli_run import given_settings, resolve_settings

    (tmp_path / "off.yaml").write_text("guard: false\n")

    def guard(*flags: str) -> bool:
        args = build_parser().parse_args(["run", "facts.csv", "--output", str(tmp_path / "out"), *flags])
        return resolve_settings(given_settings(args))["guard"]

    assert guard() is True and guard("--guard") is True and guard("--no-guard") is False
    config = ("--config", str(tmp_path / "off.yaml"))
    assert guard(*config) is False and guard(*config, "--guard") is True and guard(*config, "--no-guard") is False


def test_run_refuses_bad_inputs_before_leaving_any_output(ws, facts_csv, tmp_path, capsys):
    write_items(tmp_path / "known.jsonl", FACTS[:6])
    write_items(tmp_path / "unknown.jsonl", FACTS[6:12])
    (tmp_path / "dup.jsonl").write_text("".join(json.dumps({**item, "id": "x"}) + "\n" for item in FACTS[:2]))
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not a parquet file")
    (tmp_path / "bad.yaml").write_text("epochs: three\n")
    cases = {
        "nothing to teach": ["run", tmp_path / "known.jsonl"],
        "nothing to protect": ["run", tmp_path / "unknown.jsonl"],
        "lines 1 and 2: both have the id 'x'": ["run", tmp_path / "dup.jsonl"],
        "--answer-field 'Answer': no such column": ["run", facts_csv, "--question-field", "Q", "--answer-field",
                                                    "Answer"],
        "cannot be read as PARQUET": ["run", tmp_path / "bad.parquet"],
        "epochs must be int, got 'three'": ["run", facts_csv, "--config", tmp_path / "bad.yaml"],
    }
    for message, argv in cases.items():
        code, _, err = run(capsys, *argv, "--model", ws / "model", "--output", tmp_path / "out")
        last = err.strip().splitlines()[-1]  # after the progress bar and the split's warning
        assert code == 2 and message in last and last.startswith("error: ") and "Traceback" not in err, (message, err)
        assert not (tmp_path / "out").exists(), message


def test_help_of_the_item_commands_loads_neither_torch_nor_datasets():
    """What keeps `peft-cpl --help` under 2 s (0.1 s measured): nothing heavy is imported to print it."""
    script = """
import contextlib, io, sys
from peft_cpl.toolkit.cli import build_parser
for argv in ([], ["split"], ["eval"], ["run"]):
    with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):
        build_parser().parse_args([*argv, "--help"])
print(sorted(name for name in ("torch", "datasets", "transformers", "peft") if name in sys.modules))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stderr
