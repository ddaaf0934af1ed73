#!/usr/bin/env bash
# Every benchmark on an accelerator in one go, each bounded in time (about 6 minutes in all), JSON
# and logs written to OUT; for a lent GPU, run at once from the repository root:
#
#     JAXFORMER_DATA=path/to/data bash scripts/bench_gpu.sh OUT
#
# (JAXFORMER_DATA: the directory holding fra-eng/fra-eng.zip, for the translator's benchmark.)
# Nothing is installed or downloaded; jax, flax, optax, orbax, torch and transformers are expected.
# scripts/bench_serve.py is left out: its Hugging Face servers run on the CPU.
set -u
out=${1:-bench-gpu}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONPATH="${PYTHONPATH:-}:$(pwd)"
run() {  # run NAME SECONDS COMMAND...: output to OUT/NAME.log, a line with its status and time
    name=$1; secs=$2; shift 2
    start=$(date +%s)
    timeout "$secs" "$@" > "$out/$name.log" 2>&1
    echo "$name: exit $? in $(( $(date +%s) - start )) s" | tee -a "$out/summary.txt"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpu.txt" 2>&1
run generate 100 python scripts/bench_generate.py --dtype float32 bfloat16 int8 --batch 1 8 --repeats 3 \
    --json "$out/generate.json"
run train_bf16 90 python scripts/bench_train.py --dtype bfloat16 --batch-size 16 --steps 10 --repeats 2 \
    --json "$out/train_bf16.json"
run train_fp32 70 python scripts/bench_train.py --dtype float32 --batch-size 8 --steps 10 --repeats 2 \
    --json "$out/train_fp32.json"
run translator 80 python scripts/bench_translator.py --dtype float32 bfloat16 --repeats 2 \
    --json "$out/translator.json"
run taps 30 python scripts/bench_taps.py --batch 8 --seq-len 1024 --json "$out/taps.json"
cat "$out/summary.txt"
