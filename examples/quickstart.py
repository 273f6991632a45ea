"""Quickstart: teach a model facts it does not know with a CPL adapter, then save, reload and merge it.

    python examples/quickstart.py           SmolLM2-135M-Instruct and country capitals (a few minutes on 2 CPU cores)
    python examples/quickstart.py --tiny    a tiny Llama and made-up facts (seconds)

Steps: ask the model every question; split into known (mastered) and unknown (injection) facts; wrap the model with a
CPL adapter and select its support from the gradients of both sets; train it on the unknown facts; count learned and
forgotten; save the adapter, reload it into a fresh base and check the outputs; merge it into the base weights.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from _tiny import save_tiny_model, tiny_facts  # examples/_tiny.py, for --tiny
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from peft_cpl import CPLConfig, select_collaborative
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
    parser.add_argument("--output", type=Path, default=Path("outputs/quickstart"))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    lr = args.lr or (1e-2 if args.tiny else 3e-4)
    folder = save_tiny_model(args.output / "tiny-base") if args.tiny else default_model_path()
    facts = tiny_facts() if args.tiny else country_facts(["capital"])[: args.questions]
    tokenizer = AutoTokenizer.from_pretrained(folder)
    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()

    # 1. What does the model know?
    known, unknown = split_by_correctness(predict(base, tokenizer, facts), facts)
    mastered, injection = known[: args.teach], unknown[: args.teach]
    print(f"The model knows {len(known)} of {len(facts)} facts; teaching {len(injection)}, keeping {len(mastered)}.")

    # 2. A CPL adapter on every linear layer; its support is the coordinates where g_M * g_I >= 0.
    model = get_peft_model(base, CPLConfig(target_modules="all-linear"))
    report = select_collaborative(model, make_batches(tokenizer, mastered, 8), make_batches(tokenizer, injection, 8))
    summary = report.summary()
    print(f"Support: {summary['support']:,} of {summary['numel']:,} coordinates ({summary['support_fraction']:.1%}).")
    model.print_trainable_parameters()

    # 3. Train the sparse delta on the unknown facts (the loss is on the answer tokens only).
    optimizer = make_optimizer(model, "adamw", lr)
    losses = train(model, make_batches(tokenizer, injection, 4, seed=0), epochs=args.epochs, optimizer=optimizer)
    after = predict(model, tokenizer, mastered + injection)
    outcome = injection_outcome(after, mastered, injection)
    print(f"Loss per epoch: {', '.join(f'{loss:.3f}' for loss in losses)}; {outcome}")

    # 4. Save (values + compact support indices), reload into a fresh base, merge into the weights.
    model.save_pretrained(args.output / "adapter", save_embedding_layers=False)
    fresh = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
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
        "merged_max_diff": float((merged_logits - trained_logits).abs().max()), "support": summary["support"],
    }


if __name__ == "__main__":
    main()
