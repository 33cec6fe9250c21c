#!/usr/bin/env bash
# One prepared run on one GPU, under 8 minutes: the CUDA-marked tests, the engine benchmark at GPT-2
# small's sizes (12 layers, d=768, T=512 and 1024) against non-private training and Opacus's ghost
# clipping, dp_fsdp's benchmark, the secure-noise cost and the physical-batch memory.
#
# Usage (from the repository root):
#   bash benchmarks/gpu.sh            # on a GPU machine: writes benchmarks/results/gpu_<date>_<card>/
#   bash benchmarks/gpu.sh --smoke    # tiny sizes on whatever device there is (the CPU): checks the plumbing
#
# Every step has its own time limit (their sum is 7.8 minutes) and its own log; a failing step
# does not stop the others. summary.md lists each step's exit code and seconds, the card, torch.
# GPU_SH_OUT=<dir> overrides the results folder; GPU_SH_STEPS=a,b runs only the steps named.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python}

SMOKE=0
if [ "${1:-}" = "--smoke" ]; then SMOKE=1; fi
CARD=$($PY -c "import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')")
if [ "$CARD" = "cpu" ]; then DEVICE=cpu; else DEVICE=cuda; fi
if [ $SMOKE = 0 ] && [ $DEVICE = cpu ]; then
  echo "benchmarks/gpu.sh: no CUDA device here. Run it on a GPU machine, or use --smoke to check the plumbing." >&2
  exit 2
fi
STAMP=$(date -u +%Y-%m-%d)
SLUG=$(echo "$CARD" | tr -c 'A-Za-z0-9._\n-' '_')
OUT=${GPU_SH_OUT:-benchmarks/results/gpu_${STAMP}_${SLUG}}
mkdir -p "$OUT"

if [ $SMOKE = 1 ]; then
  TINY=--tiny
  SCALE=4  # the CPU is slower than a GPU even at tiny sizes
  ENCODERS=encoder_gpt2s_512; HF=hf_gpt2s_512; STEPS="--steps 1 --warmup 1"
else
  TINY=
  SCALE=1
  ENCODERS=encoder_gpt2s_512,encoder_gpt2s_1024; HF=hf_gpt2s_512,hf_gpt2s_1024; STEPS="--steps 5 --warmup 2"
fi

{
  echo "# benchmarks/gpu.sh, $STAMP"
  echo
  echo "Device: $CARD. $($PY -c 'import torch, platform; print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, Python {platform.python_version()}")')"
  [ $SMOKE = 1 ] && echo "Smoke run (--smoke): tiny sizes, checks that every step runs; no numbers to report."
  echo
  echo "| step | exit code | seconds |"
  echo "|---|---:|---:|"
} > "$OUT/summary.md"

FAILED=0
step() {  # step NAME LIMIT_SECONDS COMMAND...: run with a time limit, log to $OUT/NAME.log
  local name=$1 limit=$(($2 * SCALE))
  shift 2
  if [ -n "${GPU_SH_STEPS:-}" ] && [[ ",$GPU_SH_STEPS," != *",$name,"* ]]; then
    echo "| $name | skipped (GPU_SH_STEPS) | 0 |" >> "$OUT/summary.md"
    return
  fi
  echo "== $name (at most ${limit} s): $*"
  local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "| $name | $rc$([ $rc = 124 ] && echo ' (time limit)') | $((SECONDS - t0)) |" >> "$OUT/summary.md"
  echo "   exit code $rc after $((SECONDS - t0)) s; log: $OUT/$name.log"
  [ $rc = 0 ] || FAILED=1
}

# 1. the test suite's CUDA-marked tests (placement, exact update, bf16, secure noise, cap, 1-GPU dp_fsdp)
step cuda_tests 100 $PY -m pytest -q -m cuda tests -rs
# 2. engines at GPT-2 small's sizes: dp_auto vs non-private vs Opacus ghost clipping (Opacus runs the encoder)
step engines_encoder 150 $PY benchmarks/run.py --device $DEVICE $TINY $STEPS --models $ENCODERS \
  --modes nonprivate,dp_auto_bk,opacus_ghost --out "$OUT/engines_encoder"
# 3. transformers' GPT-2 at the same sizes: dp_auto vs non-private (Opacus cannot run it, see results_hf.md)
step engines_hf_gpt2 75 $PY benchmarks/run.py --device $DEVICE $TINY $STEPS --models $HF \
  --modes nonprivate,dp_auto_bk --out "$OUT/engines_hf_gpt2"
# 4. dp_fsdp vs FSDP2 vs dp_auto (1 rank on one GPU: units moved by fully_shard)
step fsdp 75 $PY benchmarks/fsdp.py --device $DEVICE $TINY --out "$OUT/fsdp"
# 5. secure-mode noise per million coordinates: ChaCha20 on the device vs os.urandom on the CPU
step secure_noise 25 $PY benchmarks/secure_noise.py --device $DEVICE $TINY --coordinates 4194304 --out "$OUT/secure_noise"
# 6. peak memory against max_physical_batch_size (GPT-2 small's width, T=512)
if [ $SMOKE = 1 ]; then
  step physical_batch 45 $PY benchmarks/physical_batch.py --device $DEVICE --tiny --out "$OUT/physical_batch"
else
  step physical_batch 45 $PY benchmarks/physical_batch.py --device $DEVICE --d 768 --heads 12 --layers 12 \
    --seq 512 --vocab 50257 --batch 32 --caps 16,4 --out "$OUT/physical_batch"
fi

echo "results: $OUT (summary.md)"
cat "$OUT/summary.md"
exit $FAILED
