"""Tests for experiments.plots (heatmaps, length plots) and experiments.metric_writers."""

from __future__ import annotations

import json
import logging
import struct
from pathlib import Path

import numpy as np
import pytest

from experiments import metric_writers, plots
from experiments.metric_writers import MetricWriter, read_metrics

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def png_size(data: bytes) -> tuple[int, int]:
  """(width, height) from a PNG's IHDR chunk."""
  assert data[:8] == PNG_MAGIC
  assert data[12:16] == b"IHDR"
  return struct.unpack(">II", data[16:24])


def strict_json(line: str) -> dict:
  def reject(token):
    raise ValueError(f"non-standard JSON constant {token}")
  return json.loads(line, parse_constant=reject)


def alignment(t: int, s: int, seed: int = 0) -> np.ndarray:
  w = np.random.default_rng(seed).random((t, s))
  return w / w.sum(axis=1, keepdims=True)


# --------------------------------------------------------------------------
# Plots.
# --------------------------------------------------------------------------
def test_heatmap_png_and_image_agree_in_size():
  matrix = alignment(4, 6)
  src, tgt = list("abcdef"), ["w", "x", "y", "</s>"]
  png = plots.heatmap_png(matrix, src, tgt, title="cross", dpi=50)
  width, height = png_size(png)
  fig = plots.heatmap_figure(matrix, src, tgt, title="cross")
  fig_w, fig_h = fig.get_size_inches()
  assert (width, height) == (round(fig_w * 50), round(fig_h * 50))
  image = plots.heatmap_image(matrix, src, tgt, title="cross", dpi=50)
  assert image.dtype == np.uint8 and image.shape == (height, width, 3)
  assert image.min() < 50 and image.max() > 200   # both dark and light cells/background


def test_heatmap_grows_with_tokens_and_survives_odd_labels():
  small = plots.heatmap_image(alignment(3, 3), list("abc"), list("xyz"), dpi=40)
  big = plots.heatmap_image(alignment(30, 40), [f"${i}" for i in range(40)],
                            ["▁tok"] * 30, dpi=40)
  assert big.shape[0] > small.shape[0] and big.shape[1] > small.shape[1]


def test_heatmap_wrong_label_count_warns_instead_of_failing(caplog):
  with caplog.at_level(logging.WARNING):
    png = plots.heatmap_png(alignment(2, 3), ["a", "b"], ["x", "y"], title="t")
  assert png[:8] == PNG_MAGIC
  assert "leaving it unlabelled" in caplog.text
  with pytest.raises(ValueError, match=r"\[T, S\]"):
    plots.heatmap_png(np.zeros((2, 3, 4)), [], [])


class _Example(tuple):
  """A (src, tgt, matrices) tuple carrying per-matrix x labels, like AlignmentExample."""

  def __new__(cls, src, tgt, matrices, columns):
    self = super().__new__(cls, (src, tgt, matrices))
    self.columns = columns
    return self


def test_save_alignment_plots_names_and_columns(tmp_path, caplog):
  examples = [
      (list("abc"), list("xy"), {"cross": alignment(2, 3)}),
      _Example(list("abcd"), list("xyz"),
               {"inter": alignment(3, 4), "intra": alignment(3, 3)},
               {"intra": ["<s>", "x", "y"]}),
  ]
  with caplog.at_level(logging.WARNING):
    paths = plots.save_alignment_plots(examples, tmp_path / "plots", step=1200)
  assert not caplog.text   # intra used its own 3 column labels, not the 4 source tokens
  names = [Path(p).name for p in paths]
  assert names == ["alignment_step00001200_ex00_cross.png",
                   "alignment_step00001200_ex01_inter.png",
                   "alignment_step00001200_ex01_intra.png"]
  for p in paths:
    assert Path(p).read_bytes()[:8] == PNG_MAGIC
  # Re-plotting the same step replaces its own files only.
  again = plots.save_alignment_plots(examples[:1], tmp_path / "plots", step=1200)
  assert again == paths[:1]
  assert sorted(x.name for x in (tmp_path / "plots").iterdir()) == sorted(names)


def test_plot_metric_vs_length(tmp_path):
  buckets = [{"label": "0-9", "count": 3, "bleu": 30.0, "exact_match": 0.5},
             {"label": "10-19", "count": 0, "bleu": float("nan"),
              "exact_match": float("nan")},
             {"label": "20+", "count": 2, "bleu": 10.0, "exact_match": 0.0}]
  path = plots.plot_metric_vs_length(buckets, tmp_path / "sub" / "bleu_by_length.png")
  data = Path(path).read_bytes()
  width, height = png_size(data)
  assert width > height > 100
  runs = {"rnnsearch": buckets, "rnnencdec": buckets}
  path2 = plots.plot_metric_vs_length(runs, tmp_path / "compare.png", metrics=("bleu",))
  assert png_size(Path(path2).read_bytes())[0] < width   # one panel instead of two
  with pytest.raises(ValueError, match="none of the metrics"):
    plots.metric_vs_length_figure(buckets, metrics=("rouge",))


