"""Figures: attention heatmaps (Bahdanau et al. 2015, Fig. 3) and metric vs. length (Fig. 2).

Everything renders through matplotlib's Agg canvas on explicit ``Figure``
objects, never through ``pyplot``: no global figure registry to leak memory
over a long training run, no dependence on the process's backend setting,
and safe to call from a background thread.

Heatmaps put the source (attended) tokens on the x axis, read along the top
as in the paper, and the target tokens on the y axis; weight 1 is white and
0 black.
"""

from __future__ import annotations

import io
import logging
import math
import os
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = ["heatmap_figure", "heatmap_png", "heatmap_image", "save_alignment_plots",
           "metric_vs_length_figure", "plot_metric_vs_length", "figure_png",
           "figure_image"]

_CELL_INCHES = 0.28
_MAX_INCHES = 24.0


def _labels(tokens: Sequence[str]) -> list[str]:
  # Tokens are data, not markup: "$" would otherwise start mathtext.
  return [str(t).replace("$", r"\$") for t in tokens]


def figure_png(fig: Figure, dpi: int = 100) -> bytes:
  """Encodes a figure as PNG bytes."""
  buf = io.BytesIO()
  FigureCanvasAgg(fig)  # attaches an Agg canvas, which savefig renders with
  fig.savefig(buf, format="png", dpi=dpi)
  return buf.getvalue()


def figure_image(fig: Figure, dpi: int = 100) -> np.ndarray:
  """Rasterises a figure to ``uint8 [H, W, 3]`` RGB."""
  fig.set_dpi(dpi)
  canvas = FigureCanvasAgg(fig)
  canvas.draw()
  return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def heatmap_figure(matrix: Any, src_tokens: Sequence[str], tgt_tokens: Sequence[str],
                   title: str = "") -> Figure:
  """An alignment heatmap.

  Args:
    matrix: ``[T, S]`` weights; row ``t`` is target token ``t``'s
      distribution over the ``S`` source tokens.
    src_tokens: ``S`` x-axis labels (empty, or a wrong count with a
      warning: no labels).
    tgt_tokens: ``T`` y-axis labels (likewise).
    title: Figure title.

  Returns:
    A matplotlib ``Figure`` sized to the matrix.
  """
  matrix = np.asarray(matrix, dtype=np.float32)
  if matrix.ndim != 2:
    raise ValueError(f"alignment matrix must be [T, S], got shape {matrix.shape}")
  t, s = matrix.shape
  src_tokens = [] if src_tokens is None else list(src_tokens)
  tgt_tokens = [] if tgt_tokens is None else list(tgt_tokens)
  for name, labels, n in (("src_tokens", src_tokens, s), ("tgt_tokens", tgt_tokens, t)):
    if labels and len(labels) != n:
      # A mislabelled axis would mislead; an unlabelled one only loses detail,
      # and a plot is never worth crashing a training run for.
      logging.warning("heatmap %r: %d %s for an axis of size %d; leaving it unlabelled",
                      title, len(labels), name, n)
      labels.clear()
  width = min(_MAX_INCHES, max(3.0, 1.6 + _CELL_INCHES * s))
  height = min(_MAX_INCHES, max(3.0, 1.6 + _CELL_INCHES * t + (0.4 if title else 0.0)))
  fig = Figure(figsize=(width, height))
  ax = fig.add_subplot(1, 1, 1)
  ax.imshow(matrix, cmap="gray", vmin=0.0, vmax=1.0, aspect="auto",
            interpolation="nearest")
  # Shrink labels once cells get smaller than the default font.
  fontsize = max(4.0, min(9.0, 9.0 * 40.0 / max(s, t, 40)))
  ax.xaxis.tick_top()
  ax.set_xticks(range(s))
  ax.set_yticks(range(t))
  ax.set_xticklabels(_labels(src_tokens) if src_tokens else [], rotation=90,
                     fontsize=fontsize)
  ax.set_yticklabels(_labels(tgt_tokens) if tgt_tokens else [], fontsize=fontsize)
  ax.tick_params(length=0)
  if title:
    ax.set_title(title, fontsize=10, pad=8)
  fig.tight_layout()
  return fig


def heatmap_png(matrix: Any, src_tokens: Sequence[str], tgt_tokens: Sequence[str],
                title: str = "", dpi: int = 100) -> bytes:
  """:func:`heatmap_figure` encoded as PNG bytes."""
  return figure_png(heatmap_figure(matrix, src_tokens, tgt_tokens, title), dpi)


