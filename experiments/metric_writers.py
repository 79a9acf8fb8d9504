"""Metric logging: TensorBoard events plus a crash-safe ``metrics.jsonl``.

:class:`MetricWriter` sends scalars, images and text to TensorBoard (through
``tensorboardX``, which needs no TensorFlow) and, for evaluations, also
appends one JSON object per call to ``workdir/metrics.jsonl``::

  {"step": 2000, "eval/loss": 2.31, "eval/bleu": 17.4}

The JSON log is the machine-readable record that comparison scripts read
(:func:`read_metrics`); TensorBoard is for looking at curves.

Crash safety and resume. Each JSON line is written with one ``write`` call,
then flushed and ``fsync``-ed, so a killed process loses at most the line in
flight. When a writer is created with ``resume_step=s`` it rewrites the file
(atomically) without the lines for steps after ``s`` (the run will recompute
them) and without a torn last line, keeping the previous file as
``metrics.jsonl.before-resume-<n>``, and it skips later writes for steps that
the file already held, so a resumed run never duplicates a step. TensorBoard
gets ``purge_step=s + 1``, which makes it hide the stale events the crashed
run wrote after the checkpoint.

Multi-host: only the primary process (``jax.process_index() == 0``) should
write; a writer built with ``is_primary=False`` does nothing at all.

Non-finite values are stored as the strings ``"NaN"``, ``"Infinity"`` and
``"-Infinity"`` to keep every line strict JSON; ``float()`` reads them back.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np

__all__ = ["MetricWriter", "read_metrics", "METRICS_FILE"]

METRICS_FILE = "metrics.jsonl"


def _to_float(value: Any) -> float:
  """A Python float from a Python/numpy/JAX scalar (raises for non-scalars)."""
  array = np.asarray(value)
  if array.size != 1:
    raise TypeError(f"metric values must be scalars, got shape {array.shape}")
  return float(array.reshape(()))


def _json_value(value: Any) -> Any:
  if isinstance(value, (str, bool)) or value is None:
    return value
  array = np.asarray(value)
  if array.size == 1 and np.issubdtype(array.dtype, np.integer):
    return int(array.reshape(()))
  x = _to_float(array)
  if math.isfinite(x):
    return x
  return "NaN" if math.isnan(x) else ("Infinity" if x > 0 else "-Infinity")


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
  """Reads a ``metrics.jsonl`` (or the workdir holding it), skipping a torn last line.

  Args:
    path: The file, or a directory containing :data:`METRICS_FILE`.

  Returns:
    The records in file order; missing file -> ``[]``.
  """
  path = Path(path)
  if path.is_dir():
    path = path / METRICS_FILE
  if not path.is_file():
    return []
  records = []
  for line in path.read_text(encoding="utf-8").splitlines():
    try:
      record = json.loads(line)
    except json.JSONDecodeError:
      continue  # only a crash mid-write produces these
    if isinstance(record, dict) and "step" in record:
      records.append(record)
  return records


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """Nested mappings -> ``{"a.b.c": leaf}``."""
  out = {}
  for key, value in tree.items():
    name = f"{prefix}{key}"
    if isinstance(value, Mapping):
      out.update(flatten(value, name + "."))
    else:
      out[name] = value
  return out


def free_path(pattern: str | os.PathLike) -> Path:
  """``pattern`` (a path with one ``{}``) with the first n = 1, 2, ... that does not exist."""
  n = 1
  while Path(str(pattern).format(n)).exists():
    n += 1
  return Path(str(pattern).format(n))


class MetricWriter:
  """Writes TensorBoard summaries and the eval ``metrics.jsonl`` of one run.

  Args:
    workdir: Run directory; ``metrics.jsonl`` lives here and the event files
      in ``workdir/<tensorboard_subdir>``.
    is_primary: Whether this process writes (``jax.process_index() == 0``);
      other processes get a writer whose methods do nothing.
    resume_step: The step the run restarts from (its checkpoint's step), or
      None for a run that starts fresh and keeps any existing lines.
    tensorboard_subdir: Event file directory below ``workdir`` ("" = workdir).

  Example::

    writer = MetricWriter(workdir, is_primary=jax.process_index() == 0,
                          resume_step=restored_step)
    writer.write_scalars(step, {"train/loss": 2.3, "train/lr": 1e-3})
    writer.write_eval(step, {"eval/loss": 2.1, "eval/bleu": 19.0})
    writer.write_images(step, {"alignment/0": image_uint8_hwc})
    writer.close()
  """

  def __init__(self, workdir: str | os.PathLike, *, is_primary: bool = True,
               resume_step: int | None = None, tensorboard_subdir: str = "tensorboard"):
    self.is_primary = bool(is_primary)
    self.workdir = Path(workdir)
    self.jsonl_path = self.workdir / METRICS_FILE
    self._writer = None
    self._done_steps: set[int] = set()
    if not self.is_primary:
      return
    self.workdir.mkdir(parents=True, exist_ok=True)
    self._done_steps = self._repair_jsonl(resume_step)
    from tensorboardX import SummaryWriter  # heavy import, primary process only

    purge = None if resume_step is None else int(resume_step) + 1
    # tensorboardX names event files by the second; a suffix keeps a quick
    # restart from reopening (and truncating) the previous run's file while
    # keeping the files in creation order, which purge_step relies on.
    self._writer = SummaryWriter(str(self.workdir / tensorboard_subdir), purge_step=purge,
                                 filename_suffix=f".{time.time_ns()}")

  def _repair_jsonl(self, resume_step: int | None) -> set[int]:
    """Drops torn lines (and steps after ``resume_step``); returns the steps kept."""
    if not self.jsonl_path.is_file():
      return set()
    raw = self.jsonl_path.read_text(encoding="utf-8")
    kept = [r for r in read_metrics(self.jsonl_path)
            if resume_step is None or r["step"] <= resume_step]
    lines = [json.dumps(r, allow_nan=False) + "\n" for r in kept]
    if "".join(lines) != raw:
      dropped = len([line for line in raw.splitlines() if line.strip()]) - len(kept)
      backup = free_path(self.jsonl_path.with_name(METRICS_FILE + ".before-resume-{}"))
      backup.write_text(raw, encoding="utf-8")  # the records a resumed run recomputes
      logging.warning("metrics.jsonl: keeping %d records, dropping %d after step %s (the"
                      " previous file is kept as %s)", len(kept), dropped, resume_step,
                      backup.name)
      tmp = self.jsonl_path.with_name(self.jsonl_path.name + ".tmp")
      with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(lines)
        f.flush()
        os.fsync(f.fileno())
      os.replace(tmp, self.jsonl_path)
    return {int(r["step"]) for r in kept}

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    """TensorBoard scalars ``{tag: number}`` (not added to ``metrics.jsonl``)."""
    if self._writer is None:
      return
    for tag, value in scalars.items():
      self._writer.add_scalar(tag, _to_float(value), int(step))

  def write_eval(self, step: int, metrics: Mapping[str, Any]) -> bool:
    """Writes scalars to TensorBoard and one ``metrics.jsonl`` line.

    Put everything measured at one evaluation into a single call: each call
    is one line. Keys are used as given (e.g. ``"eval/loss"``); string values
    go to the JSON line only.

    Args:
      step: Training step of the evaluation.
      metrics: ``{name: scalar or str}``.

    Returns:
      True if the line was written, False if this step was already in the
      file before a resume (or this writer is not the primary one).
    """
    if self._writer is None:
      return False
    step = int(step)
    if step in self._done_steps:
      logging.info("metrics.jsonl already has step %d; not writing it again", step)
      return False
    self.write_scalars(step, {k: v for k, v in metrics.items() if not isinstance(v, str)})
    record = {"step": step, **{k: _json_value(v) for k, v in metrics.items()}}
    line = json.dumps(record, allow_nan=False) + "\n"
    with open(self.jsonl_path, "a", encoding="utf-8") as f:
      f.write(line)
      f.flush()
      os.fsync(f.fileno())
    return True

  def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
    """TensorBoard images ``{tag: uint8 [H, W, 3|4] or [N, H, W, 3|4]}``."""
    if self._writer is None:
      return
    for tag, image in images.items():
      image = np.asarray(image)
      if image.ndim == 4:
        self._writer.add_images(tag, image, int(step), dataformats="NHWC")
      elif image.ndim == 3:
        self._writer.add_image(tag, image, int(step), dataformats="HWC")
      else:
        raise ValueError(f"image {tag!r} must be [H, W, C] or [N, H, W, C], got "
                         f"shape {image.shape}")

  def write_image(self, step: int, tag: str, image: np.ndarray) -> None:
    """One TensorBoard image (see :meth:`write_images`)."""
    self.write_images(step, {tag: image})

  def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
    """TensorBoard text summaries (rendered as Markdown)."""
    if self._writer is None:
      return
    for tag, text in texts.items():
      self._writer.add_text(tag, str(text), int(step))

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    """Records the run configuration as a Markdown table (text tag ``hparams``).

    Nested mappings are flattened with dotted keys. A text summary rather
    than TensorBoard's HParams plugin: the plugin needs the final metrics up
    front and writes to a separate run directory.
    """
    if self._writer is None:
      return
    rows = [f"| `{k}` | `{v}` |" for k, v in sorted(flatten(hparams).items())]
    self._writer.add_text("hparams", "\n".join(["| name | value |", "|---|---|"] + rows), 0)

  def flush(self) -> None:
    """Pushes buffered TensorBoard events to disk (JSON lines are never buffered)."""
    if self._writer is not None:
      self._writer.flush()

  def close(self) -> None:
    """Flushes and closes; further writes are ignored."""
    if self._writer is not None:
      self._writer.close()
      self._writer = None

  def __enter__(self) -> "MetricWriter":
    return self

  def __exit__(self, *exc: Any) -> None:
    self.close()