# --------------------------------------------------------------------------
# Metric writer.
# --------------------------------------------------------------------------
def load_events(logdir: Path):
  from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
  acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "images": 0})
  acc.Reload()
  return acc


def test_writer_jsonl_and_tensorboard(tmp_path):
  image = np.zeros((6, 8, 3), np.uint8)
  image[:, :4] = 255
  with MetricWriter(tmp_path, is_primary=True) as writer:
    writer.write_scalars(10, {"train/loss": np.float32(2.5), "train/lr": 1e-3})
    assert writer.write_eval(100, {"eval/loss": 1.25, "eval/bleu": np.float64(20.0),
                                   "eval/count": np.int32(7), "eval/note": "ok"})
    assert writer.write_eval(200, {"eval/loss": float("nan"), "eval/ppl": float("inf")})
    writer.write_image(100, "alignments/0/cross", image)
    writer.write_texts(100, {"samples": "a -> b"})
    writer.write_hparams({"model": {"name": "transformer", "layers": 2}, "lr": 0.1})
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  records = [strict_json(line) for line in lines]
  assert records == [
      {"step": 100, "eval/loss": 1.25, "eval/bleu": 20.0, "eval/count": 7, "eval/note": "ok"},
      {"step": 200, "eval/loss": "NaN", "eval/ppl": "Infinity"}]
  assert float(records[1]["eval/ppl"]) == float("inf")
  assert read_metrics(tmp_path) == records

  acc = load_events(tmp_path / "tensorboard")
  assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [(10, 2.5)]
  assert [(e.step, e.value) for e in acc.Scalars("eval/bleu")] == [(100, 20.0)]
  assert "eval/note" not in acc.Tags()["scalars"]   # strings only go to the JSON line
  (img,) = acc.Images("alignments/0/cross")
  assert (img.step, img.width, img.height) == (100, 8, 6)
  assert img.encoded_image_string[:8] == PNG_MAGIC


def test_non_primary_writer_writes_nothing(tmp_path):
  workdir = tmp_path / "run"
  writer = MetricWriter(workdir, is_primary=False, resume_step=5)
  writer.write_scalars(1, {"a": 1.0})
  assert not writer.write_eval(1, {"eval/loss": 1.0})
  writer.write_images(1, {"img": np.zeros((2, 2, 3), np.uint8)})
  writer.write_texts(1, {"t": "x"})
  writer.write_hparams({"a": 1})
  writer.flush()
  writer.close()
  assert not workdir.exists()


def test_resume_truncates_and_never_duplicates_steps(tmp_path):
  first = MetricWriter(tmp_path)
  for step in (100, 200, 300):
    first.write_eval(step, {"eval/loss": step / 100})
  first.close()
  # A kill -9 mid-write leaves a torn last line.
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 400, "eval/lo')

  before = (tmp_path / "metrics.jsonl").read_text()
  resumed = MetricWriter(tmp_path, resume_step=200)
  assert [r["step"] for r in read_metrics(tmp_path)] == [100, 200]
  # The dropped records are not lost: the whole previous file is kept beside.
  assert (tmp_path / "metrics.jsonl.before-resume-1").read_text() == before
  assert not resumed.write_eval(200, {"eval/loss": 9.0})   # already recorded
  assert resumed.write_eval(300, {"eval/loss": 3.5})
  resumed.close()
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  assert [strict_json(line)["step"] for line in lines] == [100, 200, 300]
  assert strict_json(lines[-1])["eval/loss"] == 3.5

  # TensorBoard hides the stale step-300 event of the first run (purge_step).
  acc = load_events(tmp_path / "tensorboard")
  assert [(e.step, e.value) for e in acc.Scalars("eval/loss")] == [
      (100, 1.0), (200, 2.0), (300, 3.5)]

  # A fresh writer without resume_step keeps what is there and appends.
  again = MetricWriter(tmp_path)
  again.write_eval(400, {"eval/loss": 4.0})
  again.close()
  assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [100, 200, 300, 400]


def test_read_metrics_missing_file(tmp_path):
  assert read_metrics(tmp_path) == []
  assert metric_writers.METRICS_FILE == "metrics.jsonl"


def test_writer_rejects_non_scalars(tmp_path):
  with MetricWriter(tmp_path) as writer:
    with pytest.raises(TypeError, match="scalars"):
      writer.write_scalars(1, {"x": np.zeros(3)})
    with pytest.raises(ValueError, match="image"):
      writer.write_images(1, {"img": np.zeros((4, 4))})
