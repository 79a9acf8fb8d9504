"""Tables and plots that put finished runs side by side (compare and the reproductions).

Everything here reads run directories only (``config.json`` and ``metrics.jsonl``),
so a report can be rebuilt at any time, on any machine that has the directories.
"""

from __future__ import annotations

import datetime
import functools
import json
import math
import os
import re
from typing import Any, Mapping, Sequence

from experiments.metric_writers import read_metrics
from launch import manifest as mf
from launch.sweep_spec import join_workdir

_BUCKET = re.compile(r"^(eval|test)_by_length/(bleu|exact_match|count)_(.+)$")


class Run:
  """One finished (or partly finished) run directory.

  Attributes:
    label: Name shown in tables and legends.
    workdir: The run directory.
    config: ``config.json`` as a dict ({} if missing).
    history: Every ``metrics.jsonl`` record, in step order.
    final: The records of the last step merged into one dict ({} if none).
  """

  def __init__(self, label: str, workdir: str):
    self.label, self.workdir = label, workdir
    path = os.path.join(workdir, "config.json")
    self.config: dict[str, Any] = {}
    if os.path.exists(path):
      with open(path) as f:
        self.config = json.load(f)
    metrics = os.path.join(workdir, "metrics.jsonl")
    self.history = sorted(read_metrics(metrics), key=lambda r: r.get("step", 0)) \
        if os.path.exists(metrics) else []
    self.final: dict[str, Any] = {}
    if self.history:
      last = self.history[-1]["step"]
      for rec in self.history:
        if rec["step"] == last:
          self.final.update(rec)

  @functools.cached_property
  def incomplete(self) -> str:
    """``""`` when the last eval is at ``num_train_steps``, else ``"step S/N"``.

    A run that failed or was stopped keeps the metrics of its last eval; tables
    mark it rather than show those as final.
    """
    total = (mf.run_config(self.workdir) or {}).get("num_train_steps")
    step = self.final.get("step")
    # The step of the records this table shows (read_metrics skips a torn line).
    if total is None or step is None or int(step) >= int(total):
      return ""
    return f"step {step}/{total}"

  @property
  def display(self) -> str:
    """``label``, with ``(incomplete: step S/N)`` for an unfinished run."""
    return f"{self.label} (incomplete: {self.incomplete})" if self.incomplete else self.label

  @property
  def model(self) -> str:
    return str(self.config.get("model", {}).get("name", "?"))

  @property
  def is_lm(self) -> bool:
    return self.model.endswith("_lm")

  @property
  def synthetic(self) -> bool:
    return self.config.get("data", {}).get("name") not in ("multi30k", "parallel", "text")

  def get(self, key: str) -> float | None:
    v = self.final.get(key)
    return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None

  def by_length(self, metric: str, split: str = "test") -> dict[str, tuple[float, int]]:
    """``{"0-9": (value, count), ...}`` in bucket order, from the final record."""
    values: dict[str, dict[str, float]] = {}
    for key, v in self.final.items():
      m = _BUCKET.match(key)
      if m and m.group(1) == split:
        values.setdefault(m.group(3), {})[m.group(2)] = v
    order = sorted(values, key=lambda lab: float(lab.split("-")[0].rstrip("+")))
    return {lab: (values[lab].get(metric, float("nan")), int(values[lab].get("count", 0)))
            for lab in order}


def find_runs(root: str, names: Sequence[str] | None = None) -> list[Run]:
  """Runs under ``root``: a launch.sweep directory (``sweep.json``) or one sub-directory each.

  Args:
    root: The directory.
    names: Sub-directories to take, in this order (default: every one that has
      ``metrics.jsonl`` or ``config.json``, sorted; for a sweep, its trial order).
  """
  sweep = os.path.join(root, "sweep.json")
  if os.path.exists(sweep):
    with open(sweep) as f:
      trials = json.load(f)["trials"]
    # Trial k lives in root/<name>. The recorded path is relative to wherever the
    # sweep was launched, and a copied or moved sweep's recorded paths point at
    # the original: it is only the fallback (custom layouts).
    runs = [Run(name, join_workdir(root, name) if os.path.isdir(join_workdir(root, name))
                else rec["workdir"]) for name, rec in trials.items()]
    return [r for r in runs if names is None or r.label in names]
  if names is None:
    names = sorted(d for d in os.listdir(root) if any(
        os.path.exists(os.path.join(root, d, f)) for f in ("metrics.jsonl", "config.json")))
  return [Run(n, os.path.join(root, n)) for n in names]


