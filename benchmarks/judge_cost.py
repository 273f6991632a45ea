"""Cost of the generation judge (`predict(..., match="generate")`) against the teacher-forced prefix rule.

Times `peft_cpl.toolkit.evaluation.predict` under both rules on the same country-capital facts (which carry a
response_prefix, so the prefix rule applies to them) and prints seconds and known counts. On SmolLM2 by default;
`--tiny` runs it on the tiny in-process model in seconds (a check that the script works, not a measurement).

    python benchmarks/judge_cost.py [--items 48] [--batch-size 16] [--max-new-tokens 16] [--threads 2]
"""

from __future__ import annotations

import argparse
import time

import torch

from peft_cpl.toolkit.evaluation import predict


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.tiny:
        from peft_cpl.toolkit.tiny import item_texts, tiny_llama, tiny_tokenizer

        facts = [{"id": f"f{k}", "question": f"capital of land{k} ?", "answer": f"city{k}",
                  "response_prefix": f"land{k} has"} for k in range(args.items)]
        tokenizer = tiny_tokenizer(item_texts(facts))
        model = tiny_llama(vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id)
    else:
        from peft_cpl.toolkit.data import country_facts
        from peft_cpl.toolkit.models import load_model

        model, tokenizer = load_model("smollm2")
        facts = country_facts(["capital"])[: args.items]
    predict(model, tokenizer, facts[:4], match="prefix")  # warm-up
    seconds = {}
    for match in ("prefix", "generate"):
        start = time.perf_counter()
        correct = predict(model, tokenizer, facts, batch_size=args.batch_size, match=match,
                          max_new_tokens=args.max_new_tokens)
        seconds[match] = time.perf_counter() - start
        print(f"match={match}: {seconds[match]:.2f} s for {len(facts)} items, known {sum(correct.values())}")
    print(f"generate / prefix: {seconds['generate'] / seconds['prefix']:.2f}x")


if __name__ == "__main__":
    main()
