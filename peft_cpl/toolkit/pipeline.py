"""`peft-cpl run`: the whole workflow in one folder, each step a thin use of the same commands and library calls.

    OUTPUT/run.json                the settings and the fingerprint of ITEMS (a resumed run must match them)
    OUTPUT/split/                  mastered.jsonl, injection.jsonl                      (split)
    OUTPUT/adapter/                the selected CPL adapter                              (select)
    OUTPUT/trained/                the adapter after the last epoch, and its checkpoint  (train, one epoch at a time)
    OUTPUT/merged/                 with --merge: the merged model                        (merge)
    OUTPUT/report/                 report.md, learning.png, selection.png, predictions_before/after.json,
                                   history.json (learned / forgotten after each epoch), settings.yaml, log.txt

Every step is written atomically, so an interrupted run holds finished steps only; `--resume` skips them and
continues training from the last complete epoch. Nothing is created before the inputs have been checked and the
split has shown there is something to teach and something to keep; a run that fails before its first step is done
leaves no OUTPUT.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

from tqdm.auto import tqdm

from ..tuner.atomic import staged_dir, write_text
from . import checkpoint
from .cli_files import CLIError, check_writable
from .data import read_items, write_items
from .evaluation import injection_outcome
from .predictions import Predictions, fingerprint, read_predictions, write_predictions
from .run_report import write_report

STATE_FILE = "run.json"


def _command(argv: list[str]) -> None:
    """Run one `peft-cpl` command in this process, parsed by the real parser (so its checks and defaults apply)."""
    from . import commands
    from .cli import build_parser

    args = build_parser().parse_args([str(arg) for arg in argv])
    getattr(commands, f"cmd_{args.command}")(args)


def _model_flags(settings: dict) -> list[str]:
    flags = ["--model", settings["model"]]
    return flags + (["--load-in-8bit"] if settings["load_in_8bit"] else []) + (
        ["--load-in-4bit"] if settings["load_in_4bit"] else [])


def _quantize(settings: dict) -> str | None:
    return "8bit" if settings["load_in_8bit"] else "4bit" if settings["load_in_4bit"] else None


@contextlib.contextmanager
def _logged(log: Path) -> Iterator[None]:
    """Every step's own output goes to report/log.txt; the terminal shows the progress bar and the run's lines."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a", encoding="utf-8") as handle, contextlib.redirect_stdout(handle):
        yield


RESUMABLE_CHANGES = ("epochs", "show")  # what a resumed run may be given anew (more epochs; other examples)


def _saved_state(output: Path) -> dict:
    path = output / STATE_FILE
    if not path.is_file():
        raise CLIError(f"--resume: {output} holds no run ({path} is missing)")
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(saved["settings"], dict) or not isinstance(saved["fingerprints"], list):
            raise TypeError("settings or fingerprints of the wrong type")
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as error:
        raise CLIError(f"{path} is damaged ({error}); start over with --overwrite") from None
    return saved


def _resumed_settings(output: Path, saved: dict, given: dict, fingerprints: list[str]) -> dict:
    """The saved settings, with what a resumed run was given checked against them."""
    for key, value in given.items():
        if key not in RESUMABLE_CHANGES and saved["settings"].get(key) != value:
            raise CLIError(f"--resume: {key} is {value!r} here but {saved['settings'].get(key)!r} in {output}: a "
                           "resumed run keeps its settings (or start over with --overwrite)")
    if saved["fingerprints"] != fingerprints:
        raise CLIError(f"--resume: the items differ from those {output} was started with (the file changed): "
                       "resume with the same items, or start over with --overwrite")
    return {**saved["settings"], **given}


def _prepare_output(output: Path, resume: bool, overwrite: bool) -> dict | None:
    """The saved state of a run to resume (None: a new run), refusing an OUTPUT that is another run's."""
    saved_path = output / STATE_FILE
    if resume:
        return _saved_state(output)
    if output.exists() and not overwrite:
        hint = " pass --resume to continue it, or" if saved_path.is_file() else ""
        raise CLIError(f"{output} already exists;{hint} pass --overwrite to start over")
    if output.exists() and not output.is_dir():
        raise CLIError(f"{output} exists and is not a folder")
    check_writable(output)
    return None