def heatmap_image(matrix: Any, src_tokens: Sequence[str], tgt_tokens: Sequence[str],
                  title: str = "", dpi: int = 100) -> np.ndarray:
  """:func:`heatmap_figure` as ``uint8 [H, W, 3]`` (e.g. for TensorBoard images)."""
  return figure_image(heatmap_figure(matrix, src_tokens, tgt_tokens, title), dpi)


def _safe(name: str) -> str:
  return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "attention"


def _atomic_write(path: Path, data: bytes) -> None:
  tmp = path.with_name(f".{path.name}.tmp")
  tmp.write_bytes(data)
  os.replace(tmp, path)


def save_alignment_plots(examples: Sequence[Any], out_dir: str | os.PathLike, step: int,
                         *, prefix: str = "alignment", dpi: int = 100) -> list[str]:
  """Writes one PNG per example and alignment matrix.

  File names are ``{prefix}_step{step:08d}_ex{i:02d}_{name}.png``, so
  re-plotting a step replaces only that step's files.

  Args:
    examples: ``(src_tokens, tgt_tokens, {name: [T, S]})`` items, e.g. from
      :func:`experiments.evaluate.alignment_examples`; an item with a
      ``columns`` attribute ``{name: x labels}`` (as those have) labels each
      matrix's x axis with it, e.g. target tokens for self-attention.
    out_dir: Directory (created if missing), e.g. ``workdir/plots``.
    step: Training step, for the file names and titles.
    prefix: File name prefix.
    dpi: Resolution.

  Returns:
    The written paths, in example then matrix order.
  """
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  paths = []
  for i, example in enumerate(examples):
    src_tokens, tgt_tokens, matrices = example[0], example[1], example[2]
    columns = getattr(example, "columns", {}) or {}
    for name, matrix in matrices.items():
      path = out / f"{prefix}_step{int(step):08d}_ex{i:02d}_{_safe(name)}.png"
      png = heatmap_png(matrix, columns.get(name, src_tokens), tgt_tokens,
                        title=f"{name} (step {step}, example {i})", dpi=dpi)
      _atomic_write(path, png)
      paths.append(str(path))
  return paths


def _series(buckets: Any) -> dict[str, Sequence[Mapping[str, Any]]]:
  if isinstance(buckets, Mapping):
    return dict(buckets)
  return {"": buckets}


def metric_vs_length_figure(buckets: Any, *, metrics: Sequence[str] = ("bleu", "exact_match"),
                            title: str = "") -> Figure:
  """BLEU / exact match per source-length bucket, one panel per metric.

  Args:
    buckets: One run's bucket list (``decode_and_score(...)["buckets"]``:
      dicts with ``label``, ``count`` and the metrics), or ``{run name:
      bucket list}`` to compare runs as in Bahdanau et al.'s Fig. 2.
    metrics: Bucket keys to plot; missing keys are skipped.
    title: Figure title.

  Returns:
    The figure. Empty buckets (count 0 or NaN) are left out of the lines.
  """
  series = _series(buckets)
  present = [m for m in metrics if any(m in b for bs in series.values() for b in bs)]
  if not present:
    raise ValueError(f"buckets contain none of the metrics {list(metrics)}")
  fig = Figure(figsize=(5.0 * len(present), 3.8))
  labels = next(iter(series.values()))
  labels = [str(b.get("label", i)) for i, b in enumerate(labels)]
  for col, metric in enumerate(present):
    ax = fig.add_subplot(1, len(present), col + 1)
    for run, bs in series.items():
      xs, ys = [], []
      for i, b in enumerate(bs):
        value = b.get(metric)
        if b.get("count", 1) and value is not None and math.isfinite(float(value)):
          xs.append(i)
          ys.append(float(value))
      ax.plot(xs, ys, marker="o", label=run or None)
      if len(series) == 1:
        for x, y in zip(xs, ys):
          ax.annotate(f"n={bs[x].get('count', '?')}", (x, y), textcoords="offset points",
                      xytext=(0, 6), ha="center", fontsize=7)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=30, fontsize=8)
    ax.set_xlabel("source length")
    ax.set_ylabel({"bleu": "BLEU"}.get(metric, metric.replace("_", " ")))
    ax.grid(alpha=0.3)
    if len(series) > 1:
      ax.legend(fontsize=8)
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  return fig


def plot_metric_vs_length(buckets: Any, path: str | os.PathLike, *,
                          metrics: Sequence[str] = ("bleu", "exact_match"),
                          title: str = "", dpi: int = 100) -> str:
  """Saves :func:`metric_vs_length_figure` as a PNG at ``path``; returns the path."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  _atomic_write(path, figure_png(metric_vs_length_figure(buckets, metrics=metrics,
                                                         title=title), dpi))
  return str(path)
