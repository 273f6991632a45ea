"""Quickstart: teach a model facts it does not know with a CPL adapter, then save, reload and merge it.

    python examples/quickstart.py           SmolLM2-135M-Instruct and country capitals (a few minutes on 2 CPU cores)
    python examples/quickstart.py --tiny    a tiny Llama and made-up facts (seconds)

Steps: ask the model every question; split into known (mastered) and unknown (injection) facts; wrap the model with a
CPL adapter and select its support from the gradients of both sets; train it on the unknown facts; count learned and
forgotten; save the adapter, reload it into a fresh base and check the outputs; merge it into the base weights.
"""

from __future__ import annotations

import argparse

import torch
from _common import example_parser, known_and_unknown, model_and_facts  # examples/_common.py
from peft import PeftModel, get_peft_model

from peft_cpl import CPLConfig, select_collaborative
from peft_cpl.toolkit.batches import make_batches
from peft_cpl.toolkit.evaluation import injection_outcome, predict
from peft_cpl.toolkit.loop import make_optimizer, train
from peft_cpl.toolkit.models import load_model


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = example_parser(__doc__, questions=80, teach=8, output="outputs/quickstart")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    folder, facts, lr = model_and_facts(args)
    base, tokenizer = load_model(folder)

    # 1. What does the model know?
    mastered, injection = known_and_unknown(base, tokenizer, facts, args.teach)

    # 2. A CPL adapter on every linear layer; its support is the coordinates where g_M * g_I >= 0.
    model = get_peft_model(base, CPLConfig(target_modules="all-linear"))
    report = select_collaborative(model, make_batches(tokenizer, mastered, 8), make_batches(tokenizer, injection, 8))
    print(f"Selection: {report.sentence()}.")
    model.print_trainable_parameters()

    # 3. Train the sparse delta on the unknown facts (the loss is on the answer tokens only).
    optimizer = make_optimizer(model, "adamw", lr)
    losses = train(model, make_batches(tokenizer, injection, 4, seed=0), epochs=args.epochs, optimizer=optimizer)
    after = predict(model, tokenizer, mastered + injection)
    outcome = injection_outcome(after, mastered, injection)
    print(f"Loss per epoch: {', '.join(f'{loss:.3f}' for loss in losses)}; {outcome}")

    # 4. Save (values + compact support indices), reload into a fresh base, merge into the weights.
    model.save_pretrained(args.output / "adapter", save_embedding_layers=False)
    fresh, _ = load_model(folder)
    reloaded = PeftModel.from_pretrained(fresh, args.output / "adapter")
    ids = torch.tensor([make_batches(tokenizer, injection[:1], 1)[0]["input_ids"][0].tolist()])
    with torch.no_grad():
        trained_logits = model(input_ids=ids).logits
        reloaded_logits = reloaded(input_ids=ids).logits
        merged = reloaded.merge_and_unload()
        merged_logits = merged(input_ids=ids).logits
    print(f"Reloaded adapter reproduces the outputs exactly: {torch.equal(reloaded_logits, trained_logits)}; merged "
          f"model differs by at most {(merged_logits - trained_logits).abs().max():.2e} (float rounding).")
    print(f"Adapter saved to {args.output / 'adapter'}/ (merge and save a full model with `peft-cpl merge`).")
    return {
        "outcome": outcome, "losses": losses, "reloaded_equal": torch.equal(reloaded_logits, trained_logits),
        "merged_max_diff": float((merged_logits - trained_logits).abs().max()), "support": report.summary()["support"],
    }


if __name__ == "__main__":
    main()
