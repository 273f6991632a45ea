"""Hardening (issue 18): damaged files and environment faults as one `error:` line with exit 2, item identity by
content, outputs checked before compute and never left half-made, and a fuzz test of the readers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from peft_cpl.toolkit.cli import main
from peft_cpl.toolkit.data import read_items, write_items

from .conftest import FACTS
from .test_cli import KNOWN, save_model


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    """model/, q.jsonl, split/, before.json, adapter/ and trained/ (one epoch, with the guard)."""
    root = tmp_path_factory.mktemp("hard")
    save_model(root / "model", KNOWN)
    write_items(root / "q.jsonl", FACTS)
    model = str(root / "model")
    assert main(["split", str(root / "q.jsonl"), "--model", model, "--output", str(root / "split"),
                 "--save-predictions", str(root / "before.json")]) == 0
    assert main(["select", "--model", model, "--mastered", str(root / "split/mastered.jsonl"), "--injection",
                 str(root / "split/injection.jsonl"), "--output", str(root / "adapter")]) == 0
    assert main(train_args(root, root / "trained", 1)) == 0
    return root


def train_args(root: Path, output: str | Path, epochs: int, *extra: str) -> list[str]:
    return ["train", "--model", str(root / "model"), "--adapter", str(root / "adapter"), "--injection",
            str(root / "split/injection.jsonl"), "--mastered", str(root / "split/mastered.jsonl"), "--guard",
            "--lr", "0.01", "--batch-size", "4", "--epochs", str(epochs), "--output", str(output), *extra]


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(arg) for arg in argv])
    out, err = capsys.readouterr()
    return code, out, err


def copy_tree(source: Path, target: Path) -> Path:
    import shutil

    shutil.copytree(source, target)
    return target


def expect_error(capsys, message: str, *argv) -> str:
    code, out, err = run(capsys, *argv)
    assert code == 2 and err.startswith("error: ") and message in err and "Traceback" not in err, err
    return out


# -- identity ---------------------------------------------------------------------------------------------------
def test_a_baseline_from_another_file_with_the_same_ids_is_refused(ws, tmp_path, capsys):
    other = [{**item, "answer": item["answer"] + "x"} if "answer" in item else item for item in FACTS]
    write_items(tmp_path / "q.jsonl", other)  # same name, same default-free ids, other answers
    out = expect_error(capsys, "item 'f0' is not the item", "eval", tmp_path / "q.jsonl", "--model", ws / "model",
                       "--baseline", ws / "before.json")
    assert "accuracy" not in out  # refused before the model was loaded
    expect_error(capsys, "judged with --match auto: pass --match auto", "eval", ws / "q.jsonl", "--model",
                 ws / "model", "--baseline", ws / "before.json", "--match", "prefix")
    code, out, _ = run(capsys, "eval", ws / "split/injection.jsonl", "--model", ws / "model", "--baseline",
                       ws / "before.json")  # a subset of the same items is fine
    assert code == 0 and "learned 0/6" in out


def test_resume_refuses_changed_inputs(ws, tmp_path, capsys):
    trained = copy_tree(ws / "trained", tmp_path / "trained")
    injection = Path(json.loads((trained / "checkpoint/state.json").read_text())["injection"])
    original = injection.read_text()
    try:
        injection.write_text(original.replace("city6", "town6"))
        expect_error(capsys, "has changed since the checkpoint was written", "train", "--output", trained,
                     "--resume", "--epochs", "2")
    finally:
        injection.write_text(original)
    assert run(capsys, "train", "--output", trained, "--resume", "--epochs", "2")[0] == 0


# -- damaged files ----------------------------------------------------------------------------------------------
def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_damaged_checkpoints_and_adapters_are_errors_naming_the_file(ws, tmp_path, capsys):
    optimizer = copy_tree(ws / "trained", tmp_path / "optimizer")
    truncate(optimizer / "checkpoint/optimizer.pt")
    expect_error(capsys, "optimizer.pt is damaged", "train", "--output", optimizer, "--resume", "--epochs", "2")

    state = copy_tree(ws / "trained", tmp_path / "state")
    saved = json.loads((state / "checkpoint/state.json").read_text())
    del saved["lr"]
    (state / "checkpoint/state.json").write_text(json.dumps(saved))
    expect_error(capsys, "state.json is damaged: it lacks lr", "train", "--output", state, "--resume", "--epochs",
                 "2")
    (state / "checkpoint/state.json").write_text('{"epoch": 1,')
    expect_error(capsys, "state.json is damaged: not JSON", "inspect", state)

    weights = copy_tree(ws / "trained", tmp_path / "weights")
    truncate(weights / "adapter_model.safetensors")
    expect_error(capsys, "adapter_model.safetensors is truncated or corrupted", "inspect", weights)
    expect_error(capsys, "adapter_model.safetensors is truncated or corrupted", "eval", ws / "q.jsonl", "--model",
                 ws / "model", "--adapter", weights)
    (weights / "adapter_config.json").write_text("{not json")
    expect_error(capsys, "adapter_config.json is damaged: not JSON", "inspect", weights)

    empty = tmp_path / "no-weights"
    empty.mkdir()
    (empty / "adapter_config.json").write_text((ws / "trained/adapter_config.json").read_text())
    expect_error(capsys, f"no adapter weights in {empty}", "eval", ws / "q.jsonl", "--model", ws / "model",
                 "--adapter", empty)


def test_a_model_folder_without_a_tokenizer_says_so(ws, tmp_path, capsys):
    folder = tmp_path / "bare"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        (folder / name).write_bytes((ws / "model" / name).read_bytes())
    expect_error(capsys, f"{folder} has no tokenizer", "eval", ws / "q.jsonl", "--model", folder)


# -- outputs ----------------------------------------------------------------------------------------------------
def test_unwritable_outputs_are_refused_before_any_compute(ws, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    out = expect_error(capsys, f"cannot write {blocker / 'p.json'}: {blocker} is a file", "split", ws / "q.jsonl",
                       "--model", ws / "model", "--output", tmp_path / "o", "--save-predictions", blocker / "p.json")
    assert "mastered" not in out and not (tmp_path / "o").exists()
    expect_error(capsys, "is a file, not a folder", *train_args(ws, blocker / "x", 1))
    assert sorted(path.name for path in tmp_path.iterdir()) == ["a-file"]


def test_outputs_get_the_users_umask(ws, tmp_path, capsys):
    previous = os.umask(0o027)
    try:
        assert run(capsys, "split", ws / "q.jsonl", "--model", ws / "model", "--output", tmp_path / "s")[0] == 0
        assert run(capsys, "select", "--model", ws / "model", "--mastered", ws / "split/mastered.jsonl",
                   "--injection", ws / "split/injection.jsonl", "--output", tmp_path / "a")[0] == 0
    finally:
        os.umask(previous)
    assert (tmp_path / "s").stat().st_mode & 0o777 == 0o750
    assert (tmp_path / "s/mastered.jsonl").stat().st_mode & 0o777 == 0o640
    # safetensors writes its files 0600 whatever the umask: the staged folder gives them the user's
    assert (tmp_path / "a/adapter_model.safetensors").stat().st_mode & 0o777 == 0o640


def test_sigterm_while_an_output_is_staged_leaves_nothing(tmp_path):
    """The CLI turns SIGTERM into an exception, so the staged folder is removed on the way out. (atomic.py uses the
    standard library only: loaded from its file, the process starts without torch, in a fraction of a second.)"""
    import peft_cpl.toolkit.cli as cli

    atomic = Path(cli.__file__).parents[1] / "tuner" / "atomic.py"
    script = f"""