def wall_seconds(root: str) -> dict[str, float]:
  """``{run label: training wall seconds}``.

  From ``experiments.compare``'s ``compare.json``, or else from a sweep's
  ``sweep.json`` (a trial's last attempt, start to end; a resumed trial's
  earlier attempts are not in it).
  """
  path = os.path.join(root, "compare.json")
  if os.path.exists(path):
    with open(path) as f:
      return {k: v.get("seconds") for k, v in json.load(f).items()}
  path = os.path.join(root, "sweep.json")
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    trials = json.load(f).get("trials", {})
  out = {}
  for name, rec in trials.items():
    try:
      start = datetime.datetime.fromisoformat(rec["start_time"])
      end = datetime.datetime.fromisoformat(rec["end_time"])
    except (KeyError, TypeError, ValueError):
      continue
    out[name] = (end - start).total_seconds()
  return out


def fmt(v: float | None, digits: int = 3) -> str:
  """``digits`` significant digits, trailing zeros kept (30.98 is "31.0", not "31"),
  up to 6 where rounding would carry into the next power of ten (0.9996 is not
  shown as 1; 0.99999999 still is), ``M`` from 1e5."""
  if v is None or (isinstance(v, float) and math.isnan(v)):
    return "–"
  if abs(v) >= 1e5:
    return f"{v / 1e6:.2f}M"
  if abs(v) >= 1000:
    return f"{v:.0f}"
  if v == 0:
    return "0"
  # "#" keeps the trailing zeros that say how precise a number is; a bare
  # trailing "." (146. for 145.5) is dropped.
  show = lambda d: f"{v:#.{d}g}".rstrip(".")  # noqa: E731
  # More digits where rounding carries into the next power of ten (an accuracy
  # of 0.9996 shown as "1.00", a BLEU of 99.96 as "100": a perfect score it is not).
  magnitude = lambda x: math.floor(math.log10(abs(x)))  # noqa: E731
  for d in range(digits, 7):
    if magnitude(float(show(d))) <= magnitude(v):
      return show(d)
  return show(digits)


def markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(r) + " |" for r in rows]
  return "\n".join(lines)


def length_metric(runs: Sequence[Run]) -> str:
  """exact_match (sequence accuracy) on synthetic tasks, BLEU on real text."""
  return "exact_match" if runs and all(r.synthetic for r in runs) else "bleu"


def summary_table(runs: Sequence[Run], seconds: Mapping[str, float] | None = None) -> str:
  """One row per run: size, cost and the final metrics that the task has."""
  seconds = seconds or {}
  lm = bool(runs) and all(r.is_lm for r in runs)
  header = ["run", "model", "params", "steps", "wall s", "train loss", "eval loss"]
  if lm:
    header += ["eval ppl", "bits/token", "eval acc"]
  else:
    header += ["eval acc", "eval seq acc", "eval BLEU", "test BLEU", "test exact"]
  rows = []
  for r in runs:
    loss = r.get("eval/loss")
    row = [r.display, r.model, fmt(r.get("model/num_params")),
           str(r.final.get("step", "–")), fmt(seconds.get(r.label), 4),
           fmt(r.get("train/loss")), fmt(loss)]
    if lm:
      row += [fmt(r.get("eval/perplexity")),
              fmt(loss / math.log(2) if loss is not None else None), fmt(r.get("eval/accuracy"))]
    else:
      row += [fmt(r.get("eval/accuracy")), fmt(r.get("eval/sequence_accuracy")),
              fmt(r.get("eval/bleu")), fmt(r.get("test/bleu")), fmt(r.get("test/exact_match"))]
    rows.append(row)
  return markdown(header, rows)


def _bucket_order(label: str) -> float:
  return float(label.split("-")[0].rstrip("+"))


