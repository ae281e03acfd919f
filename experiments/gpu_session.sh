#!/usr/bin/env bash
# Every GPU check of this repo in one command, for a short lease on an NVIDIA machine:
#   bash experiments/gpu_session.sh            # logs and JSON go to $OUT (default /tmp/gpu_out)
# Order = priority; each step has its own time limit, so a hang or crash in one step leaves
# the others' results. Needs jax[cuda], flax, optax, torch + transformers (baselines); no
# ml_collections / tensorflow-datasets (nothing here imports them).
set -u
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
# The repository root: mopd_jax, configs and experiments import without `pip install -e .` on a lease.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PY:-python3}
step() {  # step NAME SECONDS COMMAND...: run with a limit, log to $OUT/NAME.txt, say how it ended
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  echo "=== $name (limit ${limit}s): $*"
  timeout -k 10 "$limit" "$@" > "$OUT/$name.txt" 2>&1
  local rc=$?
  tail -n "${TAIL:-12}" "$OUT/$name.txt"
  echo "=== $name: exit $rc after $((SECONDS - t0)) s"
}

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
$PY -c "import jax, flax, optax, torch, transformers; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__, jax.devices())"

TAIL=8 step 01_gpu_tests 100 env JAX_PLATFORMS=cuda $PY -m pytest -q -s -p no:cacheprovider tests/test_gpu.py \
  tests/test_losses.py -k "cudnn or top_k or bf16_logits"
TAIL=40 step 02_train_cudnn 150 $PY experiments/bench_train_step.py --attention-impl cudnn --torch-baseline \
  --runs 5 --json "$OUT/train_cudnn.json" --profile /tmp/prof_train
TAIL=16 step 03_sampler 150 $PY experiments/bench_sampler.py --device gpu --shapes 8x8,32x8 --prompt-len 128 \
  --new-tokens 128 --runs 3
echo "=== done after $SECONDS s"
