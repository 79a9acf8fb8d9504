"""``python -m launch.sweep report SWEEP_DIR``: one row per trial, best one marked.

    python -m launch.sweep report runs/sweep [--metric eval/accuracy] [--mode max|min] [--x FIELD]

Prints a Markdown table and writes ``report.md``, ``report.csv`` (every metric of
the last ``metrics.jsonl`` line, by-length breakdowns included) and
``report_<metric>.png`` (the metric against one swept field) into SWEEP_DIR.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import sys
from typing import Any, Sequence

from launch import manifest as mf
from launch.sweep_spec import join_workdir

BEST = "*"


def load_rows(sweep_dir: str) -> list[dict[str, Any]]:
  """The manifest's trials, each with the final metrics found in its workdir."""
  path = os.path.join(sweep_dir, "sweep.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found; is {sweep_dir} a launch.sweep directory?")
  with open(path) as f:
    trials = json.load(f)["trials"]
  rows = []
  for name, rec in trials.items():
    # The trial's folder under sweep_dir first: the recorded path is relative to
    # where the sweep was launched, and a copied sweep's points at the original.
    local = join_workdir(sweep_dir, name)
    workdir = local if os.path.isdir(local) else rec["workdir"]
    rows.append({**rec, "name": name, "workdir": workdir,
                 "metrics": mf.last_metrics(workdir) or {}})
  return rows


def swept_fields(rows: Sequence[dict[str, Any]]) -> list[str]:
  fields: list[str] = []
  for r in rows:
    fields += [k for k in r["overrides"] if k not in fields]
  return fields


def default_mode(metric: str) -> str:
  """Losses and perplexities are minimised, accuracies and BLEU maximised."""
  return "min" if any(w in metric for w in ("loss", "perplexity", "error")) else "max"


def best_trial(rows: Sequence[dict[str, Any]], metric: str, mode: str) -> str | None:
  """Name of the best finished trial by ``metric``; None when no finished trial has it."""
  best, best_value = None, None
  for r in rows:   # ties go to the earlier trial in sweep order
    value = r["metrics"].get(metric)
    if r.get("status") != mf.DONE or not _is_number(value):
      continue
    if best_value is None or (value < best_value if mode == "min" else value > best_value):
      best, best_value = r["name"], value
  return best


def _fmt(value: Any) -> str:
  if isinstance(value, float):
    return f"{value:.4g}"
  return "" if value is None else str(value)


def _note(row: dict[str, Any]) -> str:
  if row.get("status") == mf.DONE:
    return ""
  parts = [f"exit {row['returncode']}" if row.get("returncode") is not None else "",
           f"log: {row['log']}" if row.get("log") else ""]
  return "; ".join(p for p in parts if p)


def table_columns(rows: Sequence[dict[str, Any]]) -> list[str]:
  """Headline metrics: everything in the last line except the by-length breakdowns."""
  cols: list[str] = []
  for r in rows:
    cols += [k for k in r["metrics"] if k != "step" and "_by_length/" not in k and k not in cols]
  return cols


