"""What every example starts with: its options, the model (SmolLM2-135M-Instruct, or with --tiny the stand-in of
_tiny.py) and the facts split by what the model already knows."""

from __future__ import annotations

import argparse
from pathlib import Path

from _tiny import save_tiny_model, tiny_facts

from peft_cpl.toolkit.data import country_facts
from peft_cpl.toolkit.evaluation import predict, split_by_correctness
from peft_cpl.toolkit.models import model_path


def example_parser(description: str, *, questions: int, teach: int, output: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny in-process model instead of SmolLM2 (seconds)")
    parser.add_argument("--questions", type=int, default=questions, help="country capitals to ask (real model)")
    parser.add_argument("--teach", type=int, default=teach, help="unknown facts to teach; as many known ones are kept")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--lr", type=float, help="AdamW learning rate (default: 3e-4, tiny model 1e-2)")
    parser.add_argument("--output", type=Path, default=Path(output))
    return parser


def model_and_facts(args: argparse.Namespace, write: bool = True) -> tuple[Path, list[dict], float]:
    """(model folder, facts to ask, learning rate): SmolLM2 and country capitals, or the tiny model and its facts.
    Load the model with `peft_cpl.toolkit.models.load_model(folder)`. `write=False`: the tiny model's folder, which
    another process writes."""
    lr = args.lr or (1e-2 if args.tiny else 3e-4)
    tiny = args.output / "tiny-base"
    folder = (save_tiny_model(tiny) if write else tiny) if args.tiny else model_path(None)
    facts = tiny_facts() if args.tiny else country_facts(["capital"])[: args.questions]
    return folder, facts, lr


def known_and_unknown(model, tokenizer, facts: list[dict], teach: int) -> tuple[list[dict], list[dict]]:
    """Ask the model every fact; keep `teach` it answers right (mastered) and `teach` it gets wrong (injection)."""
    known, unknown = split_by_correctness(predict(model, tokenizer, facts), facts)
    mastered, injection = known[:teach], unknown[:teach]
    print(f"The model knows {len(known)} of {len(facts)} facts; teaching {len(injection)}, keeping {len(mastered)}.")
    return mastered, injection
