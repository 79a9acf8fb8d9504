"""experiments.reproduce: the sweep configs, every report on hand-written runs, fig3 end to end."""

import importlib
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from experiments import reproduce
from launch.sweep_spec import load_sweep
from tests.test_experiments import write_parallel

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "experiments" / "configs"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------- helpers

def _trial_config(name: str, overrides: dict, arg: str | None = None):
  """``get_config(arg)`` with a sweep trial's dotted overrides applied."""
  c = importlib.import_module(f"experiments.configs.{name}").get_config(arg)
  for key, value in overrides.items():
    *parents, leaf = key.split(".")
    node = c
    for part in parents:
      node = node[part]
    assert leaf in node, key
    node[leaf] = value
  return c


def _run(workdir: Path, config: dict, records: list[dict]) -> Path:
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / "config.json").write_text(json.dumps(config))
  (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
  return workdir


def _sweep(root: Path, trials: dict[str, tuple[dict, dict | None]]) -> Path:
  """A launch.sweep directory: ``sweep.json`` + one workdir per trial (no metrics when None)."""
  root.mkdir(parents=True, exist_ok=True)
  manifest = {}
  for name, (config, final) in trials.items():
    wd = root / name
    if final is None:
      wd.mkdir()
      (wd / "config.json").write_text(json.dumps(config))   # launched, nothing logged yet
    else:
      _run(wd, config, [{"step": 50, "train/loss": 9.0}, {"step": 100, **final}])
    manifest[name] = {"name": name, "workdir": str(wd), "overrides": {},
                      "status": "done" if final is not None else "pending",
                      "command": "python -m experiments.run ..."}
    if final is not None:   # as launch.sweep records a finished trial
      manifest[name].update(start_time="2026-11-25T10:00:00+00:00",
                            end_time=f"2026-11-25T10:{len(manifest):02d}:30+00:00")
  (root / "sweep.json").write_text(json.dumps({"config": "x.py", "trials": manifest}))
  return root


def _tables(md: str) -> list[list[list[str]]]:
  """Every Markdown table in ``md`` as rows of cells (header first, separator dropped)."""
  tables, cur = [], []
  for line in md.splitlines() + [""]:
    if line.startswith("|"):
      if not line.startswith("|---"):
        cur.append([c.strip() for c in line.strip().strip("|").split("|")])
    elif cur:
      tables.append(cur)
      cur = []
  return tables


def _one_error(capsys, code, *needles):
  assert code == 2
  err = capsys.readouterr().err
  errors = [l for l in err.splitlines() if l.startswith("error:")]
  assert len(errors) == 1, err
  assert "Traceback" not in err
  for needle in needles:
    assert needle in errors[0], errors[0]
  return errors[0]


def _num_params(c, vocab: int = 65) -> int:
  from experiments.models import create_model
  model = create_model(c.model, src_vocab_size=vocab, tgt_vocab_size=vocab, max_len=64)
  lm = c.model.name.endswith("_lm")
  dummy = (jnp.ones((1, 8), jnp.int32),) * (1 if lm else 2)
  shapes = jax.eval_shape(lambda k: model.init({"params": k}, *dummy, train=False),
                          jax.random.key(0))
  return sum(x.size for x in jax.tree.leaves(shapes["params"]))


# ---------------------------------------------------------------------------- configs

def test_luong_table4_sweep_is_score_by_mode_of_one_luong_model():
  from attention import luong
  trials = load_sweep(str(CONFIGS / "luong_table4.py"))
  combos = [(t["seed"], t["model.score"], t["model.mode"]) for t in trials]
  assert sorted(combos) == sorted((seed, s, m) for seed in (0, 1, 2)
                                  for s in ("dot", "general", "concat")
                                  for m in ("global", "local-p"))
  assert all(set(t) == {"model.score", "model.mode", "seed"} for t in trials)
  for t in trials:
    c = _trial_config("luong_table4", t)
    assert c.model.name == "luong"
    assert (c.model.score, c.model.mode) == (t["model.score"], t["model.mode"])
    assert c.model.score in luong.SCORES and c.model.mode in luong.MODES
    assert c.model.window == 10            # Luong's D = 10 for local-p
    assert c.data.name == "multi30k"


@pytest.mark.parametrize("arg", [None, "task=multi30k"])
def test_vaswani_table3a_heads_divide_d_model_at_equal_params(arg):
  spec = str(CONFIGS / "vaswani_table3a.py") + (f":{arg}" if arg else "")
  trials = load_sweep(spec)
  assert [(t["seed"], t["model.num_heads"]) for t in trials] == [
      (seed, h) for seed in (0, 1, 2) for h in (1, 4, 8, 16)]
  counts = {}
  for t in trials:
    c = _trial_config("vaswani_table3a", t, arg)
    assert c.model.name == ("transformer" if arg else "transformer_lm")
    h = c.model.num_heads
    assert h == t["model.num_heads"] and c.model.qkv_dim % h == 0
    counts[h] = _num_params(c)
  # Fixed compute: splitting d_model into more heads adds no parameters.
  assert len(set(counts.values())) == 1, counts
  assert counts[1] > 100_000


# ---------------------------------------------------------------------------- table4

def _luong(score, mode):
  return {"model": {"name": "luong", "score": score, "mode": mode},
          "data": {"name": "multi30k"}}


def test_table4_pivots_score_by_mode_with_missing_cells(tmp_path, capsys):
  values = {("dot", "global"): (21.04, 14.46), ("dot", "local-p"): (22.51, 13.91),
            ("general", "global"): (23.37, 12.62), ("general", "local-p"): (24.88, 11.73),
            ("concat", "global"): (19.26, 16.04)}
  trials = {}
  for score in ("dot", "general", "concat"):
    for mode in ("global", "local-p"):
      v = values.get((score, mode))
      final = None if v is None else {"test/bleu": v[0], "eval/bleu": 1.0,
                                      "eval/perplexity": v[1], "eval/loss": math.log(v[1])}
      trials[f"model.mode={mode},model.score={score}"] = (_luong(score, mode), final)
  root = _sweep(tmp_path / "table4", trials)

  assert reproduce.main(["table4", str(root)]) == 0
  out = capsys.readouterr().out
  assert out.splitlines()[0] == "test/bleu (eval perplexity in brackets)"
  pivot, summary = _tables(out)
  assert pivot[0] == ["model.score \\ model.mode", "global", "local-p"]
  assert pivot[1:] == [["dot", "21.0 (14.5)", "22.5 (13.9)"],
                       ["general", "23.4 (12.6)", "24.9 (11.7)"],
                       ["concat", "19.3 (16.0)", "–"]]   # concat/local-p never logged a metric
  assert [r[0] for r in summary[1:]] == [n for n, (_, f) in trials.items() if f]
  # Wall seconds from sweep.json's start and end times (trial k ends at 10:0k:30).
  wall = summary[0].index("wall s")
  assert [r[wall] for r in summary[1:]] == ["90.00", "150.0", "210.0", "270.0", "330.0"]
  assert (root / "table4.md").read_text().strip() == out.strip()


def test_table4_cells_are_mean_and_sd_over_seeds(tmp_path, capsys):
  bleu = {("dot", "global", 0): 30.0, ("dot", "global", 1): 31.0, ("dot", "global", 2): 32.5,
          ("dot", "local-p", 0): 24.0, ("dot", "local-p", 1): 18.0}
  trials = {}
  for (score, mode, seed), b in bleu.items():
    config = dict(_luong(score, mode), seed=seed)
    trials[f"model.mode={mode},model.score={score},seed={seed}"] = (
        config, {"test/bleu": b, "eval/perplexity": 9.0 + seed})
  root = _sweep(tmp_path / "table4", trials)
  assert reproduce.main(["table4", str(root)]) == 0
  out = capsys.readouterr().out
  pivot = _tables(out)[0]
  # dot/global: mean 31.17, sample sd of 30, 31, 32.5 = 1.258; dot/local-p: 21, sd 4.243.
  assert pivot[1:] == [["dot", "31.2 ± 1.3 (10.0)", "21.0 ± 4.2 (9.50)"]]
  assert "mean ± sample standard deviation over seeds 0, 1, 2" in out


def test_table4_falls_back_to_eval_bleu(tmp_path, capsys):
  root = _sweep(tmp_path / "t", {
      "a": (_luong("dot", "global"), {"eval/bleu": 7.5, "eval/perplexity": 30.0}),
      "b": (_luong("general", "local-p"), {"eval/bleu": 8.25, "eval/perplexity": 25.0})})
  assert reproduce.main(["table4", str(root)]) == 0
  out = capsys.readouterr().out
  assert out.startswith("eval/bleu (eval perplexity in brackets)")
  pivot = _tables(out)[0]
  assert pivot[1:] == [["dot", "7.50 (30.0)", "–"], ["general", "–", "8.25 (25.0)"]]


# ---------------------------------------------------------------------------- table3a

def _tf(name, heads, d=160):
  return {"model": {"name": name, "num_heads": heads, "qkv_dim": d}, "data": {"name": "text"}}


def test_table3a_lm_rows_sorted_by_heads_with_bits_per_token(tmp_path, capsys):
  losses = {16: 1.62, 1: 1.71, 8: 1.5, 4: 1.55}     # sweep order deliberately not sorted
  trials = {f"model.num_heads={h}": (_tf("transformer_lm", h), {
      "eval/loss": loss, "eval/perplexity": math.exp(loss), "model/num_params": 1_016_385.0})
      for h, loss in losses.items()}
  root = _sweep(tmp_path / "table3a", trials)

  assert reproduce.main(["table3a", str(root)]) == 0
  out = capsys.readouterr().out
  (table,) = _tables(out)
  assert table[0] == ["h", "d_k = d_v", "params", "steps", "seeds", "eval loss", "eval ppl",
                      "bits/token"]
  assert table[1:] == [
      ["1", "160", "1.02M", "100", "–", "1.710", "5.529", "2.467"],
      ["4", "40", "1.02M", "100", "–", "1.550", "4.711", "2.236"],
      ["8", "20", "1.02M", "100", "–", "1.500", "4.482", "2.164"],
      ["16", "10", "1.02M", "100", "–", "1.620", "5.053", "2.337"]]
  assert (root / "table3a.md").is_file()
  assert (root / "table3a.png").read_bytes()[:8] == PNG_MAGIC


def test_table3a_rows_are_mean_and_sd_over_seeds(tmp_path, capsys):
  losses = {(1, 0): 1.90, (1, 1): 1.94, (1, 2): 1.89, (4, 0): 1.95, (4, 2): 1.91}
  trials = {}
  for (h, seed), loss in losses.items():
    config = dict(_tf("transformer_lm", h), seed=seed)
    trials[f"model.num_heads={h},seed={seed}"] = (config, {
        "eval/loss": loss, "eval/perplexity": math.exp(loss), "model/num_params": 950_000.0})
  root = _sweep(tmp_path / "table3a", trials)
  assert reproduce.main(["table3a", str(root)]) == 0
  out = capsys.readouterr().out
  (table,) = _tables(out)
  # Sample standard deviations, by hand: h=1 losses 1.90, 1.94, 1.89 (mean 1.91);
  # h=4 losses 1.95, 1.91 (mean 1.93).
  sd1 = math.sqrt(((1.90 - 1.91) ** 2 + (1.94 - 1.91) ** 2 + (1.89 - 1.91) ** 2) / 2)
  sd4 = math.sqrt(((1.95 - 1.93) ** 2 + (1.91 - 1.93) ** 2) / 1)
  assert table[1][:6] == ["1", "160", "0.95M", "100", "0,1,2", f"1.910 ± {sd1:.3f}"]
  assert table[2][:6] == ["4", "40", "0.95M", "100", "0,2", f"1.930 ± {sd4:.3f}"]
  ppl1 = [math.exp(v) for v in (1.90, 1.94, 1.89)]
  assert table[1][6].startswith(f"{sum(ppl1) / 3:.3f} ± ")
  assert table[1][7] == f"{1.91 / math.log(2):.3f} ± {sd1 / math.log(2):.3f}"
  assert "mean ± sample standard deviation" in out


def test_table3a_translation_reports_bleu(tmp_path, capsys):
  root = _sweep(tmp_path / "t", {
      "h8": (_tf("transformer", 8, 128), {"eval/loss": 2.0, "eval/bleu": 30.12,
                                          "test/bleu": 29.87}),
      "h1": (_tf("transformer", 1, 128), {"eval/loss": 2.25, "eval/bleu": 27.5})})
  assert reproduce.main(["table3a", str(root)]) == 0
  (table,) = _tables(capsys.readouterr().out)
  assert table[0][-2:] == ["eval BLEU", "test BLEU"]
  assert "bits/token" not in table[0]
  assert table[1] == ["1", "128", "–", "100", "–", "2.250", "–", "27.5", "–"]
  assert table[2] == ["8", "16", "–", "100", "–", "2.000", "–", "30.1", "29.9"]


# ---------------------------------------------------------------------------- fig2, lstmn

def _by_length(values: dict[str, float], counts: dict[str, int], metric="exact_match"):
  out = {f"test_by_length/{metric}_{lab}": v for lab, v in values.items()}
  out.update({f"test_by_length/count_{lab}": float(n) for lab, n in counts.items()})
  return out


def test_fig2_writes_png_and_by_length_tables(tmp_path, capsys):
  # Labels written in an order where string sorting would be wrong (10+ < 5-9).
  counts = {"10+": 40, "0-4": 100, "5-9": 80}
  rev = tmp_path / "fig2_reverse"
  exact = {"rnnsearch": {"10+": 0.125, "0-4": 0.97, "5-9": 0.6875},
           "transformer": {"10+": 0.8125, "0-4": 1.0, "5-9": 0.9375}}
  for fam, vals in exact.items():
    _run(rev / fam, {"model": {"name": fam}, "data": {"name": "reverse"}},
         [{"step": 10, "eval/loss": 1.0}, {"step": 20, "eval/loss": 0.5,
                                           **_by_length(vals, counts)}])
  mt = tmp_path / "fig2_multi30k"
  _run(mt / "transformer", {"model": {"name": "transformer"}, "data": {"name": "multi30k"}},
       [{"step": 5, "test/bleu": 31.0, **_by_length({"0-9": 35.5, "10-19": 28.25},
                                                    {"0-9": 600, "10-19": 400}, "bleu")}])

  assert reproduce.main(["fig2", str(rev), str(mt)]) == 0
  out = capsys.readouterr().out
  for root in (rev, mt):
    assert (root / "fig2.png").read_bytes()[:8] == PNG_MAGIC
  assert (rev / "fig2.md").read_text().strip() == out.strip()
  assert not (mt / "fig2.md").exists()
  assert "## fig2_reverse" in out and "## fig2_multi30k" in out
  # Links are relative to fig2.md (in the first directory), so the Markdown renders.
  assert "![fig2_reverse](fig2.png)" in out
  assert "![fig2_multi30k](../fig2_multi30k/fig2.png)" in out
  tables = _tables(out)
  by_len = [t for t in tables if "by source length" in t[0][0]]
  assert by_len[0] == [
      ["test exact_match by source length", "0-4 (n=100)", "5-9 (n=80)", "10+ (n=40)"],
      ["rnnsearch", "0.970", "0.688", "0.125"],
      ["transformer", "1.00", "0.938", "0.812"]]
  assert by_len[1] == [["test bleu by source length", "0-9 (n=600)", "10-19 (n=400)"],
                       ["transformer", "35.5", "28.2"]]


def test_fig2_without_by_length_metrics_links_no_png(tmp_path, capsys):
  root = tmp_path / "old"
  _run(root / "transformer", {"model": {"name": "transformer"}, "data": {"name": "copy"}},
       [{"step": 3, "eval/loss": 0.25, "eval/accuracy": 0.875}])
  assert reproduce.main(["fig2", str(root)]) == 0
  out = capsys.readouterr().out
  assert not (root / "fig2.png").exists() and "![" not in out
  (summary,) = _tables(out)
  assert summary[1][:2] == ["transformer", "transformer"] and summary[1][7] == "0.875"

def test_lstmn_summary_with_perplexities_and_wall_seconds(tmp_path, capsys):
  root = tmp_path / "lm"
  ppl = {"lstm": 5.75, "lstmn": 5.125, "transformer": 4.875}
  for fam, p in ppl.items():
    _run(root / fam, {"model": {"name": f"{fam}_lm"}, "data": {"name": "text"}},
         [{"step": 500, "eval/loss": 2.0}, {"step": 1000, "eval/loss": math.log(p),
                                            "eval/perplexity": p, "eval/accuracy": 0.5,
                                            "model/num_params": 998_000.0}])
  (root / "compare.json").write_text(json.dumps(
      {"lstm": {"seconds": 61.5}, "lstmn": {"seconds": 240.0}, "transformer": {"seconds": 90.0}}))

  assert reproduce.main(["lstmn", str(root)]) == 0
  out = capsys.readouterr().out
  md = (root / "lstmn.md").read_text()
  assert md.strip() == out.strip()
  (table,) = _tables(md)
  assert table[0][7:9] == ["eval ppl", "bits/token"]
  rows = {r[0]: r for r in table[1:]}
  assert list(rows) == ["lstm", "lstmn", "transformer"]
  # run, model, params, steps, wall s, train loss, eval loss, eval ppl, bits/token, eval acc
  assert rows["lstm"] == ["lstm", "lstm_lm", "1.00M", "1000", "61.50", "–", "1.75", "5.75",
                          "2.52", "0.500"]
  assert [rows[f][7] for f in ppl] == ["5.75", "5.12", "4.88"]
  assert [rows[f][8] for f in ppl] == [f"{math.log2(p):.3g}" for p in ppl.values()]
  assert rows["lstmn"][4] == "240.0"
  assert (root / "lstmn.png").read_bytes()[:8] == PNG_MAGIC


# ---------------------------------------------------------------------------- errors

def test_missing_directory_is_one_line_error(tmp_path, capsys):
  missing = tmp_path / "nope"
  for name in ("table4", "table3a", "lstmn", "fig2"):
    _one_error(capsys, reproduce.main([name, str(missing)]), str(missing), "no such")


def test_directory_without_runs_is_one_line_error(tmp_path, capsys):
  empty = tmp_path / "empty"
  empty.mkdir()
  _one_error(capsys, reproduce.main(["table4", str(empty)]), str(empty), "metrics.jsonl")
  # A sweep whose trials have not logged anything yet is just as empty.
  root = _sweep(tmp_path / "pending", {"a": (_luong("dot", "global"), None)})
  _one_error(capsys, reproduce.main(["table4", str(root)]), "metrics.jsonl")


def test_fig3_missing_workdir_is_one_line_error(tmp_path, capsys):
  code = reproduce.main(["fig3", "--rnnsearch", str(tmp_path / "a"), "--transformer",
                         str(tmp_path / "b"), "--data_dir", str(tmp_path), "--out",
                         str(tmp_path / "o")])
  _one_error(capsys, code, "config.json")


# ---------------------------------------------------------------------------- fig3

def _write_multi30k(d: Path) -> Path:
  """write_parallel's corpus (plain files) with val sentences of 8-11 words, as fig3 needs."""
  write_parallel(d, n=48, gz=False)
  words = "ein zwei drei vier fünf sechs sieben acht".split()
  english = "one two three four five six seven eight".split()
  de, en = [], []
  for i in range(6):
    k = [(i * 3 + j) % 8 for j in range(8 + i % 4)]
    de.append(" ".join(words[j] for j in k))
    en.append(" ".join(english[j] for j in k))
  de.insert(1, "ein zwei")                     # too short for fig3: skipped
  en.insert(1, "one two")
  (d / "val.de").write_text("\n".join(de) + "\n")
  (d / "val.en").write_text("\n".join(en) + "\n")
  return d


_TRAIN = {
    "rnnsearch": ["rnnsearch_mt.py:tiny"],
    # 4 heads of d_k 8, one layer each side.
    "transformer": ["transformer_mt.py:size=tiny,tiny", "--config.model.emb_dim=32",
                    "--config.model.qkv_dim=32", "--config.model.mlp_dim=64",
                    "--config.model.num_layers=1"],
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """Real ``experiments.run`` workdirs of a tiny RNNsearch and Transformer (one step each).

  XLA compilation, not training, is the cost (fig3 needs a checkpoint, not skill):
  both runs go in parallel, compiled with LLVM optimisation off.
  """
  tmp = tmp_path_factory.mktemp("fig3")
  data = _write_multi30k(tmp / "m30k")
  env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_", "ATTENTION_"))}
  env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_backend_optimization_level=0",
             PYTHONUNBUFFERED="1")
  procs = {}
  for name, (config, *flags) in _TRAIN.items():
    cmd = [sys.executable, "-m", "experiments.run", "--config", str(CONFIGS / config),
           "--workdir", str(tmp / name), f"--config.data.dir={data}",
           "--config.data.tokenizer=word", "--config.num_train_steps=1",
           "--config.eval_every_steps=1", "--config.checkpoint_every_steps=1",
           "--config.num_eval_batches=1", "--config.decode.enabled=False",
           "--config.num_plot_examples=0", *flags]
    procs[name] = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True)
  try:
    for name, proc in procs.items():
      log, _ = proc.communicate(timeout=300)
      assert proc.returncode == 0, f"{name}:\n{log[-3000:]}"
  finally:
    for proc in procs.values():
      if proc.poll() is None:
        proc.kill()
        proc.wait()
  return tmp, data, {name: tmp / name for name in _TRAIN}


