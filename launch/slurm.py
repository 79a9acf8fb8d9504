"""Submit a multi-node, multi-GPU training run to Slurm.

    python -m launch.slurm --config experiments/configs/transformer_mt.py \
        --workdir /shared/runs/mt --nodes 2 --gpus-per-node 8 [--partition gpu] \
        [--time 24:00:00] [--output job.sbatch] [--dry-run] [--config.batch_size=256 ...]

Writes an sbatch script that starts one process per GPU (``srun
--ntasks-per-node=G --gpus-per-task=1``) with ``ATTENTION_MULTIHOST=1``, so
``experiments.run`` calls ``jax.distributed.initialize()``, which reads the
coordinator, process count and rank from Slurm's environment. Slurm sends SIGTERM
two minutes before the time limit; experiments.run checkpoints on it, and
``sbatch`` of the same script (or ``--requeue`` after a node failure) resumes.
``--dry-run`` prints the script and the ``sbatch`` command without writing or
submitting anything.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import sys
from typing import Sequence

from launch.runner import DryRunRunner, Runner, SubprocessRunner, format_command
from launch.sweep import parse_extra


def sbatch_script(*, config: str, workdir: str, nodes: int, gpus_per_node: int,
                  extra: Sequence[str] = (), partition: str | None = None,
                  time_limit: str | None = None, job_name: str = "attention",
                  python: str = sys.executable, cpus_per_task: int | None = None) -> str:
  """The sbatch script text (pure function; the tests compare it line by line)."""
  sbatch = [f"--job-name={job_name}", f"--nodes={nodes}", f"--ntasks-per-node={gpus_per_node}",
            f"--gpus-per-node={gpus_per_node}"]
  if cpus_per_task:
    sbatch.append(f"--cpus-per-task={cpus_per_task}")
  if partition:
    sbatch.append(f"--partition={partition}")
  if time_limit:
    sbatch.append(f"--time={time_limit}")
  # %x-%j: one log per job (name-id), appended to across requeues.
  sbatch += [f"--output={os.path.join(workdir, 'slurm-%x-%j.out')}", "--open-mode=append",
             "--signal=TERM@120", "--requeue"]
  train = [python, "-m", "experiments.run", "--config", config, "--workdir", workdir, *extra]
  lines = ["#!/bin/bash"] + [f"#SBATCH {s}" for s in sbatch] + [
      "set -euo pipefail",
      "# Every task calls jax.distributed.initialize(); Slurm's env names the coordinator.",
      "export ATTENTION_MULTIHOST=1",
      "# --gpus-per-task=1 leaves each task one GPU, ordinal 0; JAX would otherwise pick",
      "# ordinal SLURM_LOCALID, which does not exist there (jax-ml/jax#23452).",
      "export JAX_LOCAL_DEVICE_IDS=0",
      "export PYTHONUNBUFFERED=1",
      f"mkdir -p {shlex.quote(workdir)}",
      f"srun --ntasks-per-node={gpus_per_node} --gpus-per-task=1 {format_command(train)}",
  ]
  return "\n".join(lines) + "\n"


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m launch.slurm", allow_abbrev=False,
                              description=__doc__.split("\n\n")[0])
  p.add_argument("--config", required=True)
  p.add_argument("--workdir", required=True, help="on a filesystem every node mounts")
  p.add_argument("--nodes", type=int, required=True)
  p.add_argument("--gpus-per-node", type=int, required=True)
  p.add_argument("--partition", default=None)
  p.add_argument("--time", default=None, help="HH:MM:SS or D-HH:MM:SS")
  p.add_argument("--job-name", default="attention")
  p.add_argument("--cpus-per-task", type=int, default=None)
  p.add_argument("--python", default=sys.executable, help="interpreter on the compute nodes")
  p.add_argument("--output", default=None, help="script path (default: WORKDIR/launch.sbatch)")
  p.add_argument("--dry-run", action="store_true")
  p.add_argument("--extra", nargs=argparse.REMAINDER, default=[])
  return p


def main(argv: Sequence[str] | None = None, runner: Runner | None = None) -> int:
  parser = _parser()
  args, unknown = parser.parse_known_args(list(sys.argv[1:] if argv is None else argv))
  extra = parse_extra(parser, args.extra, unknown)
  if args.nodes < 1 or args.gpus_per_node < 1:
    parser.error("--nodes and --gpus-per-node must be >= 1")
  if args.time and not re.fullmatch(r"(\d+-)?\d{1,2}:\d{2}:\d{2}", args.time):
    parser.error(f"--time {args.time}: use HH:MM:SS or D-HH:MM:SS")
  script = sbatch_script(config=args.config, workdir=args.workdir, nodes=args.nodes,
                         gpus_per_node=args.gpus_per_node, extra=extra,
                         partition=args.partition, time_limit=args.time,
                         job_name=args.job_name, python=args.python,
                         cpus_per_task=args.cpus_per_task)
  path = args.output or os.path.join(args.workdir, "launch.sbatch")
  if args.dry_run:
    print(script, end="")
    (runner or DryRunRunner()).run(["sbatch", path])
    return 0
  # Slurm opens --output before the script's own mkdir runs.
  os.makedirs(args.workdir, exist_ok=True)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    f.write(script)
  rc, out, err = (runner or SubprocessRunner()).run(["sbatch", path])
  print(out, end="")
  if rc != 0:
    print(f"error: sbatch {path} failed (exit {rc}): {err.strip()}", file=sys.stderr)
  return rc


if __name__ == "__main__":
  sys.exit(main())
