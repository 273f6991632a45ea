"""What each `peft-cpl` command does, on the library's public API (the arguments are cli.py's).

Imported only once the arguments are parsed, so that `peft-cpl --help` does not load torch or peft.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path

from peft import get_peft_model

from ..tuner.config import CPLConfig
from ..tuner.guard import CollaborativeGuard
from ..tuner.integrity import damage_message
from ..tuner.report import REPORT_FILE, SelectionReport
from ..tuner.selection import select_collaborative
from . import checkpoint, processes
from .adapter_files import WEIGHTS_FILE, describe_adapter, load_adapter
from .batches import check_context, make_batches
from .cli_files import CLIError, check_file, check_output, staged_dir
from .data import item_kind, read_items, write_items
from .diagnostics import known_share_warning, wrong_examples
from .evaluation import debiased_split, injection_outcome, predict, split_by_correctness
from .judge import generate_replies, uses_generation
from .loop import make_optimizer, train
from .models import DEFAULT_MODEL, load_model
from .predictions import Predictions, check_against, make_predictions, read_predictions, write_predictions


def _quantize(args: argparse.Namespace) -> str | None:
    return "8bit" if args.load_in_8bit else "4bit" if args.load_in_4bit else None


def _accuracy(correct: dict[str, bool], items: list[dict]) -> str:
    right = sum(correct[item["id"]] for item in items)
    return f"{right}/{len(items)} ({right / len(items):.1%})"


def _read_items(args: argparse.Namespace) -> list[dict]:
    """ITEMS, with the user's column names (--question-field / --answer-field)."""
    return read_items(args.items, question_field=args.question_field, answer_field=args.answer_field)


def within_context(model, tokenizer, items: list[dict], match: str, max_new_tokens: int, source: str,
                   truncate: bool = False) -> list[dict]:
    """Refuse (or with `truncate`, cut) items longer than the model's context, before any model work."""
    generating = any(item_kind(item) == "fact" and uses_generation(item, match) for item in items)
    return check_context(tokenizer, items, getattr(model.config, "max_position_embeddings", None),
                         new_tokens=max_new_tokens if generating else 0, source=source, truncate=truncate)


def split_step(model, tokenizer, items: list[dict], *, match: str, batch_size: int, max_new_tokens: int,
               debiased: bool = False) -> tuple[Predictions, list[dict], list[dict]]:
    """(predictions with the generated replies, mastered, injection): the work of `split`, shared with `run`."""
    replies: dict[str, str] = {}
    if debiased:
        mastered, injection = debiased_split(model, tokenizer, items, batch_size=batch_size)
        correct = {item["id"]: True for item in mastered} | {item["id"]: False for item in injection}
    else:
        correct = predict(model, tokenizer, items, batch_size, match=match, max_new_tokens=max_new_tokens,
                          replies=replies, progress=True)
        mastered, injection = split_by_correctness(correct, items)
    return make_predictions(correct, items, match, replies), mastered, injection


def report_split(model, tokenizer, items: list[dict], predictions: Predictions, *, match: str, show: int,
                 max_new_tokens: int) -> None:
    """Warn about a split that is probably wrong (diagnostics.py) and show replies to `show` wrongly answered items
    (generated now for items the prefix rule judged)."""
    correct = predictions.correct
    facts = [item for item in items if item_kind(item) == "fact"]
    prefixed = sum(not uses_generation(item, match) for item in facts)
    warning = known_share_warning(sum(correct[item["id"]] for item in items), len(items), prefixed)
    if warning:
        print(textwrap.fill(warning, width=119, subsequent_indent="  "), file=sys.stderr)
    if show <= 0:
        return
    replies = dict(predictions.replies)
    wrong = [item for item in facts if not correct[item["id"]]][:show]
    missing = [item for item in wrong if item["id"] not in replies]
    if missing:
        replies |= generate_replies(model, tokenizer, missing, max_new_tokens=max_new_tokens)
    lines = wrong_examples(wrong, correct, replies, show)
    if lines:
        print(f"the model's replies to {len(lines)} wrongly answered facts (--show):")
        print("\n".join(lines))