def run(args) -> None:
    """The `run` command: settings from the flags and --config (cli_run.py), or a resumed run's."""
    from .cli_run import given_settings, resolve_settings
    from .commands import report_split, split_step, within_context
    from .models import load_model

    output = Path(args.output)
    given = given_settings(args)
    saved = _prepare_output(output, args.resume, args.overwrite)
    fields = {key: given.get(key, saved["settings"].get(key) if saved else None)
              for key in ("question_field", "answer_field")}
    items = read_items(args.items, **fields)
    fingerprints = [fingerprint(item) for item in items]
    settings = resolve_settings(_resumed_settings(output, saved, given, fingerprints) if saved else given)
    state = {"items": str(Path(args.items).resolve()), "fingerprints": fingerprints, "settings": settings}
    split, report = output / "split", output / "report"
    epochs = settings["epochs"]
    steps = tqdm(total=3 + 2 * epochs + settings["merge"], desc="peft-cpl run", unit="step", file=sys.stderr)
    created = False
    try:
        if saved is None or not (split / "injection.jsonl").is_file():
            model, tokenizer = load_model(settings["model"], _quantize(settings))
            items = within_context(model, tokenizer, items, settings["match"], settings["max_new_tokens"], args.items,
                                   settings["truncate"])
            steps.set_postfix_str("split")
            before, mastered, injection = split_step(model, tokenizer, items, match=settings["match"],
                                                     batch_size=settings["batch_size"],
                                                     max_new_tokens=settings["max_new_tokens"])
            report_split(model, tokenizer, items, before, match=settings["match"], show=settings["show"],
                         max_new_tokens=settings["max_new_tokens"])
            if not injection:
                raise CLIError(f"the model already answers all {len(items)} items of {args.items}: there is "
                               "nothing to teach (add facts it does not know)")
            if not mastered:
                raise CLIError(f"the model answers none of the {len(items)} items of {args.items}, so there is "
                               "nothing to protect and selection has no g_M; add facts it knows (with the "
                               "warning above: check --match and the replies)" if len(items) > 1 else
                               f"{args.items} holds a single item, which the model does not know: give facts it "
                               "knows too")
            if args.overwrite and output.exists():
                shutil.rmtree(output)
            output.mkdir(parents=True, exist_ok=saved is not None)  # a resumed run stopped before its split was saved
            created = saved is None
            write_text(output / STATE_FILE, json.dumps(state, indent=1))
            write_predictions(report / "predictions_before.json", before)
            with staged_dir(split) as staging:
                write_items(staging / "mastered.jsonl", mastered)
                write_items(staging / "injection.jsonl", injection)
            del model
            tqdm.write(f"split: the model knows {len(mastered)} of {len(items)} items; teaching {len(injection)}")
        else:  # a resumed run may have raised --epochs: its state says so from now on
            write_text(output / STATE_FILE, json.dumps(state, indent=1))
        created = False  # from here on, OUTPUT holds finished steps to resume from
        steps.update(1)
        before = read_predictions(report / "predictions_before.json")
        _select(output, settings, steps)
        _train_and_evaluate(output, items, before, settings, steps)
        if settings["merge"] and not (output / "merged").is_dir():
            steps.set_postfix_str("merge")
            with _logged(report / "log.txt"):
                _command(["merge", *_model_flags(settings), "--adapter", output / "trained", "--output",
                          output / "merged"])
        steps.update(int(settings["merge"]))
        steps.set_postfix_str("report")
        _example_replies(output, items, settings)
        typed = getattr(args, "argv", None) or ["run", args.items, "--output", args.output]
        path = write_report(output, args.items, items, settings, command=["peft-cpl", *map(str, typed)])
        steps.update(1)
        steps.close()
        print(f"report: {path}")
    except BaseException:
        steps.close()
        if created:
            shutil.rmtree(output, ignore_errors=True)
        elif (output / STATE_FILE).is_file():
            print(f"{output} keeps the finished steps; continue with the same command and --resume", file=sys.stderr)
        raise


