#!/usr/bin/env bash
# The GPU checks owed by issues 11-14, as one prepared script for a lent GPU machine (at most DEADLINE=540 s; each
# step has its own time limit, a failed step does not stop the others, steps past the deadline are skipped). Everything it
# writes goes under OUT: log.txt (every step's output and exit status) and results.tgz (device.txt from
# nvidia-smi, the bench JSON/markdown files) -- two files, as the device tool brings back at most eight.
#
#   OUT=/path/to/out bash benchmarks/gpu_checks.sh          # on the GPU machine (the device tool's $OUT)
#   SMALL=1 OUT=/tmp/gpu_dry bash benchmarks/gpu_checks.sh  # the same commands at toy sizes on CPU: checks the
#                                                           # script itself (flags, paths) before GPU time
#
# What each step answers (the line in brackets):
#  1 tests that skip without CUDA: generators on the device, checkpoints moving between CUDA and CPU
#  2 every rule trains on CUDA through the CLI: an mlp, a ViT and a GPT, one epoch each (11: CPU and CUDA)
#  4 the transformer bench to 1e9 parameters in bf16 (12)
#  3 bf16 matmul share of peak at width >= 4096, DFA/SAL/recompute activation memory at depth 16-32 (11, 12)
#  5 SAL layer against active-width dense with grouped_mm at batch 256 / 1024 (13: <= 1.3x)
#  6 analog training step multiples on CUDA, GPU-sized net (14)
set -u
OUT=${OUT:?set OUT to the folder for the results}
mkdir -p "$OUT"
PY=${PY:-python3}
[ -x .venv/bin/python ] && PY=.venv/bin/python
LOG="$OUT/log.txt"
: > "$LOG"
# A bare GPU machine has torch but not this package: install it in place, without dependencies or network
# (its entry points register the analog substrate). Text data: this repository's own markdown (the
# Austen corpus comes from a Debian package the set-up fetches, absent there).
if ! "$PY" -c "import importlib.metadata as m; m.distribution('neurosal')" 2>/dev/null; then
  "$PY" -m pip install -q --no-deps --no-build-isolation -e . >> "$LOG" 2>&1 || echo "pip install -e . failed" | tee -a "$LOG"
