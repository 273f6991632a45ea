"""Knowledge-injection benchmark: how much does each method learn, and what does it forget, at matched learning?

Protocol (docs METHOD.md): ask the base model every question; mastered M = answered correctly, injection I = answered
wrongly (the rule of `peft-cpl split`). M is split 50/50: the reference half (M-ref) is all that any method may use
(g_M, selection, guard, A-GEM, replay); the held-out half (M-held) is only measured. I is split into the items
trained on and held-out injection items that are never trained on. Each seed has its own split, data order and
initialisation; on one seed every method starts from the same base weights and trains on the same batches in the
same order. Every --eval-every steps the watch sets are counted: learned (trained I now correct), forgotten in-set
(M-ref now wrong), forgotten out-of-set (M-held now wrong), held-out I now correct. Each run is a curve.

Methods are compared at matched learning, never at one shared learning rate. Every method has a sweep of 4 learning
rates fixed in methods.py before any result was seen (--lr replaces one). The rule for the reported lr, the same for
all: per seed, among the runs that reach 90% of I learned, the one that forgets least out of set there; if none does,
the one that learned most. Each method is summarised by forgetting where learned first reaches 50%, 75% and 90% of I
(interpolated) and by the area under its forgotten-vs-learned curve, as a mean with a 95% bootstrap CI over seeds,
with the paired difference (same seed) to full fine-tuning, LoRA, replay and CPL where they ran.

Tasks: "facts" (default): free-form facts of several kinds (--kinds: countryinfo's relations, chemical elements, US
states, and fictional people made with faker that no model can know); "mcq" (opt-in): the paper's multiple-choice
banks (--mcq-dir). SmolLM2-135M answers "A" to most MC questions, so its "mastered" MC set is mostly answer-letter
bias: the report shows it, and --mcq-split debiased trains on the items right under all four option rotations.

Collision (N-LoRA's metric, --collision) is measured in a continual-learning variant: the trained injection items are
split into two tasks learned one after the other, and the collision rate is the fraction of linear-weight positions
where both tasks' updates are "non-zero" (|dW| > tau * RMS(W), for each tau in --collision-taus).

A full run (FULL in settings.py: 5 seeds, every default method) takes hours on 2 CPU cores, so it is run in parts
(--seeds, --methods, one --output-md each; --resume extends a part) that --render joins; the plan and its commands
are in benchmarks/RESULTS.md. A longer budget (--epochs) needs only the runs that did not reach 90% learned in the
shorter one: --render lets a shorter run that reached it stand in for the longer one (training does not depend on
the epochs still to come). --plan-only prints the plan and a time estimate without training anything.

    python benchmarks/knowledge_injection --plan-only                 # sizes, sweeps and the time estimate
    python benchmarks/knowledge_injection --quick                     # tiny random model, synthetic data, < 1 min
    python benchmarks/knowledge_injection --seeds 0 1 --methods full-adamw cpl-guard \
        --output-md benchmarks/results/ki/part_x.md                  # one part
    python benchmarks/knowledge_injection --render benchmarks/results/ki/part_*.json \
        --output-md benchmarks/results/ki/joined.md                  # join parts (no training)

(`python -m benchmarks.knowledge_injection ...` from the repository root works too.)
"""