def _select(output: Path, settings: dict, steps: tqdm) -> None:
    report = output / "report"
    if not (output / "adapter" / "adapter_model.safetensors").is_file():
        steps.set_postfix_str("select")
        argv = ["select", *_model_flags(settings), "--mastered", output / "split/mastered.jsonl", "--injection",
                output / "split/injection.jsonl", "--output", output / "adapter", "--target-modules",
                settings["target_modules"], "--granularity", settings["granularity"], "--batch-size",
                settings["batch_size"], "--overwrite"]
        if importlib.util.find_spec("matplotlib") is not None:  # the plots are optional, as for `select --plot`
            argv += ["--plot", report / "selection.png"]
        if settings["density"] is not None:
            argv += ["--density", settings["density"]]
        with _logged(report / "log.txt"):
            _command(argv)
        from ..tuner.report import SelectionReport

        tqdm.write(f"select: {SelectionReport.load(output / 'adapter').sentence()}")
    steps.update(1)


def _train_and_evaluate(output: Path, items: list[dict], before: Predictions, settings: dict, steps: tqdm) -> None:
    """Train one epoch at a time (train --resume continues the checkpoint) and evaluate after each."""
    report = output / "report"
    history_path = report / "history.json"
    history = json.loads(history_path.read_text(encoding="utf-8")) if history_path.is_file() else []
    trained = checkpoint.read_state(output / "trained")
    done = trained["epoch"] if trained else 0
    for epoch in range(1, settings["epochs"] + 1):
        if epoch > done:
            steps.set_postfix_str(f"train epoch {epoch}")
            argv = ["train", *_model_flags(settings), "--adapter", output / "adapter", "--injection",
                    output / "split/injection.jsonl", "--lr", settings["lr"], "--batch-size", settings["batch_size"],
                    "--seed", settings["seed"], "--epochs", epoch, "--output", output / "trained"]
            if settings["guard"]:
                argv += ["--mastered", output / "split/mastered.jsonl", "--guard"]
            argv += ["--resume"] if epoch > 1 else ["--overwrite"]
            with _logged(report / "log.txt"):
                _command(argv)
        steps.update(1)
        if len(history) < epoch:
            steps.set_postfix_str(f"eval epoch {epoch}")
            with _logged(report / "log.txt"):
                after = _evaluate(output, items, before, settings)
            outcome = injection_outcome(after.correct, [item for item in items if before.correct[item["id"]]],
                                        [item for item in items if not before.correct[item["id"]]])
            history.append({"epoch": epoch, "learned": outcome.learned, "injection": outcome.injection_total,
                            "forgotten": outcome.forgotten, "mastered": outcome.mastered_total})
            write_predictions(report / "predictions_after.json", after)
            write_text(history_path, json.dumps(history, indent=1))
            tqdm.write(f"epoch {epoch}/{settings['epochs']}: {outcome}")
        steps.update(1)


def _example_replies(output: Path, items: list[dict], settings: dict) -> None:
    """Generate, before and after training, the replies to the report's example items that the prefix rule judged
    (the judge itself only needs replies for facts judged by generation), and keep them in the predictions files."""
    from dataclasses import replace

    from .adapter_files import load_adapter
    from .judge import generate_replies
    from .models import load_model
    from .run_report import example_items

    report = output / "report"
    before, after = (read_predictions(report / f"predictions_{when}.json") for when in ("before", "after"))
    missing = [item for item in example_items(items, before, after) if "answer" in item
               and (item["id"] not in before.replies or item["id"] not in after.replies)]
    if not missing:
        return
    for when, predictions in (("before", before), ("after", after)):
        model, tokenizer = load_model(settings["model"], _quantize(settings))
        if when == "after":
            model = load_adapter(model, output / "trained")
        said = generate_replies(model, tokenizer, missing, settings["batch_size"], settings["max_new_tokens"])
        write_predictions(report / f"predictions_{when}.json",
                          replace(predictions, replies={**said, **predictions.replies}))


def _evaluate(output: Path, items: list[dict], before: Predictions, settings: dict) -> Predictions:
    """`eval` of the trained adapter against the predictions before training (its lines go to the log)."""
    from .adapter_files import load_adapter
    from .commands import eval_step, within_context
    from .models import load_model

    base, tokenizer = load_model(settings["model"], _quantize(settings))
    items = within_context(base, tokenizer, items, settings["match"], settings["max_new_tokens"], "ITEMS",
                           settings["truncate"])  # a resumed run's items, cut as the split's were
    model = load_adapter(base, output / "trained")
    return eval_step(model, tokenizer, items, match=settings["match"], batch_size=settings["batch_size"],
                     max_new_tokens=settings["max_new_tokens"], baseline=before,
                     baseline_name=str(output / "report/predictions_before.json"))
