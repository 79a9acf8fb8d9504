"""``python -m experiments.compare``: every attention family on one task, one command.

    python -m experiments.compare --task reverse_long --workdir runs/compare_reverse_long
    python -m experiments.compare --task multi30k --data_dir /path/to/multi30k --workdir runs/cmp_mt
    python -m experiments.compare --task text --data_path tinyshakespeare.txt --workdir runs/cmp_lm

Trains RNNencdec (the no-attention baseline), RNNsearch (Bahdanau), Luong, LSTMN and
the Transformer (``--task text``: LSTM, LSTMN, Transformer LM) one after another with
``experiments/configs/compare.py`` at one shared size, each in ``WORKDIR/<family>``,
then writes ``WORKDIR/compare.md`` (a Markdown table: parameters, wall time, loss,
accuracy, BLEU, and the metric by source length) and ``compare_*.png`` plots.

A finished family is not trained again, and an interrupted one resumes from its
last checkpoint, so re-running the same command completes a comparison.
``--report_only`` rebuilds the table and plots from the run directories.
Extra ``--config.key=value`` flags reach every run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from typing import Sequence

from experiments import comparison_report
from experiments.configs import compare as compare_config

CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "compare.py")
RUNS_FILE = "compare.json"


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m experiments.compare", allow_abbrev=False,
                              description=__doc__.split("\n\n")[0])
  p.add_argument("--task", required=True, choices=compare_config.TASKS)
  p.add_argument("--workdir", required=True, help="one sub-directory per family goes here")
  p.add_argument("--size", default="small", choices=("tiny", "small", "paper"))
  p.add_argument("--families", default=None,
                 help="comma-separated subset, e.g. rnnsearch,transformer (default: all)")
  p.add_argument("--steps", type=int, default=None, help="num_train_steps for every family")
  p.add_argument("--data_dir", default=None, help="multi30k: the directory with train.de.gz ...")
  p.add_argument("--data_path", default=None, help="text: the training text file")
  p.add_argument("--report_only", action="store_true", help="only rebuild compare.md and plots")
  return p


def family_command(family: str, args: argparse.Namespace, workdir: str,
                   extra: Sequence[str]) -> list[str]:
  """The ``experiments.run`` command that trains one family."""
  argv = [sys.executable, "-m", "experiments.run", "--config",
          f"{CONFIG}:family={family},task={args.task},size={args.size}", "--workdir", workdir]
  if args.data_dir:
    argv.append(f"--config.data.dir={args.data_dir}")
  if args.data_path:
    argv.append(f"--config.data.path={args.data_path}")
  if args.steps:
    argv.append(f"--config.num_train_steps={args.steps}")
  return argv + list(extra)


def _check(args: argparse.Namespace, extra: Sequence[str]) -> list[str]:
  all_families = compare_config.families(args.task)
  chosen = args.families.split(",") if args.families else list(all_families)
  unknown = [f for f in chosen if f not in all_families]
  if unknown:
    raise ValueError(f"--families: {unknown} do not run task {args.task}; use {all_families}.")
  if args.task == "multi30k" and not args.data_dir and not args.report_only:
    raise ValueError("--task multi30k needs --data_dir DIR (the Multi30k files; see"
                     " experiments/data/parallel_text.py to download them).")
  if args.task == "text" and not args.data_path and not args.report_only:
    raise ValueError("--task text needs --data_path FILE (a plain-text training file).")
  # Checked here once rather than failing in every family's run.
  if not args.report_only:
    if args.task == "text" and not os.path.isfile(args.data_path):
      raise ValueError(f"--data_path {args.data_path}: no such file.")
    if args.task == "multi30k" and not os.path.isdir(args.data_dir):
      raise ValueError(f"--data_dir {args.data_dir}: no such directory.")
  bad = [e for e in extra if not e.startswith("--config.")]
  if bad:
    raise ValueError(f"unknown arguments {bad}; only --config.key=value overrides pass through.")
  return chosen


def _load_runs(workdir: str) -> dict:
  path = os.path.join(workdir, RUNS_FILE)
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  return {}


def _save_runs(workdir: str, runs: dict) -> None:
  path = os.path.join(workdir, RUNS_FILE)
  with open(path + ".tmp", "w") as f:
    json.dump(runs, f, indent=2)
  os.replace(path + ".tmp", path)


def _saved_steps(workdir: str) -> int | None:
  from launch import manifest
  try:
    return int((manifest.run_config(workdir) or {})["num_train_steps"])
  except (KeyError, TypeError, ValueError):
    return None


def _wanted_steps(family: str, args: argparse.Namespace, extra: Sequence[str]) -> int:
  """The step count this command asks for (a larger one continues a finished run)."""
  for e in reversed(list(extra)):
    if e.startswith("--config.num_train_steps="):
      return int(e.split("=", 1)[1])
  if args.steps:
    return args.steps
  return compare_config.get_config(
      f"family={family},task={args.task},size={args.size}").num_train_steps


def train_all(args: argparse.Namespace, chosen: Sequence[str], extra: Sequence[str]) -> int:
  """Trains the families in turn; returns how many failed."""
  from launch import manifest  # is_complete: the run's last eval is at num_train_steps

  os.makedirs(args.workdir, exist_ok=True)
  failed = 0
  for i, family in enumerate(chosen, 1):
    wd = os.path.join(args.workdir, family)
    argv = family_command(family, args, wd, extra)
    if manifest.is_complete(wd) and _saved_steps(wd) == _wanted_steps(family, args, extra):
      print(f"[{i}/{len(chosen)}] {family}: done already ({wd})", flush=True)
      continue
    os.makedirs(wd, exist_ok=True)
    log = os.path.join(wd, "train.log")
    print(f"[{i}/{len(chosen)}] {family}: training; log {log}", flush=True)
    # A family trained from scratch (its workdir deleted, or never checkpointed)
    # starts its wall time afresh; a resume adds to what compare.json has.
    ckpts = os.path.join(wd, "checkpoints")
    fresh = not os.path.isdir(ckpts) or not os.listdir(ckpts)
    start = time.perf_counter()
    with open(log, "a") as out:
      out.write("$ " + " ".join(argv) + "\n")
      out.flush()
      # Progress lines go to the log; the last one is echoed so a long run shows life.
      proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      assert proc.stdout is not None
      for line in proc.stdout:
        out.write(line)
        out.flush()   # so `tail -f train.log` follows the run
        if line.startswith(("step ", "eval @")):
          print(f"    {family}: {line.strip()[:150]}", flush=True)
      rc = proc.wait()
    seconds = time.perf_counter() - start
    # Re-read: another compare may have finished a family into this workdir meanwhile.
    runs = _load_runs(args.workdir)
    rec = runs.get(family, {"seconds": 0.0})
    # Resumed runs add up, so the table reports the total training wall time.
    shown = ["python", *argv[1:3], "--config", os.path.relpath(argv[4]), *argv[5:]]
    runs[family] = {"command": " ".join(shown), "returncode": rc,
                    "seconds": (0.0 if fresh else rec.get("seconds", 0.0)) + seconds}
    _save_runs(args.workdir, runs)
    if rc != 0:
      failed += 1
      last = manifest.error_line(log)
      why = f" ({last[len('error:'):].strip()})" if last.startswith("error:") else ""
      print(f"error: {family} exited with {rc}{why}; see {log}", file=sys.stderr, flush=True)
  return failed


def _title(args: argparse.Namespace) -> str:
  """``task, size S``; under --report_only S is the one the runs' commands recorded."""
  size = args.size
  if args.report_only:
    recorded = {m.group(1) for rec in _load_runs(args.workdir).values()
                for m in [re.search(r"[:,]size=(\w+)", rec.get("command", ""))] if m}
    if len(recorded) != 1:
      return args.task
    size = recorded.pop()
  return f"{args.task}, size {size}"


def main(argv: Sequence[str] | None = None) -> int:
  parser = _parser()
  args, extra = parser.parse_known_args(argv)
  try:
    chosen = _check(args, extra)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  failed = 0 if args.report_only else train_all(args, chosen, extra)
  if not os.path.isdir(args.workdir):
    print(f"error: --workdir {args.workdir} does not exist; run without --report_only first.",
          file=sys.stderr)
    return 2
  # Families run earlier into the same workdir stay in the report.
  shown = [f for f in compare_config.families(args.task)
           if f in chosen or os.path.isdir(os.path.join(args.workdir, f))]
  md = comparison_report.write(args.workdir, shown, runs=_load_runs(args.workdir),
                               title=_title(args))
  print(md)
  print(f"wrote {os.path.join(args.workdir, 'compare.md')} and compare_*.png", flush=True)
  return 1 if failed else 0


if __name__ == "__main__":
  from attention import huge_pages
  huge_pages.reexec_with_huge_pages()
  sys.exit(main())
