"""Knowledge-injection benchmark: how much does each method learn, and what does it forget, at matched learning?

Protocol (docs METHOD.md): ask the base model every question; mastered M = answered correctly, injection I = answered
wrongly. M is split 50/50: the reference half (M-ref) is all that any method may use (g_M, selection, guard, A-GEM,
replay); the held-out half (M-held) is only measured. I is split into the items trained on and held-out injection
items that are never trained on (their accuracy tells whether training spills over). Each method starts from the
same base weights and trains on the same batches in the same order; after every epoch we count learned (trained I now
correct), forgotten in-set (M-ref now wrong), forgotten out-of-set (M-held now wrong) and held-out I now correct.

Methods are compared at matched learning, never at one shared learning rate: every method gets a small learning-rate
sweep (its own centre times --lr-factors) on the same budget; each (lr, epoch) is a point on its learned-vs-forgotten
curve. The report gives, per method, the best point under a forgetting budget (forgotten in-set + out-of-set <=
budget * |M|), the unconstrained best, and the least forgetting at matched learning levels. Picking the epoch and the
lr on the evaluation counts is an oracle choice, the same for every method (there is no separate validation split).

Tasks: "facts" (primary): free-form country facts from `peft_cpl.toolkit.data.country_facts` (SmolLM2 knows ~99 of 249
capitals); "mcq": the paper's multiple-choice banks (--mcq-dir). SmolLM2-135M answers "A" to most MC questions, so its
"mastered" MC set is mostly answer-letter bias: the report shows the share of mastered items whose gold letter is A
and how many survive the debiased split (right under all four option rotations); --mcq-split debiased trains on that.

Collision (N-LoRA's metric) is measured in a continual-learning variant: the trained injection items are split into
two tasks learned one after the other (task 1 merged, then a fresh adapter for task 2, with task 1's items added to
the reference set), and the collision rate is the fraction of linear-weight positions where both tasks' updates are
"non-zero": |dW| > tau * RMS(W) of that weight, for each tau in --collision-taus (tau = 0: exactly non-zero, exact
for sparse supports). Every main run also reports how much of its update (share of sum dW^2 over the linear weights)
lies outside the collaborative set {g_M * g_I >= 0} of the base weights, i.e. on coordinates where it raises L_M to
first order.

Sizes (FULL in settings.py) are set so the default run takes about 90 minutes on 2 CPU cores; --plan-only prints the
plan and the estimate from measured per-token costs without training anything.

    python benchmarks/knowledge_injection                 # full run: both tasks, ~85-90 min on 2 CPU cores
    python benchmarks/knowledge_injection --plan-only     # print sizes, sweeps and the time estimate
    python benchmarks/knowledge_injection --quick         # tiny random model, synthetic data, < 1 min
    python benchmarks/knowledge_injection --task facts --methods cpl full-sgd --lr-factors 1 --epochs 2   # a pilot

(`python -m benchmarks.knowledge_injection ...` from the repository root works too.)
"""
