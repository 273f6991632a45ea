"""Knowledge injection with the Hugging Face `Trainer`: a CPL adapter plus the paper's per-step guard as a callback.

    python examples/knowledge_injection_trainer.py            SmolLM2-135M-Instruct and country capitals
    python examples/knowledge_injection_trainer.py --tiny     a tiny Llama and made-up facts (seconds)
    python examples/knowledge_injection_trainer.py --resume   continue from the last checkpoint in --output

The Trainer does the loop, the optimizer and the checkpoints; `CollaborativeGuardCallback` reverts, after every
optimizer step, the coordinate updates that would raise the loss on the known facts to first order (sign(g_M) is
refreshed at each epoch), and stores its state in every checkpoint so that `--resume` continues exactly.
"""

from __future__ import annotations

import argparse

from _common import example_parser, known_and_unknown, model_and_facts  # examples/_common.py
from peft import get_peft_model
from transformers import Trainer, TrainingArguments

from peft_cpl import CollaborativeGuard, CollaborativeGuardCallback, CPLConfig, select_collaborative
from peft_cpl.toolkit.batches import collate, encode, make_batches, pad_token_id
from peft_cpl.toolkit.evaluation import injection_outcome, predict
from peft_cpl.toolkit.models import load_model


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = example_parser(__doc__, questions=120, teach=16, output="outputs/trainer")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --output")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    folder, facts, lr = model_and_facts(args)
    base, tokenizer = load_model(folder)

    mastered, injection = known_and_unknown(base, tokenizer, facts, args.teach)

    # Selection is deterministic, so a resumed run rebuilds the same support before the Trainer restores the values.
    model = get_peft_model(base, CPLConfig(target_modules="all-linear"))
    mastered_batches = make_batches(tokenizer, mastered, 8)
    select_collaborative(model, mastered_batches, make_batches(tokenizer, injection, 8))
    guard = CollaborativeGuard(model, mastered=mastered_batches, refresh="epoch")

    # Each example is the chat prompt + answer tokens; the collator pads and puts the labels on the answer only.
    pad_id = pad_token_id(tokenizer)
    trainer = Trainer(
        model=model,
        args=TrainingArguments(
            output_dir=str(args.output), num_train_epochs=args.epochs, per_device_train_batch_size=4,
            learning_rate=lr, lr_scheduler_type="constant", save_strategy="epoch", logging_steps=1, report_to="none",
        ),
        train_dataset=[encode(tokenizer, item) for item in injection],
        data_collator=lambda examples: collate(examples, pad_id),
        callbacks=[CollaborativeGuardCallback(guard)],
    )
    trainer.train(resume_from_checkpoint=True if args.resume else None)

    after = predict(model, tokenizer, mastered + injection)
    outcome = injection_outcome(after, mastered, injection)
    print(f"{outcome}; the guard reverted {guard.revert_fraction:.1%} of {guard.proposed:,} proposed updates.")
    model.save_pretrained(args.output / "adapter", save_embedding_layers=False)
    print(f"Adapter saved to {args.output / 'adapter'}/; checkpoints in {args.output}/checkpoint-*")
    return {"outcome": outcome, "guard": guard, "steps": trainer.state.global_step}


if __name__ == "__main__":
    main()
