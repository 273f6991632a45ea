"""CPL on an 8-bit base (bitsandbytes): select, train, then merge both ways.

    python examples/quantized_8bit.py           SmolLM2-135M-Instruct in 8 bits and country capitals
    python examples/quantized_8bit.py --tiny    a tiny Llama in 8 bits and made-up facts (seconds)

Selection reads gradients from hooks, so it works on int8 weights. The trained delta can then be merged
- into the int8 weights (`merge_and_report`): small updates can round away; the report says how much survived;
- into a float copy of the dequantized base (`merge_into_float`): lossless, at float size.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch
from _tiny import save_tiny_model, tiny_facts  # examples/_tiny.py, for --tiny
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from peft_cpl import CPLConfig, select_collaborative
from peft_cpl.bnb import merge_and_report, merge_into_float
from peft_cpl.data import country_facts
from peft_cpl.default_model import default_model_path
from peft_cpl.evaluation import injection_outcome, make_batches, predict, split_by_correctness
from peft_cpl.training import make_optimizer, train


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny in-process model instead of SmolLM2 (seconds)")
    parser.add_argument("--questions", type=int, default=80, help="country capitals to ask (real model)")
    parser.add_argument("--teach", type=int, default=8, help="unknown facts to teach; as many known ones are kept")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--lr", type=float, help="AdamW learning rate (default: 3e-4, tiny model 1e-2)")
    parser.add_argument("--output", type=Path, default=Path("outputs/quantized-8bit"))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # "inputs will be cast to float16": once per matmul
    lr = args.lr or (1e-2 if args.tiny else 3e-4)
    folder = save_tiny_model(args.output / "tiny-base") if args.tiny else default_model_path()
    facts = tiny_facts() if args.tiny else country_facts(["capital"])[: args.questions]
    tokenizer = AutoTokenizer.from_pretrained(folder)

    def load_8bit():
        quantization = BitsAndBytesConfig(load_in_8bit=True)
        return AutoModelForCausalLM.from_pretrained(folder, quantization_config=quantization, dtype=torch.float32)

    base = load_8bit().eval()
    known, unknown = split_by_correctness(predict(base, tokenizer, facts), facts)
    mastered, injection = known[: args.teach], unknown[: args.teach]
    print(f"The 8-bit model knows {len(known)} of {len(facts)} facts; teaching {len(injection)}.")

    model = get_peft_model(base, CPLConfig(target_modules="all-linear"))
    select_collaborative(model, make_batches(tokenizer, mastered, 8), make_batches(tokenizer, injection, 8))
    optimizer = make_optimizer(model, "adamw", lr)
    train(model, make_batches(tokenizer, injection, 4, seed=0), epochs=args.epochs, optimizer=optimizer)
    evaluated = mastered + injection
    unmerged = predict(model, tokenizer, evaluated)
    print(f"Adapter on the 8-bit base: {injection_outcome(unmerged, mastered, injection)}")
    model.save_pretrained(args.output / "adapter", save_embedding_layers=False)

    # Way 1: requantize. Stays 8-bit; updates smaller than half a quantization step vanish.
    requantized, report = merge_and_report(model)
    after_requantized = predict(requantized, tokenizer, evaluated)
    print(f"Merged into int8: {report.retained:.1%} of the delta retained, {report.vanished_fraction:.1%} of the "
          f"support coordinates did not move; {injection_outcome(after_requantized, mastered, injection)}")

    # Way 2: lossless. A float model holding dequantized(W) + delta, e.g. to save and quantize again elsewhere.
    floated = merge_into_float(PeftModel.from_pretrained(load_8bit().eval(), args.output / "adapter"))
    after_float = predict(floated, tokenizer, evaluated)
    agree = sum(after_float[item["id"]] == unmerged[item["id"]] for item in evaluated)
    print(f"Merged into float32: {injection_outcome(after_float, mastered, injection)}; "
          f"{agree}/{len(evaluated)} answers as with the unmerged adapter.")
    return {"report": report, "unmerged": unmerged, "requantized": after_requantized, "float": after_float,
            "float_model": floated}


if __name__ == "__main__":
    main()
