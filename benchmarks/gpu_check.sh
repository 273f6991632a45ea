#!/usr/bin/env bash
# The prepared GPU check: `make gpu-check`, at most 8 minutes on one H100 / H200 that can fetch nothing (its three
# parts are capped at 150 + 240 + 90 s; never run on a GPU yet).
#
# The GPU machine's Python has torch, transformers, peft, accelerate, pytest, hypothesis and tqdm, but no
# bitsandbytes and no package index. To test 8-bit / 4-bit bases there too, carry bitsandbytes as a wheel: on a
# machine with an index,
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_24_x86_64 -d .whl bitsandbytes==0.50.2      # about 41 MB
# add `.whl/` to .git/info/exclude, and carry `.whl` with the working tree; this script installs it into a scratch
# folder on PYTHONPATH. peft-cpl itself is used from the working tree (PYTHONPATH), not installed.
#
# Writes under $OUT (default benchmarks/results/gpu): the GPU's name, the CUDA tests' output, perf.py on a
# random-weight Llama-3.2-1B-shaped model in bf16 (its JSON saved after every method and its log in perf_1b.log, so
# a run stopped by a time limit keeps what it measured), and the strategy crossovers. A dry run on the CPU (all three
# parts, 2 min 44 s on 2 cores):
#   DEVICE=cpu CONFIG=benchmarks/configs/tiny-llama.json BATCH=1 SEQ=16 STEPS=1 SHAPES=64x64,128x64 \
#       bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu}
DEVICE=${DEVICE:-cuda}
CONFIG=${CONFIG:-benchmarks/configs/llama-3.2-1b.json}
BATCH=${BATCH:-4}
SEQ=${SEQ:-1024}
STEPS=${STEPS:-5}
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
python -c "import bitsandbytes" 2>/dev/null && cuda_tests+=(tests/test_quantized.py tests/test_precision.py)
[ "$DEVICE" = cpu ] && export PEFT_CPL_CUDA_TESTS_ON_CPU=1
timeout 150 python -m pytest -q -p no:cacheprovider "${cuda_tests[@]}" 2>&1 | tail -30 | tee "$OUT/cuda_tests.txt" \
    || status=1
timeout 240 python -u benchmarks/perf.py --config "$CONFIG" --dtype bfloat16 --device "$DEVICE" --batch "$BATCH" \
    --seq "$SEQ" --steps "$STEPS" --output "$OUT/perf_1b" \
    --methods full lora-r16 cpl-e0.3 cpl-r0.3 cpl-e0.6 cpl-r0.6 cpl-e0.05 cpl-r0.05 cpl-e0.3+guard cpl-e0.6-fused \
    2>&1 | tee "$OUT/perf_1b.log" | tail -25 || status=1
timeout 90 python -u benchmarks/strategies.py --device "$DEVICE" --tokens $((BATCH * SEQ)) \
    --shapes "$SHAPES" --densities 0.001 0.01 0.1 0.3 0.6 2>&1 | tee "$OUT/strategies.txt" \
    || status=1
exit $status