def length_buckets(runs: Sequence[Run], metric: str, split: str = "test") -> dict[str, str]:
  """``{bucket: "n"}`` over every run, in length order; ``"a/b"`` where runs' counts differ."""
  counts: dict[str, list[int]] = {}
  for r in runs:
    for lab, (_, n) in r.by_length(metric, split).items():
      counts.setdefault(lab, [])
      if n not in counts[lab]:
        counts[lab].append(n)
  return {lab: "/".join(map(str, counts[lab])) for lab in sorted(counts, key=_bucket_order)}


def length_table(runs: Sequence[Run], metric: str, split: str = "test") -> str:
  """Runs x source-length buckets, with the bucket sizes in the header."""
  buckets = length_buckets(runs, metric, split)
  if not buckets:
    return ""
  header = [f"{split} {metric} by source length"] + [f"{lab} (n={n})" for lab, n in buckets.items()]
  rows = []
  for r in runs:
    values = r.by_length(metric, split)
    rows.append([r.display] + [fmt(values[lab][0] if lab in values else None) for lab in buckets])
  return markdown(header, rows)


def _line_plot(series: Mapping[str, tuple[Sequence[Any], Sequence[float]]], path: str, *,
               xlabel: str, ylabel: str, title: str,
               xticks: Sequence[str] | None = None) -> bool:
  """One line per ``{label: (xs, ys)}``; writes ``path`` and returns True if any line.

  With ``xticks``, xs are positions in it and the ticks are labelled with it.
  """
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  series = {k: v for k, v in series.items() if len(v[0])}
  if series:
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for label, (xs, ys) in series.items():
      ax.plot(list(xs), list(ys), marker="o", label=label)
    if xticks is not None:
      ax.set_xticks(range(len(xticks)), list(xticks))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
  return bool(series)


def plot_by_length(runs: Sequence[Run], metric: str, path: str, split: str = "test",
                   title: str = "") -> bool:
  """Bahdanau Fig. 2 style: one line per run, metric against source length."""
  # Numeric positions in one shared bucket order: string xs would be placed in
  # order of first appearance, which differs when runs lack different buckets.
  order = list(length_buckets(runs, metric, split))
  series = {}
  for r in runs:
    values = r.by_length(metric, split)
    series[r.display] = ([order.index(lab) for lab in values], [v for v, _ in values.values()])
  return _line_plot(series, path, xlabel="source length (tokens)",
                    ylabel=f"{split} {metric.replace('_', ' ')}", title=title, xticks=order)


def plot_curves(runs: Sequence[Run], key: str, path: str, title: str = "") -> bool:
  """``key`` (e.g. ``eval/loss``) against training step, one line per run."""
  series = {}
  for r in runs:
    pts = [(rec["step"], rec[key]) for rec in r.history if isinstance(rec.get(key), (int, float))]
    series[r.display] = (tuple(p[0] for p in pts), tuple(p[1] for p in pts))
  return _line_plot(series, path, xlabel="step", ylabel=key, title=title)


def write(root: str, names: Sequence[str] | None = None, *, runs: Mapping[str, Any] | None = None,
          title: str = "") -> str:
  """Writes ``root/compare.md`` and ``root/compare_{by_length,eval_loss}.png``; returns the Markdown."""
  found = [r for r in find_runs(root, names) if r.history]
  seconds = {k: v.get("seconds") for k, v in (runs or {}).items()}
  parts = [f"# Comparison: {title or root}", "", summary_table(found, seconds), ""]
  if found and not all(r.is_lm for r in found):
    metric = length_metric(found)
    table = length_table(found, metric)
    if table:
      parts += [table, ""]
    if plot_by_length(found, metric, os.path.join(root, "compare_by_length.png"),
                      title=title):
      parts += ["![by length](compare_by_length.png)", ""]
  if plot_curves(found, "eval/loss", os.path.join(root, "compare_eval_loss.png"), title=title):
    parts += ["![eval loss](compare_eval_loss.png)", ""]
  missing = [n for n in (names or []) if n not in {r.label for r in found}]
  missing += [f"{r.label} ({r.incomplete}: its last eval is shown)" for r in found if r.incomplete]
  if missing:
    parts += [f"Not finished: {', '.join(missing)}.", ""]
  commands = [f"    {v['command']}" for v in (runs or {}).values() if v.get("command")]
  if commands:
    parts += ["Commands:", ""] + commands + [""]
  md = "\n".join(parts)
  with open(os.path.join(root, "compare.md"), "w") as f:
    f.write(md)
  return md