def cmd_split(args: argparse.Namespace) -> None:
    output = Path(args.output)
    check_output(output, args.overwrite)
    check_file(args.save_predictions, args.overwrite)
    items = _read_items(args)
    if args.debiased and any(item_kind(item) != "mcq" for item in items):
        raise CLIError("--debiased applies to multiple-choice items only (items with a 'label')")
    model, tokenizer = load_model(args.model, _quantize(args))
    items = within_context(model, tokenizer, items, args.match, args.max_new_tokens, args.items, args.truncate)
    predictions, mastered, injection = split_step(model, tokenizer, items, match=args.match,
                                                  batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                                                  debiased=args.debiased)
    with staged_dir(output, args.overwrite) as staging:  # the predictions file inside: if it fails, no output either
        write_items(staging / "mastered.jsonl", mastered)
        write_items(staging / "injection.jsonl", injection)
        if args.save_predictions:
            write_predictions(args.save_predictions, predictions)
    left_out = len(items) - len(mastered) - len(injection)
    print(f"mastered (answered correctly): {len(mastered)} -> {output / 'mastered.jsonl'}")
    print(f"injection (answered wrongly):  {len(injection)} -> {output / 'injection.jsonl'}")
    if left_out:
        print(f"left out (right under some option rotations only): {left_out}")
    if not args.debiased:
        report_split(model, tokenizer, items, predictions, match=args.match, show=args.show,
                     max_new_tokens=args.max_new_tokens)


def _target_modules(value: str) -> str | list[str]:
    if value == "all-linear" or any(char in value for char in "*^$[]()|\\+?"):
        return value
    return [name.strip() for name in value.split(",") if name.strip()]


def cmd_select(args: argparse.Namespace) -> None:
    output = Path(args.output)
    check_output(output, args.overwrite)
    mastered, injection = read_items(args.mastered), read_items(args.injection)
    processes.start()  # under accelerate launch: each rank reads its share of the batches, the sums are reduced
    base, tokenizer = load_model(args.model, _quantize(args))
    mastered = within_context(base, tokenizer, mastered, "prefix", 0, args.mastered)  # training-length items only
    injection = within_context(base, tokenizer, injection, "prefix", 0, args.injection)
    config = CPLConfig(
        target_modules=_target_modules(args.target_modules),
        exclude_modules=_target_modules(args.exclude_modules) if args.exclude_modules else None,
        density=args.density, granularity=args.granularity, delta_dtype=args.delta_dtype,
    )
    try:
        model = get_peft_model(base, config)
    except TypeError as error:  # the tuner's answer to a targeted module type it does not support
        raise CLIError(f"--target-modules: {error}") from None
    report = select_collaborative(
        model, processes.share(make_batches(tokenizer, mastered, args.batch_size)),
        processes.share(make_batches(tokenizer, injection, args.batch_size)), ranking=args.ranking,
        progress=processes.is_main(),
    )

    def write() -> None:
        with staged_dir(output, args.overwrite) as staging:
            model.save_pretrained(staging, save_embedding_layers=False)

    processes.on_main(write)
    if args.table:
        processes.say(report.table())
    processes.say(f"{report.sentence()} -> adapter in {output}{processes.across()}")
    if args.plot and processes.is_main():
        try:
            print(f"plot: {report.plot(args.plot)}")
        except ImportError as error:
            raise CLIError(f"--plot needs matplotlib ({error}); the adapter was written") from None


def _given_train_settings(args: argparse.Namespace) -> dict:
    """The checkpoint settings as given on the command line (None: not given), paths made absolute."""
    given = {key: getattr(args, key, None) for key in checkpoint.SETTINGS}
    given["quantize"] = _quantize(args)
    given["guard"] = args.guard or None
    for key in ("adapter", "injection", "mastered"):
        given[key] = str(Path(given[key]).resolve()) if given[key] else None
    if given["model"] not in (None, DEFAULT_MODEL):
        given["model"] = str(Path(given["model"]).resolve())
    return given


def _train_settings(args: argparse.Namespace, saved: dict | None) -> dict:
    try:
        settings = checkpoint.run_settings(_given_train_settings(args), saved)
    except checkpoint.SettingChanged as change:
        flag = "--load-in-8bit/--load-in-4bit" if change.key == "quantize" else "--" + change.key.replace("_", "-")
        raise CLIError(f"{flag} {change.given} differs from the checkpoint's {change.saved}: a resumed run keeps "
                       "them") from None
    if saved is None and not settings["adapter"]:
        raise CLIError("--adapter is required (the folder written by `peft-cpl select`)")
    if not settings["injection"]:
        raise CLIError("--injection is required (the items to teach)")
    if settings["guard"] and not settings["mastered"]:
        raise CLIError("--guard needs --mastered: sign(g_M) is computed from the mastered items")
    return settings


