"""Speed and memory of CPL training and inference on SmolLM2-135M, against full fine-tuning, LoRA and SHiRA.

Every method runs in its own subprocess (a clean peak-RSS reading each) on the same batches; the parent prints one
table with ratios against full fine-tuning (AdamW, fp32) measured in this same run. Peak RSS is given for the whole
process and for training alone (the kernel's peak counter is reset once the model is loaded: loading an 8-bit base
reads the float checkpoint first, which says nothing about training). On CUDA the allocator peak
(torch.cuda.max_memory_allocated) is recorded in the JSON too. `--live-peak` adds the peak of live tensors over one
more step (`peft_cpl.toolkit.memory.measure_step_peak`: on the CPU, where peak RSS also counts what glibc's heap keeps
after a free, from torch's profiler), next to `estimate_memory`'s predicted peak for the CPL rows.

    python benchmarks/perf.py                       # all methods, CPU; writes benchmarks/results/perf.{md,json}
    python benchmarks/perf.py --methods full cpl-e0.3 lora-r16 --steps 5

CPL supports here are random at the given density: step time and memory depend on the support's size and
granularity, not on which coordinates it holds. The cost of collaborative selection itself is measured by the
`select` method, against one forward+backward pass per example.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.benchmark import Measurement, Timer

METHODS = {
    "full": {"kind": "full"},
    "lora-r16": {"kind": "lora", "r": 16},
    "shira-r35": {"kind": "shira", "r": 35},  # ~ as many trainable values as CPL at density 0.1
    "shira-r104": {"kind": "shira", "r": 104},  # ~ as many as CPL at density 0.3
    **{f"cpl-e{d}": {"kind": "cpl", "density": d, "granularity": "element"} for d in (0.01, 0.1, 0.3, 0.5)},
    **{f"cpl-r{d}": {"kind": "cpl", "density": d, "granularity": "row"} for d in (0.01, 0.1, 0.3, 0.5)},
    **{f"cpl-{g[0]}{d}+guard": {"kind": "cpl", "density": d, "granularity": g, "guard": True}
       for d in (0.05, 0.3, 0.6) for g in ("element", "row")},
    "cpl-e0.6": {"kind": "cpl", "density": 0.6, "granularity": "element"},  # the paper's density
    "cpl-e0.6-int32": {"kind": "cpl", "density": 0.6, "granularity": "element", "index_storage": "int32"},
    "cpl-e0.6-fused": {"kind": "cpl", "density": 0.6, "granularity": "element", "fused": True},
    "cpl-e0.6-fused-adam8": {
        "kind": "cpl", "density": 0.6, "granularity": "element", "fused": True, "optimizer": "adamw8bit",
    },
    "cpl-e0.3-8bit": {"kind": "cpl", "density": 0.3, "granularity": "element", "bits": 8},
    "cpl-e0.3-8bit-adam8": {
        "kind": "cpl", "density": 0.3, "granularity": "element", "bits": 8, "optimizer": "adamw8bit",
    },
    "cpl-r0.3-8bit": {"kind": "cpl", "density": 0.3, "granularity": "row", "bits": 8},
    "lora-r16-8bit": {"kind": "lora", "r": 16, "bits": 8},
    "cpl-e0.3-4bit": {"kind": "cpl", "density": 0.3, "granularity": "element", "bits": 4},
    "lora-r16-4bit": {"kind": "lora", "r": 16, "bits": 4},
    "cpl-r0.6": {"kind": "cpl", "density": 0.6, "granularity": "row"},
    "cpl-e0.05": {"kind": "cpl", "density": 0.05, "granularity": "element"},
    "cpl-r0.05": {"kind": "cpl", "density": 0.05, "granularity": "row"},
    "cpl-e0.3+guard-fused": {"kind": "cpl", "density": 0.3, "granularity": "element", "guard": True, "fused": True},
    "select": {"kind": "select"},
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--steps", type=int, default=6,
                        help="timed training steps per method (after 2 warm-up; torch's Timer adds 2 before each)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="dtype of a float base (quantized bases compute in it too)")
    parser.add_argument("--config", type=Path,
                        help="a model config.json: random weights of that shape instead of SmolLM2 (exact for time "
                        "and memory; quantized methods need SmolLM2)")
    parser.add_argument("--live-peak", action="store_true",
                        help="also profile one step for the peak of live tensors (CPU: slower, one extra step)")
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/perf"))
    parser.add_argument("--worker", choices=list(METHODS), help=argparse.SUPPRESS)
    return parser.parse_args()


# ---------------------------------------------------------------------------------------------------- worker ------
def median_seconds(fn: Callable[[], object], calls: int) -> float:
    """Median seconds of `calls` timed calls; torch's Timer runs 2 warm-up calls before each and syncs the device."""
    timer = Timer("fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())  # Timer's default: 1 thread
    return Measurement.merge([timer.timeit(1) for _ in range(calls)])[0].median


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def reset_training_peak() -> bool:
    """Restart the kernel's peak-RSS counter (VmHWM), so that the training peak excludes model loading (which for an
    8-bit base reads the float checkpoint first). Linux only."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def training_peak_mb() -> float | None:
    with contextlib.suppress(OSError, StopIteration):
        line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM:"))
        return int(line.split()[1]) / 1024
    return None


def worker(name: str, args: argparse.Namespace) -> dict:
    from peft import LoraConfig, ShiraConfig, get_peft_model

    import peft_cpl
    from peft_cpl.toolkit.default_model import load_default_model
    from peft_cpl.toolkit.loop import make_optimizer
    from peft_cpl.toolkit.memory import estimate_memory, live_tensor_bytes, measure_step_peak, measure_train_state
    from peft_cpl.tuner.losses import summed_example_loss

    spec = METHODS[name]
    torch.manual_seed(0)
    rss_start = peak_rss_mb()
    dtype = getattr(torch, args.dtype)
    if args.config is not None:
        from transformers import AutoConfig, AutoModelForCausalLM

        if spec.get("bits"):
            raise SystemExit(f"{name}: quantized methods load SmolLM2; drop --config for them")
        with torch.device(args.device):
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(args.config), dtype=dtype)
    else:
        model, _ = load_default_model(dtype=dtype, load_in_8bit=spec.get("bits") == 8,
                                      load_in_4bit=spec.get("bits") == 4)
    if not spec.get("bits"):
        model.to(args.device)
    rss_loaded = peak_rss_mb()
    vocab = model.config.vocab_size
    batches = [
        {"input_ids": ids, "labels": ids}
        for ids in torch.randint(0, vocab, (4, args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    ]
    batches = [{k: v.to(args.device) for k, v in b.items()} for b in batches]
    result: dict = {"method": name, **spec, "rss_start_mb": rss_start, "rss_loaded_mb": rss_loaded}

    if spec["kind"] == "select":
        peft_model = get_peft_model(model, peft_cpl.CPLConfig())
        examples = len(batches) * args.batch
        peft_cpl.select_collaborative(peft_model, batches[:1], batches[1:2], progress=False)  # warm-up
        # Two sizes: the difference is the cost per example; the rest is the one-off cost of building the supports.
        start = time.perf_counter()
        peft_cpl.select_collaborative(peft_model, batches[:1], batches[1:2], progress=False)
        small = time.perf_counter() - start
        start = time.perf_counter()
        peft_cpl.select_collaborative(peft_model, batches[:2], batches[2:], progress=False)
        result["select_s"] = time.perf_counter() - start
        result["select_marginal_per_example_s"] = (result["select_s"] - small) / (examples / 2)
        result["select_fixed_s"] = small - result["select_marginal_per_example_s"] * examples / 2
        full = peft_model.unload()
        for param in full.parameters():
            param.requires_grad_(True)

        def fwd_bwd(batch=batches[0]):
            loss, _ = summed_example_loss(full, batch)
            loss.backward()
            full.zero_grad(set_to_none=True)

        result["fwd_bwd_per_example_s"] = median_seconds(fwd_bwd, 3) / args.batch
        result["select_per_example_s"] = result["select_s"] / examples
        result["peak_rss_mb"] = peak_rss_mb()
        return result

    if spec["kind"] == "full":
        peft_model = model
        for param in model.parameters():
            param.requires_grad_(True)
    elif spec["kind"] == "lora":
        lora = LoraConfig(r=spec["r"], lora_alpha=2 * spec["r"], target_modules="all-linear")
        peft_model = get_peft_model(model, lora)
    elif spec["kind"] == "shira":
        peft_model = get_peft_model(model, ShiraConfig(r=spec["r"], target_modules="all-linear"))
    else:
        config = peft_cpl.CPLConfig(support="random", density=spec["density"], granularity=spec["granularity"],
                                    index_storage=spec.get("index_storage", "compact"))
        peft_model = get_peft_model(model, config)
    targeted = estimate_memory(model.config).targeted  # what "all-linear" targets, by PEFT's own rule
    result["trainable"] = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    result["targeted_params"] = targeted
    guard = None
    if spec.get("guard"):
        for layer in peft_cpl.cpl_layers(peft_model).values():  # timing needs signs, not the true sign(g_M)
            layer.set_mastered_sign("default", torch.randn(layer.cpl_values["default"].numel()))
        guard = peft_cpl.CollaborativeGuard(peft_model)
    fused = spec.get("fused", False)
    optimizer = make_optimizer(peft_model, spec.get("optimizer", "adamw"), lr=1e-5, fused=fused,
                               guard=guard if fused else None)
    if guard is not None and not fused:
        guard.attach(optimizer)
    peft_model.train()
    step_index = [0]

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = peft_model(**batches[step_index[0] % len(batches)]).loss
        loss.backward()
        optimizer.step()
        step_index[0] += 1

    gc.collect()
    result["training_peak_reset"] = reset_training_peak()
    for _ in range(2):  # warm-up: the optimizer's state exists before the CUDA peak is reset
        step()
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    result["step_s"] = median_seconds(step, args.steps)
    result["peak_rss_mb"] = peak_rss_mb()
    result["training_peak_rss_mb"] = training_peak_mb() if result["training_peak_reset"] else None
    if args.device == "cuda":
        result["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    result["state_bytes"] = measure_train_state(peft_model, optimizer)
    if args.live_peak:
        optimizer.zero_grad(set_to_none=True)
        result["live_before_mb"] = live_tensor_bytes() / 2**20
        result["live_peak_mb"] = measure_step_peak(step, args.device) / 2**20
        if spec["kind"] == "cpl":
            base = {8: "int8", 4: "nf4"}.get(spec.get("bits"), "fp32" if dtype == torch.float32 else "bf16")
            estimate = estimate_memory(peft_model, base=base,
                                       optimizer=spec.get("optimizer", "adamw"), fused=fused, guard=guard is not None,
                                       batch_size=args.batch, seq_len=args.seq)
            result["estimate_peak_mb"] = estimate.peak / 2**20

    peft_model.eval()
    eval_batch = batches[0]["input_ids"]

    def infer(m=peft_model):
        with torch.no_grad():
            m(input_ids=eval_batch)

    if spec["kind"] != "full":
        with tempfile.TemporaryDirectory() as folder:
            peft_model.save_pretrained(folder, save_embedding_layers=False)
            result["file_bytes"] = sum(f.stat().st_size for f in Path(folder).glob("adapter_model.*"))
        result["unmerged_infer_s"] = median_seconds(infer, 3)
        start = time.perf_counter()
        merged = peft_model.merge_and_unload() if not spec.get("bits") else None
        result["merge_s"] = time.perf_counter() - start if merged is not None else None
        if merged is not None:
            result["merged_infer_s"] = median_seconds(lambda: infer(merged), 3)
    return result


# ---------------------------------------------------------------------------------------------------- parent ------
def fmt(value, spec: str = ".2f", none: str = "-") -> str:
    return none if value is None else format(value, spec)


def report(results: list[dict], args: argparse.Namespace, command: str) -> str:
    by = {r["method"]: r for r in results}
    full = by.get("full")
    lines = [
        "| method | trainable | step s | x full | x LoRA (same base) | peak RSS MB | training peak RSS MB | "
        "saved B/targeted param vs full | train-state MB | adapter file MB | merge s | unmerged/merged latency |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        if "step_s" not in r:
            continue
        lora = by.get(f"lora-r16-{r['bits']}bit" if r.get("bits") else "lora-r16")  # LoRA on the same base
        saved = None
        if full and r is not full:
            key = "training_peak_rss_mb" if full.get("training_peak_rss_mb") and r.get("training_peak_rss_mb") else (
                "peak_rss_mb")
            saved = (full[key] - r[key]) * 2**20 / r["targeted_params"]
        latency = r.get("unmerged_infer_s") / r["merged_infer_s"] if r.get("merged_infer_s") else None
        lines.append(
            f"| {r['method']} | {r['trainable']:,} | {r['step_s']:.2f} | {fmt(full and r['step_s'] / full['step_s'])} "
            f"| {fmt(lora and r['step_s'] / lora['step_s'])} | {r['peak_rss_mb']:.0f} | "
            f"{fmt(r.get('training_peak_rss_mb'), '.0f')} | {fmt(saved, '.1f')} | "
            f"{sum(r['state_bytes'].values()) / 2**20:.0f} | {fmt(r.get('file_bytes') and r['file_bytes'] / 2**20)} | "
            f"{fmt(r.get('merge_s'))} | {fmt(latency)} |"
        )
    live = [r for r in results if r.get("live_peak_mb")]
    if live:
        lines += ["", "Peak of live tensors over one step (`--live-peak`; torch's profiler; allocations outside torch "
                  "not seen), against `estimate_memory`'s predicted peak:", "",
                  "| method | live before step MB | live peak MB | saved B/targeted param vs full | "
                  "estimated peak MB | estimate / live |", "|---|---:|---:|---:|---:|---:|"]
        for r in live:
            saved = full and r is not full and full.get("live_peak_mb") and (
                (full["live_peak_mb"] - r["live_peak_mb"]) * 2**20 / r["targeted_params"])
            ratio = r.get("estimate_peak_mb") and r["estimate_peak_mb"] / r["live_peak_mb"]
            lines.append(f"| {r['method']} | {r['live_before_mb']:.0f} | {r['live_peak_mb']:.0f} | "
                         f"{fmt(saved or None, '.1f')} | "
                         f"{fmt(r.get('estimate_peak_mb'), '.0f')} | {fmt(ratio)} |")
    notes = []
    if full:
        eight = by.get("cpl-e0.3-8bit")
        if eight:
            net = (eight["peak_rss_mb"] - eight["rss_start_mb"]) / (full["peak_rss_mb"] - full["rss_start_mb"])
            notes.append(
                f"- CPL (density 0.3) on an 8-bit base peaks at {eight['peak_rss_mb']:.0f} MB RSS = "
                f"{eight['peak_rss_mb'] / full['peak_rss_mb']:.0%} of full fine-tuning's {full['peak_rss_mb']:.0f} MB "
                f"(net of the {full['rss_start_mb']:.0f} MB interpreter baseline: {net:.0%})."
            )
            if eight.get("training_peak_rss_mb") and full.get("training_peak_rss_mb"):
                notes.append(
                    f"- During training only (peak counter reset after loading): {eight['training_peak_rss_mb']:.0f} "
                    f"MB vs {full['training_peak_rss_mb']:.0f} MB = "
                    f"{eight['training_peak_rss_mb'] / full['training_peak_rss_mb']:.0%} of full fine-tuning."
                )
    if "select" in by:
        s = by["select"]
        notes.append(
            f"- Selection: {s['select_per_example_s']:.3f} s per example of M and I, against "
            f"{s['fwd_bwd_per_example_s']:.3f} s for one forward+backward pass of the full model per example "
            f"(ratio {s['select_per_example_s'] / s['fwd_bwd_per_example_s']:.2f}); per additional example "
            f"{s['select_marginal_per_example_s']:.3f} s (ratio "
            f"{s['select_marginal_per_example_s'] / s['fwd_bwd_per_example_s']:.2f}) plus a one-off "
            f"{s['select_fixed_s']:.1f} s to build the supports."
        )
    machine = (f"{platform.machine()}, {os.cpu_count()} CPU threads ({torch.get_num_threads()} used by torch), "
               f"torch {torch.__version__}, device {args.device}")
    if args.device == "cuda":
        machine += f" ({torch.cuda.get_device_name()})"
    header = [
        f"Command: `{command}`",
        f"Machine: {machine}; {args.config or 'SmolLM2-135M'} in {args.dtype}; batch {args.batch} x {args.seq} "
        f"tokens; median of {args.steps} steps after 2 warm-up "
        "(torch.utils.benchmark.Timer, 2 more before each).",
        "",
    ]
    return "\n".join(header + lines + [""] + notes) + "\n"


def main() -> None:
    args = parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(args.worker, args)))
        return
    from peft_cpl.tuner import atomic  # here, not at the top: a worker's baseline RSS is read before peft_cpl loads

    results = []
    for name in args.methods:
        print(f"[perf] {name} ...", flush=True)
        command = [sys.executable, __file__, "--worker", name, "--steps", str(args.steps), "--batch", str(args.batch),
                   "--seq", str(args.seq), "--device", args.device, "--dtype", args.dtype]
        if args.config is not None:
            command += ["--config", str(args.config)]
        if args.live_peak:
            command.append("--live-peak")
        done = subprocess.run(command, capture_output=True, text=True)
        lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        if done.returncode or not lines:
            print(done.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"method {name} failed")
        results.append(json.loads(lines[-1].removeprefix("RESULT ")))
        print(f"       {json.dumps({k: v for k, v in results[-1].items() if k.endswith('_s')})}", flush=True)
        # after every method, so that a run stopped by a time limit (a lent GPU's minutes) keeps what it measured
        atomic.write_text(args.output.with_suffix(".json"), json.dumps(results, indent=1))
    command = "python benchmarks/perf.py " + " ".join(sys.argv[1:])
    text = report(results, args, command.strip())
    atomic.write_text(args.output.with_suffix(".md"), text)
    print(text)


if __name__ == "__main__":
    main()
