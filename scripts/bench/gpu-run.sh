#!/usr/bin/env bash
# One visit to the GPU machine: the test binaries (every kernel, cooperative-matrix paths
# included where the card has them) and every benchmark, outputs under $OUT.
# Run there from the repository root after `. .devrun/env.sh` (binaries staged in .devrun/).
# Build the staged binaries with MLX_NATIVE_GIT_COMMIT=$(git rev-parse --short=12 HEAD): the
# device's copy of the checkout may report a stale HEAD.
set -u
out=${OUT:-/tmp/out}
mkdir -p "$out"
# Fixture paths are compiled in as this checkout's path on the build machine.
[ -e /work/main ] || { mkdir -p /work && ln -s "$PWD" /work/main; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/card.txt"
for t in .devrun/test-*; do
    echo "== $t" | tee -a "$out/tests.log"
    "$t" --test-threads 4 2>&1 | grep -E "^test result|FAILED|panicked|skip" | tee -a "$out/tests.log"
done
mlx-native bench kernels --json "$out/bench_kernels.json" 2>&1 | tee "$out/bench.txt"
mlx-native bench attention --kv-cache f16,q8,q4,tq4,tq3,tq2.5,tq2 --json "$out/bench_attention.json" 2>&1 | tee -a "$out/bench.txt"
mlx-native bench qmatmul --json "$out/bench_qmatmul.json" 2>&1 | tee -a "$out/bench.txt"
mlx-native bench ggml --json "$out/bench_ggml.json" 2>&1 | tee -a "$out/bench.txt"
mlx-native bench load --mib 4096 --json "$out/bench_load.json" 2>&1 | tee -a "$out/bench.txt"
mlx-native bench decode --shape all --json "$out/bench_decode.json" 2>&1 | tee -a "$out/bench.txt"
python3 scripts/bench/torch_copy.py 2>&1 | tee -a "$out/bench.txt"
python3 scripts/bench/torch_sdpa.py 2>&1 | tee -a "$out/bench.txt"
python3 scripts/bench/torch_matmul.py 2>&1 | tee -a "$out/bench.txt"
# Decode variants (fusions) timed interleaved in one process, when the example is staged.
if command -v decode_ab > /dev/null; then
    for s in llama-3.1-8b-mlx4 qwen3-30b-a3b gemma-3-4b-mlx4; do
        decode_ab "$s" 8 2>&1 | tee -a "$out/decode_ab.txt"
    done
fi
