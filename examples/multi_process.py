"""CPL in more than one process: selection, then training with the guard, through accelerate (DDP).

    accelerate launch --multi_gpu --num_processes 2 examples/multi_process.py --tiny   two processes, seconds
    accelerate launch --multi_gpu --num_processes 2 examples/multi_process.py          SmolLM2-135M-Instruct

On a machine without GPUs the same command starts two CPU processes (gloo): accelerate starts them with torchrun and
this file asks for the CPU. (`accelerate launch --cpu --num_processes 2` starts only one process: accelerate#2741.)

Every process runs this file. Each selects on its share of the facts: `select_collaborative` sums the gradients and
example counts over the processes before choosing, so every process holds the same support (it checks, and fails
naming the processes that disagree). Then the same adapter is trained twice from that support: in a plain loop that
accelerate wraps in DDP, and with the HF Trainer; the guard's sign(g_M) refresh is summed over the processes too.
The main process evaluates and writes the adapters.
"""

from __future__ import annotations

import argparse

import torch
from _common import example_parser, known_and_unknown, model_and_facts  # examples/_common.py
from accelerate import Accelerator
from peft import get_peft_model
from torch.utils.data import DataLoader
from transformers import Trainer, TrainingArguments

from peft_cpl import CollaborativeGuard, CollaborativeGuardCallback, CPLConfig, select_collaborative
from peft_cpl.toolkit.batches import collate, encode, make_batches, pad_token_id
from peft_cpl.toolkit.evaluation import injection_outcome, predict
from peft_cpl.toolkit.models import load_model
from peft_cpl.tuner.adapters import export_support, restore_support


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = example_parser(__doc__, questions=120, teach=16, output="outputs/multi_process")
    parser.add_argument("--batch-size", type=int, default=2, help="examples per process and step")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())  # joins the launcher's processes (gloo on CPUs)
    with accelerator.main_process_first():  # the main process writes the tiny model, the others then read it
        folder, facts, lr = model_and_facts(args, write=accelerator.is_main_process)
    base, tokenizer = load_model(folder)
    mastered, injection = known_and_unknown(base, tokenizer, facts, args.teach)  # the same on every process

    # 1. Selection: each process reads its share; the sums are reduced, so every process gets the same support.
    model = get_peft_model(base, CPLConfig(target_modules="all-linear"))
    with (accelerator.split_between_processes(mastered) as my_mastered,
          accelerator.split_between_processes(injection) as my_injection):
        mastered_batches = make_batches(tokenizer, my_mastered, 4)
        report = select_collaborative(model, mastered_batches, make_batches(tokenizer, my_injection, 4),
                                      progress=False)
    accelerator.print(f"{report.sentence()} (the same support on all {accelerator.num_processes} processes)")
    support = export_support(model)

    # 2. A plain loop: accelerate shards the data and wraps the model in DDP; the guard hooks the optimizer's steps.
    guard = CollaborativeGuard(model, mastered=mastered_batches, refresh="epoch")
    pad_id = pad_token_id(tokenizer)
    loader = DataLoader([encode(tokenizer, item) for item in injection], batch_size=args.batch_size, shuffle=True,
                        collate_fn=lambda examples: collate(examples, pad_id))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    ddp_model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    with guard.attach(optimizer):
        for _ in range(args.epochs):
            ddp_model.train()
            guard.on_epoch_start()
            for batch in loader:
                accelerator.backward(ddp_model(**batch).loss)
                optimizer.step()
                optimizer.zero_grad()
    model.eval()
    results = {"loop": report_and_save(accelerator, model, tokenizer, mastered, injection, guard, args, "loop")}

    # 3. The HF Trainer from the same support: it wraps the model in DDP and shards the data itself.
    model = get_peft_model(load_model(folder)[0], CPLConfig(target_modules="all-linear"))
    restore_support(model, support)
    guard = CollaborativeGuard(model, mastered=mastered_batches, refresh="epoch")
    trainer = Trainer(
        model=model,
        args=TrainingArguments(
            output_dir=str(args.output / "trainer"), num_train_epochs=args.epochs,
            per_device_train_batch_size=args.batch_size, learning_rate=lr, lr_scheduler_type="constant",
            save_strategy="no", report_to="none", ddp_find_unused_parameters=False,
            use_cpu=not torch.cuda.is_available(),  # else the Trainer resets accelerate's state to one process
        ),
        train_dataset=[encode(tokenizer, item) for item in injection],
        data_collator=lambda examples: collate(examples, pad_id),
        callbacks=[CollaborativeGuardCallback(guard)],
    )
    trainer.train()
    model.eval()
    results["trainer"] = report_and_save(accelerator, model, tokenizer, mastered, injection, guard, args, "trainer")
    return results


def report_and_save(accelerator, model, tokenizer, mastered, injection, guard, args, name: str):
    """On the main process: what was learned and kept, and the adapter written to OUTPUT/adapter-NAME."""
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return None
    outcome = injection_outcome(predict(model, tokenizer, mastered + injection), mastered, injection)
    print(f"{name}: {outcome}; the guard reverted {guard.revert_fraction:.1%} of {guard.proposed:,} updates")
    model.save_pretrained(args.output / f"adapter-{name}", save_embedding_layers=False)
    print(f"{name}: adapter saved to {args.output / f'adapter-{name}'}/")
    return outcome


if __name__ == "__main__":
    main()