import importlib.util, os, signal, sys
from pathlib import Path
from peft_cpl.toolkit.cli import _raise_terminated, Terminated
spec = importlib.util.spec_from_file_location("atomic", {str(atomic)!r})
atomic = importlib.util.module_from_spec(spec)
spec.loader.exec_module(atomic)
staged_dir = atomic.staged_dir
signal.signal(signal.SIGTERM, _raise_terminated)
try:
    with staged_dir(Path({str(tmp_path / 'out')!r})) as staging:
        (staging / "half.txt").write_text("half")
        os.kill(os.getpid(), signal.SIGTERM)
        signal.pause()
except Terminated:
    sys.exit(143)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 128 + signal.SIGTERM, result.stderr
    assert list(tmp_path.iterdir()) == []


# -- fuzz -------------------------------------------------------------------------------------------------------
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                                 max_size=3), max_leaves=6)
FIELD = st.sampled_from(["question", "answer", "label", "id", "response_prefix", "answers", "messages", "prompt",
                         "completion", "text"])
RECORD = st.dictionaries(FIELD, JSON | st.text(min_size=1, max_size=10), max_size=5)
FUZZ = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def read_or_documented_error(path: Path) -> None:
    """A reader answers a list of valid items or a ValueError/FileNotFoundError naming the file; nothing else."""
    try:
        items = read_items(path)
    except ValueError as error:
        assert str(path) in str(error)
        return
    assert items and all(isinstance(item["id"], str) and item["question"].strip() for item in items)