def test_fig3_end_to_end(trained, capsys):
  tmp, data, wd = trained
  out = tmp / "out"
  code = reproduce.main(["fig3", "--rnnsearch", str(wd["rnnsearch"]), "--transformer",
                         str(wd["transformer"]), "--data_dir", str(data), "--out", str(out),
                         "--num", "2"])
  assert code == 0, capsys.readouterr().err
  assert (out / "fig3.png").read_bytes()[:8] == PNG_MAGIC
  md = (out / "fig3.md").read_text()
  assert md.startswith("Bahdanau Fig. 3 analogue: 2 val sentences (de->en)")
  heads = re.findall(r"Transformer cross/head(\d+)\.", md)
  assert len(heads) == 1 and 0 <= int(heads[0]) < 4, md   # tiny Transformer: 4 heads
  assert md.rstrip().endswith("![fig3](fig3.png)")          # relative to fig3.md

  # An explicit head is the one shown; one the model does not have is a one-line error.
  assert reproduce.main(["fig3", "--rnnsearch", str(wd["rnnsearch"]), "--transformer",
                         str(wd["transformer"]), "--data_dir", str(data), "--out",
                         str(tmp / "out3"), "--num", "2", "--head", "3"]) == 0
  assert "Transformer cross/head3." in (tmp / "out3" / "fig3.md").read_text()
  capsys.readouterr()
  code = reproduce.main(["fig3", "--rnnsearch", str(wd["rnnsearch"]), "--transformer",
                         str(wd["transformer"]), "--data_dir", str(data), "--out",
                         str(tmp / "out99"), "--num", "2", "--head", "99"])
  _one_error(capsys, code, "--head 99", "0..3")
  assert not (tmp / "out99").exists()


