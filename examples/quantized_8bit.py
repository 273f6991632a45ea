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

from _common import example_parser, known_and_unknown, model_and_facts  # examples/_common.py
from peft import PeftModel, get_peft_model

from peft_cpl import CPLConfig, select_collaborative
from peft_cpl.toolkit.batches import make_batches
from peft_cpl.toolkit.evaluation import injection_outcome, predict
from peft_cpl.toolkit.loop import make_optimizer, train
from peft_cpl.toolkit.models import load_model
from peft_cpl.tuner.merge import merge_and_report, merge_into_float


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = example_parser(__doc__, questions=80, teach=8, output="outputs/quantized-8bit")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # "inputs will be cast to float16": once per matmul
    folder, facts, lr = model_and_facts(args)
    base, tokenizer = load_model(folder, quantize="8bit")
    mastered, injection = known_and_unknown(base, tokenizer, facts, args.teach)

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
    fresh, _ = load_model(folder, quantize="8bit")
    floated = merge_into_float(PeftModel.from_pretrained(fresh, args.output / "adapter"))
    after_float = predict(floated, tokenizer, evaluated)
    agree = sum(after_float[item["id"]] == unmerged[item["id"]] for item in evaluated)
    print(f"Merged into float32: {injection_outcome(after_float, mastered, injection)}; "
          f"{agree}/{len(evaluated)} answers as with the unmerged adapter.")
    return {"report": report, "unmerged": unmerged, "requantized": after_requantized, "float": after_float,
            "float_model": floated}


if __name__ == "__main__":
    main()