@FUZZ
@given(content=st.binary(max_size=200), suffix=st.sampled_from([".jsonl", ".json", ".csv", ".parquet"]))
def test_random_bytes_give_items_or_the_documented_error(tmp_path, content, suffix):
    path = tmp_path / f"fuzz{suffix}"
    path.write_bytes(content)
    read_or_documented_error(path)


@FUZZ
@given(lines=st.lists(JSON | RECORD, min_size=1, max_size=4))
def test_random_json_values_and_field_types_give_items_or_the_documented_error(tmp_path, lines):
    path = tmp_path / "fuzz.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    read_or_documented_error(path)
    path = tmp_path / "fuzz.json"
    path.write_text(json.dumps(lines))
    read_or_documented_error(path)


def in_a_full_disk(size: str, command: list[str]) -> tuple[int, str, str]:
    """(exit status, its error lines, what is left on the disk) of `command` writing under $DISK, a tmpfs of `size`
    mounted in a mount namespace of its own (no root needed where user namespaces are allowed); skips where they are
    not."""
    if subprocess.run(["sh", "-c", "command -v unshare"], capture_output=True).returncode:
        pytest.skip("no unshare here: a small disk cannot be mounted")
    script = ('DISK=$(mktemp -d) && mount -t tmpfs -o size=$SIZE tmpfs "$DISK" || exit 99; '
              'export DISK; "$@" >/dev/null 2>"$DISK.err"; code=$?; echo "$code"; cat "$DISK.err" >&2; ls -A "$DISK"')
    done = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script, "sh", *command],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "SIZE": size})
    if done.returncode == 99 or not done.stdout.strip():
        pytest.skip(f"this machine allows no tmpfs in a user namespace ({done.stderr.strip()[:200]})")
    code, *left = done.stdout.split()
    messages = [line for line in done.stderr.splitlines() if line.startswith(("error", "Traceback"))]
    return int(code), "\n".join(messages), " ".join(left)


def test_a_full_disk_is_named_and_leaves_nothing(ws):
    """A checkpoint (torch.save) and a merge (safetensors) on a disk too small for them: one `error:` line that says
    the disk is full, exit 2, and no half-written output or hidden temporary on that disk."""
    cli = [sys.executable, "-m", "peft_cpl.toolkit.cli"]
    train = [arg.replace("@DISK", "$DISK") for arg in train_args(ws, "@DISK/trained", 1)]
    code, err, left = in_a_full_disk("200k", ["sh", "-c", " ".join([*cli, *train[:-1], '"$DISK/trained"'])])
    assert code == 2 and err.startswith("error: ") and "\n" not in err and "the disk is full" in err, err
    assert "Traceback" not in err and left == ""
    merge = [*cli, "merge", "--model", str(ws / "model"), "--adapter", str(ws / "trained"), "--output"]
    code, err, left = in_a_full_disk("64k", ["sh", "-c", " ".join([*merge, '"$DISK/merged"'])])
    assert code == 2 and err.startswith("error: ") and "\n" not in err and "the disk is full" in err, err
    assert "No space left on device" in err and "Traceback" not in err and left == ""
