#!/usr/bin/env bash
# Entry point on every worker of a Cloud TPU VM. launch/tpu.py copies the repo to
# ~/attention and calls this through `gcloud compute tpus tpu-vm ssh --worker=all`:
#
#   bash launch/run_tpu.sh setup             # venv + editable install with jax[tpu]; idempotent
#   bash launch/run_tpu.sh run RUN ARGS...   # python -m experiments.run ARGS on every host
#
# `run` sets ATTENTION_MULTIHOST=1, so experiments.run calls jax.distributed.initialize(),
# which finds the other hosts of the slice by itself. Each worker appends its output
# to ~/attention_logs/RUN.<hostname>.log (fetched by `python -m launch.tpu logs`).
# Exit status: the training's, or 75 when it exited 0 before its last step (a spot
# VM's shutdown SIGTERM makes experiments.run checkpoint and exit 0).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${ATTENTION_VENV:-$HOME/attention_venv}"
LOGS="${ATTENTION_LOGS:-$HOME/attention_logs}"
# Same jax range as pyproject.toml; the [tpu] extra brings the matching libtpu from PyPI.
JAX_SPEC="${ATTENTION_JAX_SPEC:-jax[tpu]>=0.10,<0.11}"

case "${1:-}" in
  setup)
    if [ ! -x "$VENV/bin/python" ]; then
      python3 -m venv "$VENV"
    fi
    "$VENV/bin/python" -m pip install -q --upgrade pip
    "$VENV/bin/python" -m pip install -q -e . "$JAX_SPEC"
    # Fail here, once, rather than at the start of every run.
    "$VENV/bin/python" -c "import attention, experiments.run, launch.manifest"
    echo "setup done on $(hostname)"
    ;;
  run)
    run="${2:?usage: run_tpu.sh run RUN_NAME ARGS...}"
    shift 2
    mkdir -p "$LOGS"
    log="$LOGS/$run.$(hostname).log"
    workdir=""
    prev=""
    for a in "$@"; do
      case "$a" in --workdir=*) workdir="${a#--workdir=}" ;; esac
      if [ "$prev" = "--workdir" ]; then workdir="$a"; fi
      prev="$a"
    done
    export ATTENTION_MULTIHOST=1 PYTHONUNBUFFERED=1
    echo "=== $(date -Is) $(hostname): python -m experiments.run $*" >>"$log"
    set +e
    "$VENV/bin/python" -m experiments.run "$@" 2>&1 | tee -a "$log"
    rc=${PIPESTATUS[0]}
    # Only the primary host writes config.json/metrics.jsonl to a local workdir;
    # a gs:// workdir is visible from every host.
    if [ "$rc" -eq 0 ] && { [[ "$workdir" == gs://* ]] || [ -e "$workdir/config.json" ]; }; then
      "$VENV/bin/python" -m launch.manifest complete "$workdir" 2>&1 | tee -a "$log"
      rc=${PIPESTATUS[0]}
    fi
    exit "$rc"
    ;;
  *)
    echo "usage: bash launch/run_tpu.sh {setup | run RUN_NAME ARGS...}" >&2
    exit 2
    ;;
esac
