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
from pathlib import Path

import torch
from _tiny import save_tiny_model, tiny_facts  # examples/_tiny.py, for --tiny
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer

from peft_cpl import CPLConfig, select_collaborative
from peft_cpl.data import country_facts
from peft_cpl.default_model import default_model_path
from peft_cpl.evaluation import injection_outcome, make_batches, predict, split_by_correctness


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny in-process model instead of SmolLM2 (seconds)")
    parser.add_argument("--questions", type=int, default=120, help="country capitals to ask (real model)")
    parser.add_argument("--teach", type=int, default=16, help="unknown facts to teach; as many known ones are kept")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--lr", type=float, help="AdamW learning rate (default: 3e-4, tiny model 1e-2)")
    parser.add_argument("--output", type=Path, default=Path("outputs/trl-sft"))
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
    lr = args.lr or (1e-2 if args.tiny else 3e-4)
    folder = save_tiny_model(args.output / "tiny-base") if args.tiny else default_model_path()
    facts = tiny_facts() if args.tiny else country_facts(["capital"])[: args.questions]
    tokenizer = AutoTokenizer.from_pretrained(folder)
    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()

    known, unknown = split_by_correctness(predict(base, tokenizer, facts), facts)
    mastered, injection = known[: args.teach], unknown[: args.teach]
    print(f"The model knows {len(known)} of {len(facts)} facts; teaching {len(injection)}, keeping {len(mastered)}.")

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
    print(f"Support: {report.summary()['support']:,} coordinates ({report.summary()['support_fraction']:.1%}).")
    trainer.train()

    after = predict(trainer.model, tokenizer, mastered + injection)
    outcome = injection_outcome(after, mastered, injection)
    print(outcome)
    trainer.model.save_pretrained(args.output / "adapter", save_embedding_layers=False)
    print(f"Adapter saved to {args.output / 'adapter'}/")
    return {"outcome": outcome, "model": trainer.model, "steps": trainer.state.global_step}


if __name__ == "__main__":
    main()
