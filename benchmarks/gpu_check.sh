#!/usr/bin/env bash
# The GPU measurements of benchmarks/RESULTS.md in one device run (under 9 minutes).
#
#   bash benchmarks/gpu_check.sh fetch       # with network, once: wheels the GPU image lacks -> .whl/
#   bash benchmarks/gpu_check.sh run DIR     # on the GPU machine: logs and JSON into DIR
#
# With this workplace's device tool:
#   run(command="bash benchmarks/gpu_check.sh run $OUT", carry=[".whl"], timeout_s=600)
#
# The steps run in order of importance, each under its own time limit, and a failing step
# does not stop the next. DIR gets gpu_check.log (everything printed) and one JSON per step,
# five files in all (the device tool brings back at most eight). The exit status is the
# number of failed steps. GPU_CHECK_SMOKE=1 swaps in tiny sizes, so that a CPU can run the
# plumbing (tests/test_benchmarks.py does).
#
# Steps:
#   train_base_b64        Transformer-base train step vs the flax peer, bf16, batch 64, S = T = 128,
#                         dropout and attention dropout 0.1, with the 10 costliest XLA ops: the
#                         RESULTS.md row of 2026-11-24, re-measured.
#   train_base_b64_attn0  the same without attention dropout (Vaswani et al.'s base model has
#                         none), so that ours runs cuDNN attention (the flax peer's attention
#                         is XLA's either way).
#   train_base_b192_attn0 the same at batch 192, about the paper's 25k source tokens per step.
#   attention_core        dot_product_attention in every backend vs flax and jax.nn, bf16.
set -uo pipefail

# The one import of this repo that the device image lacks (see the device tool's KINDS.md).
WHEELS=(ml_collections==1.1.0)

usage() { echo "usage: bash benchmarks/gpu_check.sh fetch | run DIR" >&2; exit 2; }

fetch() {
  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
      --implementation cp --platform manylinux2014_x86_64 -d .whl "${WHEELS[@]}"
}

step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2
  shift 2
  echo "=== $name (limit ${limit}s): $*"
  local start=$SECONDS
  timeout --signal=INT --kill-after=20 "$limit" "$@"
  local rc=$?
  echo "=== $name: exit $rc after $((SECONDS - start))s"
  [ "$rc" -eq 0 ] || failed=$((failed + 1))
}

run() {
  local dir=$1
  mkdir -p "$dir" || exit 2
  export PYTHONUNBUFFERED=1
  if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/gpu_check_site .whl/*.whl || exit 2
    export PYTHONPATH=/tmp/gpu_check_site${PYTHONPATH:+:$PYTHONPATH}
  fi
  local train attn b1 b2 limits
  if [ "${GPU_CHECK_SMOKE:-0}" = 1 ]; then
    train=(--size tiny --src_len 8 --tgt_len 8 --dtype fp32 --steps 1 --matmul_n 64)
    b1=2 b2=4 limits=(150 150 150 150)  # loose: a loaded 2-core CI machine
    attn=(--lengths 64 --masks is_causal padding --batch 1 --heads 2 --dtype fp32 --repeats 1)
  else
    train=(--size base --src_len 128 --tgt_len 128 --dtype bf16 --steps 10)
    b1=64 b2=192 limits=(140 100 130 150)  # 520 s in all, inside the device tool's 600
    attn=(--lengths 1024 4096 --masks causal_mask is_causal padding --dtype bf16 --repeats 10)
  fi
  failed=0
  {
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null \
        || echo "nvidia-smi: none"
    python3 -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__,
'optax', optax.__version__, jax.devices())"
    step train_base_b64 "${limits[0]}" python3 -m benchmarks.train_step "${train[@]}" --batch "$b1" \
        --profile 10 --out "$dir/train_base_b64.json"
    step train_base_b64_attn0 "${limits[1]}" python3 -m benchmarks.train_step "${train[@]}" \
        --batch "$b1" --attention_dropout 0 --out "$dir/train_base_b64_attn0.json"
    step train_base_b192_attn0 "${limits[2]}" python3 -m benchmarks.train_step "${train[@]}" \
        --batch "$b2" --attention_dropout 0 --out "$dir/train_base_b192_attn0.json"
    step attention_core "${limits[3]}" python3 -m benchmarks.attention_core "${attn[@]}" \
        --out "$dir/attention_core.json"
    echo "=== summary"
    python3 - "$dir" <<'EOF'
import glob, json, os, sys
for path in sorted(glob.glob(os.path.join(sys.argv[1], "train_*.json"))):
  r = json.load(open(path))
  flax_row, ours = r["rows"]
  print(f"{os.path.basename(path)}: batch {r['args']['batch']}, flax {flax_row['ms_per_step']:.1f}"
        f" ms ({flax_row['mfu']:.1%} MFU), ours {ours['ms_per_step']:.1f} ms"
        f" ({ours['mfu']:.1%} MFU), ours/flax {ours['speed_ratio_vs_flax']:.2f}x,"
        f" matmul peak {r['matmul_peak_flops'] / 1e9:.0f} GFLOP/s")
EOF
    echo "=== $failed step(s) failed"
    exit "$failed"  # this group is a subshell: its status is the pipeline's (pipefail)
  } 2>&1 | tee "$dir/gpu_check.log"
}

case "${1:-}" in
  fetch) [ $# -eq 1 ] || usage; fetch ;;
  run) [ $# -eq 2 ] || usage; run "$2" ;;
  *) usage ;;
esac