def cmd_train(args: argparse.Namespace) -> None:
    output = Path(args.output)
    saved = checkpoint.read_state(output)
    if args.resume and saved is None:
        raise CLIError(f"--resume: {output} holds no checkpoint ({checkpoint.state_path(output)} is missing)")
    if not args.resume:
        if saved is not None and not args.overwrite:
            raise CLIError(f"{output} holds a run trained for {saved['epoch']} of {saved['epochs']} epochs: pass "
                           "--resume to continue it, or --overwrite to start over")
        check_output(output, args.overwrite)
        saved = None
    settings = _train_settings(args, saved)
    settings |= checkpoint.input_hashes(settings, saved)
    injection = read_items(settings["injection"])
    mastered = read_items(settings["mastered"]) if settings["guard"] else None

    processes.start()  # under accelerate launch: each rank takes its share of every batch (loop.train)
    base, tokenizer = load_model(settings["model"], settings["quantize"])
    injection = within_context(base, tokenizer, injection, "prefix", 0, settings["injection"])
    if mastered is not None:
        mastered = within_context(base, tokenizer, mastered, "prefix", 0, settings["mastered"])
    model = load_adapter(base, output if saved else settings["adapter"], trainable=True)
    batches = make_batches(tokenizer, injection, settings["batch_size"], seed=settings["seed"])
    guard = None
    if settings["guard"]:
        mastered_batches = processes.share(make_batches(tokenizer, mastered, settings["batch_size"]))
        guard = CollaborativeGuard(model, mastered=mastered_batches, refresh=settings["guard_refresh"])
    fused = settings["fused"]
    optimizer = make_optimizer(model, settings["optimizer"], settings["lr"], settings["weight_decay"], fused=fused,
                               guard=guard if fused else None)
    start = saved["epoch"] if saved else 0
    if saved:
        checkpoint.restore(output, optimizer=optimizer, guard=guard)
    if start >= args.epochs:
        processes.say(f"{output} has already been trained for {start} epochs (asked for {args.epochs}); nothing to do")
        return

    def save_checkpoint(epoch_index: int) -> None:
        epoch = start + epoch_index + 1
        state = {**settings, "epoch": epoch, "epochs": args.epochs}
        processes.on_main(lambda: checkpoint.save(output, model=model, optimizer=optimizer, guard=guard, state=state))
        processes.say(f"epoch {epoch}/{args.epochs}: adapter and checkpoint written to {output}")

    processes.say(f"training {len(injection)} items, epochs {start + 1}-{args.epochs}, {settings['optimizer']} "
                  f"lr {settings['lr']}{' with the guard' if guard else ''}")
    losses = train(
        model, batches, epochs=args.epochs - start, optimizer=optimizer, guard=guard, seed=settings["seed"] + start,
        on_epoch_end=save_checkpoint,
    )
    processes.say("mean loss per epoch: " + ", ".join(f"{loss:.4f}" for loss in losses))
    if guard is not None:
        processes.say(f"the guard reverted {guard.revert_fraction:.1%} of {guard.proposed:,} proposed coordinate "
                      "updates")


def eval_step(model, tokenizer, items: list[dict], *, match: str, batch_size: int, max_new_tokens: int,
              baseline: Predictions | None = None, baseline_name: str = "") -> Predictions:
    """Print the accuracy (and learned / forgotten against `baseline`); the predictions. Shared with `run`."""
    replies: dict[str, str] = {}
    known = check_against(baseline, items, match, baseline_name) if baseline is not None else None
    if known is not None and not known:
        raise CLIError(f"none of the item ids appear in {baseline_name}")
    correct = predict(model, tokenizer, items, batch_size, match=match, max_new_tokens=max_new_tokens,
                      replies=replies, progress=True)
    print(f"accuracy: {_accuracy(correct, items)}")
    for kind, label in (("mcq", "multiple choice"), ("fact", "free-form facts")):
        subset = [item for item in items if item_kind(item) == kind]
        if subset and len(subset) < len(items):
            print(f"  {label}: {_accuracy(correct, subset)}")
    if known:
        mastered, injection = split_by_correctness(baseline.correct, known)
        print(f"against {baseline_name}: {injection_outcome(correct, mastered, injection)}")
        if len(known) < len(items):
            print(f"  ({len(items) - len(known)} items are not in the baseline and are left out of this count)")
    return make_predictions(correct, items, match, replies)


