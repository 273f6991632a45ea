#!/usr/bin/env bash
# The prepared GPU check: `make gpu-check`, at most 8 minutes on one H100 / H200 that can fetch nothing (its four
# parts are capped at 110 + 170 + 120 + 60 s; never run on a GPU yet).
#
# The GPU machine's Python has torch, transformers, peft, accelerate, pytest, hypothesis and tqdm, but no
# bitsandbytes and no package index. To test 8-bit / 4-bit bases there too, carry bitsandbytes as a wheel: on a
# machine with an index,
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_24_x86_64 -d .whl bitsandbytes==0.50.2      # about 41 MB
# add `.whl/` to .git/info/exclude, and carry `.whl` with the working tree; this script installs it into a scratch
# folder on PYTHONPATH. peft-cpl itself is used from the working tree (PYTHONPATH), not installed.
#
# Writes under $OUT (default benchmarks/results/gpu), most important first within each part:
#   gpu.txt          the GPU's name
#   cuda_tests.txt   the CUDA tests (layer math against the dense reference, merge/unmerge, save/load across cpu and
#                    cuda, packed supports, selection exactness and its 4.25 B bound; 8-bit / 4-bit with bitsandbytes)
#   perf_1b.*        speed (issue: fast on the GPUs users have): perf.py on a random-weight Llama-3.2-1B-shaped model
#                    in bf16, 4 x 1024 tokens; full fine-tuning, LoRA r=16, CPL element and row at 0.3 / 0.6 / 0.05,
#                    with and without the guard
#   perf_memory.*    memory (issue: the paper's density on a consumer GPU): perf.py --live-peak on a random-weight
#                    Qwen2.5-1.5B-shaped model in bf16, 4 x 512 tokens: max_memory_allocated beside the estimator's
#                    peak for full fine-tuning, LoRA r=16 and CPL at 0.6 / 0.3 / 0.05 with each option
#   strategies.txt   the strategy crossovers by density
# perf.py saves its JSON after every method, so a part stopped by its time limit keeps what it measured.
# A dry run on the CPU (all four parts, every method, exit 0: 5 min 23 s on 2 idle cores):
#   DEVICE=cpu CONFIG=benchmarks/configs/tiny-llama.json MEMORY_CONFIG=benchmarks/configs/tiny-llama.json \
#       BATCH=1 SEQ=16 MEMORY_SEQ=16 STEPS=1 SHAPES=64x64,128x64 bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu}
DEVICE=${DEVICE:-cuda}
CONFIG=${CONFIG:-benchmarks/configs/llama-3.2-1b.json}
BATCH=${BATCH:-4}
SEQ=${SEQ:-1024}
STEPS=${STEPS:-5}
MEMORY_CONFIG=${MEMORY_CONFIG:-benchmarks/configs/qwen2.5-1.5b.json}
MEMORY_SEQ=${MEMORY_SEQ:-512}
SHAPES=${SHAPES:-2048x2048,8192x2048,2048x8192}
mkdir -p "$OUT"
export PYTHONPATH="$PWD:${PYTHONPATH:-}"
if compgen -G ".whl/bitsandbytes-*.whl" > /dev/null; then
    python -m pip install --quiet --no-index --no-deps --target /tmp/peft-cpl-bnb .whl/bitsandbytes-*.whl \
        && export PYTHONPATH="/tmp/peft-cpl-bnb:$PYTHONPATH"
fi
status=0
{ nvidia-smi --query-gpu=name,memory.total --format=csv 2>/dev/null || echo "no nvidia-smi"; \
  python -c "import torch; print(torch.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no CUDA')"; \
} | tee "$OUT/gpu.txt"
cuda_tests=(tests/test_cuda.py)
memory_methods=(full lora-r16 cpl-e0.6 cpl-e0.6-fused cpl-e0.3 cpl-e0.05 cpl-e0.6-int32 cpl-r0.6)
if python -c "import bitsandbytes" 2>/dev/null; then
    cuda_tests+=(tests/test_quantized.py tests/test_precision.py)
    memory_methods+=(cpl-e0.6-fused-adam8)
fi
[ "$DEVICE" = cpu ] && export PEFT_CPL_CUDA_TESTS_ON_CPU=1
timeout 110 python -m pytest -q -p no:cacheprovider "${cuda_tests[@]}" 2>&1 | tail -30 | tee "$OUT/cuda_tests.txt" \
    || status=1
timeout 170 python -u benchmarks/perf.py --config "$CONFIG" --dtype bfloat16 --device "$DEVICE" --batch "$BATCH" \
    --seq "$SEQ" --steps "$STEPS" --output "$OUT/perf_1b" \
    --methods full lora-r16 cpl-e0.3 cpl-r0.3 cpl-e0.3+guard cpl-r0.3+guard cpl-e0.6 cpl-r0.6 cpl-e0.05 cpl-r0.05 \
    cpl-e0.6+guard cpl-r0.6+guard cpl-e0.05+guard cpl-r0.05+guard \
    2>&1 | tee "$OUT/perf_1b.log" | tail -25 || status=1
timeout 120 python -u benchmarks/perf.py --config "$MEMORY_CONFIG" --dtype bfloat16 --device "$DEVICE" \
    --batch "$BATCH" --seq "$MEMORY_SEQ" --steps 2 --live-peak --output "$OUT/perf_memory" \
    --methods "${memory_methods[@]}" 2>&1 | tee "$OUT/perf_memory.log" | tail -15 || status=1
timeout 60 python -u benchmarks/strategies.py --device "$DEVICE" --tokens $((BATCH * SEQ)) --repeats 3 \
    --shapes "$SHAPES" --densities 0.001 0.01 0.1 0.3 0.6 2>&1 | tee "$OUT/strategies.txt" \
    || status=1
exit $status