def markdown(rows: Sequence[dict[str, Any]], fields: Sequence[str], metric: str, mode: str,
             best: str | None) -> str:
  cols = table_columns(rows)
  header = ["best", "trial", *fields, "status", "step", *cols, "notes"]
  lines = [f"Sweep report: {metric} ({mode}); best: {best or 'none'}", "",
           "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for r in rows:
    cells = [BEST if r["name"] == best else "", r["name"],
             *(_fmt(r["overrides"].get(f)) for f in fields), r.get("status", ""),
             _fmt(r["metrics"].get("step")), *(_fmt(r["metrics"].get(c)) for c in cols), _note(r)]
    lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
  failed = [r for r in rows if r.get("status") != mf.DONE]
  if failed:
    lines += ["", "Not done:"]
    lines += [f"- {r['name']}: {r.get('status')}, {r.get('error') or 'no error recorded'}"
              f" ({_note(r) or 'not started'})" for r in failed]
  return "\n".join(lines) + "\n"


def write_csv(path: str, rows: Sequence[dict[str, Any]], fields: Sequence[str],
              best: str | None) -> None:
  metric_cols: list[str] = []
  for r in rows:
    metric_cols += [k for k in r["metrics"] if k not in metric_cols]
  header = ["best", "trial", *fields, "status", "returncode", *metric_cols, "log", "error"]
  with open(path, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(header)
    for r in rows:
      w.writerow([BEST if r["name"] == best else "", r["name"],
                  *(r["overrides"].get(k, "") for k in fields), r.get("status", ""),
                  r.get("returncode", ""), *(r["metrics"].get(c, "") for c in metric_cols),
                  r.get("log", ""), r.get("error") or ""])


def _is_number(v: Any) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool)


def plot(path: str, rows: Sequence[dict[str, Any]], fields: Sequence[str], metric: str,
         x: str, best: str | None) -> bool:
  """``metric`` against swept field ``x``, one line per setting of the other swept fields.

  Returns:
    False (and writes nothing) when no trial has the metric.
  """
  pts = [r for r in rows if _is_number(r["metrics"].get(metric)) and x in r["overrides"]]
  if not pts:
    return False
  import matplotlib
  matplotlib.use("Agg")   # no display on servers and TPU VMs
  import matplotlib.pyplot as plt
  numeric = all(_is_number(r["overrides"][x]) for r in pts)
  cats = list(dict.fromkeys(str(r["overrides"][x]) for r in pts))
  xpos = (lambda v: v) if numeric else (lambda v: cats.index(str(v)))  # noqa: E731
  # One line per setting of the other swept fields, unless they move with x (a
  # zip_ sweep), where that would give one-point "lines".
  others = [f for f in fields if f != x
            and len({_fmt(r["overrides"].get(f)) for r in pts}) > 1]
  groups: dict[str, list[dict[str, Any]]] = {}
  for r in pts:
    label = ", ".join(f"{f}={_fmt(r['overrides'].get(f))}" for f in others) or metric
    groups.setdefault(label, []).append(r)
  if all(len(g) == 1 for g in groups.values()):
    groups = {metric: list(pts)}
  fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
  for label, group in groups.items():
    # Lines join finished trials; an unfinished one's last eval is a hollow mark.
    done = sorted((r for r in group if r.get("status") == mf.DONE),
                  key=lambda r: xpos(r["overrides"][x]))
    if done:
      ax.plot([xpos(r["overrides"][x]) for r in done], [r["metrics"][metric] for r in done],
              marker="o", label=label)
  late = [r for r in pts if r.get("status") != mf.DONE]
  if late:
    ax.plot([xpos(r["overrides"][x]) for r in late], [r["metrics"][metric] for r in late],
            marker="o", markerfacecolor="none", color="gray", linestyle="none",
            label="not finished (last eval)")
  for r in pts:
    if r["name"] == best:
      ax.plot([xpos(r["overrides"][x])], [r["metrics"][metric]], marker="*", markersize=16,
              color="gold", markeredgecolor="black", linestyle="none", label=f"best: {best}")
  xs = [r["overrides"][x] for r in pts]
  if numeric and min(xs) > 0 and max(xs) / min(xs) >= 10:
    ax.set_xscale("log")   # learning rates and friends are swept geometrically
  if not numeric:
    ax.set_xticks(range(len(cats)), cats)
  ax.set_xlabel(x)
  ax.set_ylabel(metric)
  ax.set_title(f"{metric} vs {x}")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
  return True


def main(argv: Sequence[str]) -> int:
  p = argparse.ArgumentParser(prog="python -m launch.sweep report", allow_abbrev=False,
                              description=__doc__.split("\n\n")[0])
  p.add_argument("sweep_dir")
  p.add_argument("--metric", default="eval/accuracy")
  p.add_argument("--mode", choices=("max", "min"), default=None,
                 help="default: min for losses/perplexities, else max")
  p.add_argument("--x", default=None, help="swept field on the plot's x axis (default: first)")
  args = p.parse_args(argv)
  try:
    rows = load_rows(args.sweep_dir)
  except (OSError, ValueError, KeyError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  fields = swept_fields(rows)
  x = args.x or (fields[0] if fields else None)
  if x is not None and x not in fields:
    print(f"error: --x {x}: not a swept field; use one of {fields}.", file=sys.stderr)
    return 2
  mode = args.mode or default_mode(args.metric)
  best = best_trial(rows, args.metric, mode)
  text = markdown(rows, fields, args.metric, mode, best)
  print(text, end="")
  written = [os.path.join(args.sweep_dir, n) for n in ("report.md", "report.csv")]
  with open(written[0], "w") as f:
    f.write(text)
  write_csv(written[1], rows, fields, best)
  png = os.path.join(args.sweep_dir, f"report_{re.sub(r'[^A-Za-z0-9._-]', '_', args.metric)}.png")
  if x is None:
    print("warning: no swept field to plot against; no plot.", file=sys.stderr)
  elif plot(png, rows, fields, args.metric, x, best):
    written.append(png)
  else:
    print(f"warning: no trial has {args.metric}; no plot.", file=sys.stderr)
  print(f"wrote {', '.join(written)}", file=sys.stderr)
  return 0