def cmd_eval(args: argparse.Namespace) -> None:
    items = _read_items(args)
    baseline = read_predictions(args.baseline) if args.baseline else None
    if baseline is not None:
        check_against(baseline, items, args.match, args.baseline)  # before the model is loaded
    check_file(args.save_predictions, args.overwrite)
    model, tokenizer = load_model(args.model, _quantize(args))
    items = within_context(model, tokenizer, items, args.match, args.max_new_tokens, args.items, args.truncate)
    if args.adapter:
        model = load_adapter(model, args.adapter)
    predictions = eval_step(model, tokenizer, items, match=args.match, batch_size=args.batch_size,
                            max_new_tokens=args.max_new_tokens, baseline=baseline, baseline_name=args.baseline)
    if args.save_predictions:
        write_predictions(args.save_predictions, predictions)


def cmd_merge(args: argparse.Namespace) -> None:
    from ..tuner.merge import merge_and_report, merge_into_float

    output = Path(args.output)
    check_output(output, args.overwrite)
    base, tokenizer = load_model(args.model, _quantize(args))
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
    adapter = describe_adapter(args.adapter)
    config = adapter.config
    print(f"CPL adapter {adapter.folder}: base {config.get('base_model_name_or_path')}, support "
          f"{config.get('support')}, granularity {config.get('granularity')}, density cap {config.get('density')}, "
          f"values {config.get('delta_dtype')}")
    print(f"{'module':<56} {'shape':>12} {'support':>10} {'density':>8} {'index B':>9} {'bits/coord':>10}")
    for module in adapter.modules:
        bits = f"{8 * module.index_bytes / module.support:.2f}" if module.support else "-"
        print(f"{module.name[-56:]:<56} {'x'.join(map(str, module.shape)):>12} {module.support:>10,} "
              f"{module.support / module.numel:>8.2%} {module.index_bytes:>9,} {bits:>10}")
    support, numel, index_bytes = (adapter.total(key) for key in ("support", "numel", "index_bytes"))
    print(f"{len(adapter.modules)} modules: {support:,} of {numel:,} coordinates ({support / max(numel, 1):.2%}); "
          f"index {index_bytes:,} bytes ({8 * index_bytes / max(support, 1):.2f} bits per coordinate); "
          f"file {adapter.weights_bytes:,} bytes")
    if (adapter.folder / REPORT_FILE).is_file():
        print(f"selection: {SelectionReport.load(adapter.folder).sentence()}")
    state = checkpoint.read_state(adapter.folder)
    if state is not None:
        print(f"checkpoint: epoch {state['epoch']} of {state['epochs']} (resume with `peft-cpl train --resume`)")
    for warning in adapter.non_finite:
        print(f"warning: {warning}", file=sys.stderr)
    if adapter.damaged:
        raise CLIError(damage_message(adapter.folder / WEIGHTS_FILE, adapter.damaged))


def cmd_estimate(args: argparse.Namespace) -> None:
    from transformers import AutoConfig

    from .memory import estimate_memory

    path = Path(args.model)
    if not path.exists():
        raise CLIError(f"--model {path}: no such folder or config file")
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as error:
        raise CLIError(f"--model {path}: not a model folder or config.json ({str(error).splitlines()[0]})") from None
    if args.batch_size < 1 or args.seq_len < 1:
        raise CLIError("--batch-size and --seq-len must be at least 1")
    estimate = estimate_memory(
        config, density=args.density, optimizer=args.optimizer, base=args.base, fused=args.fused, guard=args.guard,
        batch_size=args.batch_size, seq_len=args.seq_len, gradient_checkpointing=args.gradient_checkpointing,
        granularity=args.granularity,
    )
    print(f"{config.model_type} from {path}: density {args.density} ({args.granularity}), {args.optimizer}"
          f"{' fused' if args.fused else ''}{' + guard' if args.guard else ''}, {args.base} base, batch "
          f"{args.batch_size} x {args.seq_len}{', gradient checkpointing' if args.gradient_checkpointing else ''}")
    print(estimate.table())
    if args.gpu_gib is not None:
        for what, selection in (("training", False), ("selection with its accumulators on the GPU", True)):
            verdict = "fits" if estimate.fits(args.gpu_gib, selection=selection) else "does not fit"
            print(f"{what}: {verdict} in {args.gpu_gib:g} GiB")
        print("(select_collaborative(..., accumulate_on='cpu') keeps selection's accumulators in host memory)")


def cmd_run(args: argparse.Namespace) -> None:
    from .pipeline import run

    run(args)
