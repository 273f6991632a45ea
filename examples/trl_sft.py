"""Knowledge injection with TRL's `SFTTrainer` and `peft_config=CPLConfig(...)`.

    python examples/trl_sft.py           SmolLM2-135M-Instruct and country capitals
    python examples/trl_sft.py --tiny    a tiny Llama and made-up facts (seconds)

SFTTrainer wraps the model with `get_peft_model` itself. A collaborative CPL adapter starts with an empty support, so
select it on `trainer.model` after building the trainer and before `trainer.train()` (the optimizer is created in
`train()`, from the parameters selection made). The data is a conversational prompt/completion dataset: TRL applies
the chat template and puts the loss on the completion only.
"""

from __future__ import annotations

import argparse

from _common import example_parser, known_and_unknown, model_and_facts  # examples/_common.py
from datasets import Dataset
from trl import SFTConfig, SFTTrainer

from peft_cpl import CPLConfig, select_collaborative
from peft_cpl.toolkit.batches import make_batches
from peft_cpl.toolkit.evaluation import injection_outcome, predict
from peft_cpl.toolkit.models import load_model


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = example_parser(__doc__, questions=120, teach=16, output="outputs/trl-sft")
    return parser.parse_args(argv)


def as_chat(item: dict) -> dict:
    """A fact as TRL's conversational prompt/completion record; the reply is the response prefix + the answer."""
    reply = " ".join(part for part in (item.get("response_prefix"), item["answer"]) if part)
    return {
        "prompt": [{"role": "user", "content": item["question"]}],
        "completion": [{"role": "assistant", "content": reply}],
    }


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    folder, facts, lr = model_and_facts(args)
    base, tokenizer = load_model(folder)

    mastered, injection = known_and_unknown(base, tokenizer, facts, args.teach)

    trainer = SFTTrainer(
        model=base,
        args=SFTConfig(
            output_dir=str(args.output), num_train_epochs=args.epochs, per_device_train_batch_size=4,
            learning_rate=lr, lr_scheduler_type="constant", bf16=False,  # fp32: small sparse updates stay exact
            save_strategy="no", logging_steps=1, report_to="none",
        ),
        train_dataset=Dataset.from_list([as_chat(item) for item in injection]),
        processing_class=tokenizer,
        peft_config=CPLConfig(target_modules="all-linear"),
    )
    report = select_collaborative(
        trainer.model, make_batches(tokenizer, mastered, 8), make_batches(tokenizer, injection, 8)
    )
    print(f"Selection: {report.sentence()}.")
    trainer.train()

    after = predict(trainer.model, tokenizer, mastered + injection)
    outcome = injection_outcome(after, mastered, injection)
    print(outcome)
    trainer.model.save_pretrained(args.output / "adapter", save_embedding_layers=False)
    print(f"Adapter saved to {args.output / 'adapter'}/")
    return {"outcome": outcome, "model": trainer.model, "steps": trainer.state.global_step}


if __name__ == "__main__":
    main()