def test_fig3_default_head_is_the_most_peaked(trained, monkeypatch):
  """Without --head, the head whose rows are most one-hot (alignment-like) is shown."""
  import numpy as np
  from experiments import evaluate
  tmp, data, wd = trained
  real = evaluate.alignment_examples

  def controlled(*args, **kwargs):
    examples = real(*args, **kwargs)
    for ex in examples:
      for key, m in ex.matrices.items():
        if key.startswith("cross/head"):   # uniform rows, except head 2 (a hard alignment)
          t, s = m.shape
          ex.matrices[key] = (np.eye(t, s, dtype=np.float32) if key == "cross/head2" else
                              np.full((t, s), 1.0 / s, np.float32))
    return examples

  monkeypatch.setattr(evaluate, "alignment_examples", controlled)
  out = tmp / "peaked"
  assert reproduce.main(["fig3", "--rnnsearch", str(wd["rnnsearch"]), "--transformer",
                         str(wd["transformer"]), "--data_dir", str(data), "--out", str(out),
                         "--num", "2"]) == 0
  assert "Transformer cross/head2." in (out / "fig3.md").read_text()


def test_fig3_bad_inputs_are_one_line_errors(trained, capsys):
  tmp, data, wd = trained
  short = tmp / "short"
  short.mkdir()
  for lang in ("de", "en"):
    (short / f"val.{lang}").write_text("ein zwei\n")

  def fig3(rnnsearch, transformer, data_dir, *extra):
    return reproduce.main(["fig3", "--rnnsearch", str(rnnsearch), "--transformer",
                           str(transformer), "--data_dir", str(data_dir), "--out",
                           str(tmp / "bad"), "--num", "2", *extra])

  # No sentence of 8-14 words (was: "max() arg is an empty sequence").
  _one_error(capsys, fig3(wd["rnnsearch"], wd["transformer"], short), str(short), "8-14 words")
  _one_error(capsys, fig3(wd["rnnsearch"], wd["transformer"], tmp), "val.de", "--data_dir")
  # The two runs swapped (was: "attempt to get argmax of an empty sequence").
  _one_error(capsys, fig3(wd["transformer"], wd["rnnsearch"], data),
             f"--transformer {wd['rnnsearch']}", "rnnsearch run has no per-head")
  assert not (tmp / "bad").exists()