fi
WORK=$(mktemp -d)  # training runs and the corpus: not results, kept out of OUT
trap 'rm -rf "$WORK"' EXIT
CORPUS="$WORK/corpus.txt"
cat README.md benchmarks/reports/*/README.md > "$CORPUS"
if [ "${SMALL:-0}" = 1 ]; then
  ACCEL=cpu; DT=float32; SZ=small
else
  ACCEL=cuda; DT=bf16; SZ=full
fi

DEADLINE=${DEADLINE:-540}  # seconds for the whole script (the device tool allows 600 per command)
step() {  # step NAME SECONDS COMMAND...: run with a time limit, log output and status, never abort the script
  local name=$1 limit=$2; shift 2
  local left=$((DEADLINE - SECONDS))
  if [ "$left" -lt 20 ]; then echo "=== $name: skipped, the script's deadline is near" | tee -a "$LOG"; return; fi
  [ "$limit" -gt "$left" ] && limit=$left
  local t0=$SECONDS
  echo "=== $name (limit ${limit}s): $*" | tee -a "$LOG"
  timeout "$limit" "$@" >> "$LOG" 2>&1
  local rc=$?
  echo "=== $name: exit $rc after $((SECONDS - t0)) s" | tee -a "$LOG"
}

{
  nvidia-smi 2>/dev/null || echo "no nvidia-smi (CPU run)"
  "$PY" -c "import torch; c = torch.cuda.is_available(); print(torch.__version__, torch.cuda.get_device_name(0) if c else 'cpu')"
} > "$OUT/device.txt" 2>&1

# 1. the suite's CUDA-only tests
step cuda-tests 120 "$PY" -m pytest -q -rs -p no:cacheprovider \
  tests/test_analog_fidelity.py::test_cuda_arrays_draw_on_the_gpu \
  tests/test_analog_fidelity.py::test_a_model_converted_on_the_cpu_moves_to_the_gpu_with_its_arrays \
  tests/test_trust.py::test_checkpoints_move_between_cuda_and_cpu

# 2. every rule through the CLI on the accelerator
for rule in bp fa usf kp ldef dfa drtp sal; do
  step "train-$rule-mlp" 60 "$PY" -m neurosal.cli train --rule "$rule" --model mlp:64x64 --data digits \
    --epochs 1 --accel "$ACCEL" --no-progress --out "$WORK/runs/$rule-mlp"
done
for rule in fa dfa sal; do
  step "train-$rule-vit" 60 "$PY" -m neurosal.cli train --rule "$rule" --model "vit:patch=4,dim=32,depth=2,heads=2" \
    --data digits --epochs 1 --accel "$ACCEL" --no-progress --out "$WORK/runs/$rule-vit"
done
for rule in dfa sal; do
  step "train-$rule-gpt" 90 "$PY" -m neurosal.cli train --rule "$rule" --model "gpt:layers=2,dim=64,heads=2,ctx=64" \
    --data "$CORPUS" --epochs 1 --accel "$ACCEL" --no-progress --out "$WORK/runs/$rule-gpt"
done

# 4. transformers to 1e9 parameters (first: the largest owed item; `bench` runs only the sweeps named)
if [ "$SZ" = full ]; then
  step gpt-1e7-1e9 240 "$PY" -m neurosal.cli bench --gpt-params 1e7,1e8,1e9 --ctx 1024 --gpt-batch 8 --steps 5 \
    --dtype "$DT" --rules "bp,dfa,dfa[recompute],sal" --accel "$ACCEL" --out "$OUT/gpt"
else
  step gpt-1e7-1e9 240 "$PY" -m neurosal.cli bench --gpt-depths 2 --gpt-dim 32 --ctx 16 --gpt-batch 2 --steps 2 \
    --dtype "$DT" --rules "bp,dfa,sal" --accel "$ACCEL" --out "$OUT/gpt"
fi

# 3. matmul share of peak at width 4096 (bf16) and activation memory at depth
if [ "$SZ" = full ]; then
  step width-4096 150 "$PY" -m neurosal.cli bench --widths 4096 --depth 8 --batch 4096 --steps 10 --dtype "$DT" \
    --rules bp,dfa,sal --accel "$ACCEL" --out "$OUT/width4096"
  step depth-16-32 150 "$PY" -m neurosal.cli bench --depths 16,32 --width 1024 --batch 1024 --steps 10 --dtype "$DT" \
    --rules "bp,dfa,sal,dfa[recompute]" --accel "$ACCEL" --out "$OUT/depth"
else
  step width-4096 150 "$PY" -m neurosal.cli bench --widths 64 --depth 2 --batch 32 --steps 2 --dtype "$DT" \
    --rules bp,dfa,sal --accel "$ACCEL" --out "$OUT/width4096"
  step depth-16-32 150 "$PY" -m neurosal.cli bench --depths 4 --width 32 --batch 32 --steps 2 --dtype "$DT" \
    --rules "bp,dfa,sal,dfa[recompute]" --accel "$ACCEL" --out "$OUT/depth"
fi

# 5. SAL with grouped_mm; 6. analog steps on the device
if [ "$SZ" = full ]; then
  step sal-grouped 120 "$PY" benchmarks/sal_bench.py --device "$ACCEL" --out "$OUT/sal_bench_cuda.json"
  step analog 150 "$PY" benchmarks/analog_bench.py --device "$ACCEL" --rounds 3 --out "$OUT/analog_bench_cuda.json"
else
  step sal-grouped 120 "$PY" benchmarks/sal_bench.py --small --device "$ACCEL" --out "$OUT/sal_bench_cuda.json"
  step analog 300 "$PY" benchmarks/analog_bench.py --small --device "$ACCEL" --rounds 1 --out "$OUT/analog_bench_cuda.json"
fi

# the device tool brings back at most 8 files: every result in one archive, the log beside it
(cd "$OUT" && tar czf results.tgz --exclude=results.tgz --exclude=log.txt ./* 2>/dev/null \
  && find . -mindepth 1 -maxdepth 1 ! -name results.tgz ! -name log.txt -exec rm -rf {} +)
grep "^=== .*: exit" "$LOG" | sed 's/^=== //'
