"""experiments.compare: config_arg sweeps, the compare config, the report, and the CLI."""

import json
import math
import os
import pathlib
import shutil
import subprocess
import sys
import time

import pytest

from experiments import compare, comparison_report as cr
from experiments.configs import compare as cc
from launch.sweep_spec import SweepError, load_sweep, make_trials, override_flags, trial_name

ROOT = pathlib.Path(__file__).resolve().parents[1]
PY = sys.executable
CMP = "experiments/configs/compare.py"
PNG = b"\x89PNG\r\n\x1a\n"
SEQ2SEQ = ["rnnencdec", "rnnsearch", "luong", "lstmn", "transformer"]


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch):
  monkeypatch.chdir(ROOT)   # config paths in launcher commands are repo-relative


# ------------------------------------------------------------------ config_arg sweeps

def test_compare_sweep_spans_families_through_config_arg():
  trials = load_sweep(f"{CMP}:task=reverse_long")
  args = [t["config_arg"] for t in trials]
  assert args == [f"family={f},size=small,task=reverse_long" for f in SEQ2SEQ]
  assert all(list(t) == ["config_arg"] for t in trials)
  built = make_trials(f"{CMP}:task=reverse_long", trials, "/w", ["--config.seed=3"], python="py")
  names = [t.name for t in built]
  assert names == args and len(set(names)) == 5   # the name is the arg itself
  rnnsearch = built[1]
  assert rnnsearch.argv == ["py", "-m", "experiments.run", "--config",
                            f"{CMP}:family=rnnsearch,size=small,task=reverse_long",
                            "--workdir", "/w/family=rnnsearch,size=small,task=reverse_long",
                            "--config.seed=3"]
  for t in built:
    assert not any("config_arg" in a for a in t.argv)
    assert t.command.count("--config ") == 1
  # The arg given on the command line reaches every trial (size here), the family does not.
  lm = load_sweep(f"{CMP}:task=text,size=tiny,family=lstm")
  assert [t["config_arg"] for t in lm] == [
      f"family={f},size=tiny,task=text" for f in ("lstm", "lstmn", "transformer")]


def test_config_arg_names_flags_and_commands():
  o = {"seed": 1, "config_arg": "family=b", "learning_rate": 0.01}
  assert trial_name(o) == "family=b,learning_rate=0.01,seed=1"
  assert trial_name(o) == trial_name(dict(reversed(o.items())))
  assert override_flags(o) == ["--config.seed=1", "--config.learning_rate=0.01"]
  # The trial's arg replaces the file's :arg; a trial without config_arg keeps it.
  t1, t2 = make_trials("x/c.py:family=a", [o, {"seed": 2}], "w", [], python="py")
  assert t1.argv[3:5] == ["--config", "x/c.py:family=b"]
  assert t2.argv[3:5] == ["--config", "x/c.py:family=a"] and t2.name == "seed=2"
  assert make_trials("x/c.py", [o], "w", [], python="py")[0].argv[4] == "x/c.py:family=b"


_PER_ARG = """\
from ml_collections import config_dict

def get_config(arg=None):
  if arg == "family=bad":
    raise ValueError("no such family: bad")
  c = config_dict.ConfigDict({"seed": 0, "model": {"name": str(arg)}})
  if arg == "family=b":
    c.model.num_heads = 4
  return c

def get_sweep(add, arg=None):
  for f in FAMILIES:
    add(config_arg=f"family={f}", **EXTRA)
"""


def _per_arg_config(tmp_path, name, families, extra):
  path = tmp_path / f"{name}.py"
  path.write_text(_PER_ARG.replace("FAMILIES", repr(tuple(families)))
                  .replace("EXTRA", repr(extra)))
  return str(path)


def test_config_arg_keys_checked_against_that_arg(tmp_path):
  ok = _per_arg_config(tmp_path, "ok", ["b"], {"model.num_heads": 8})
  assert load_sweep(ok) == [{"config_arg": "family=b", "model.num_heads": 8}]
  # model.num_heads exists only in family=b's config, and the base arg would not have it.
  assert load_sweep(ok + ":family=a") == load_sweep(ok)
  mixed = _per_arg_config(tmp_path, "mixed", ["b", "a"], {"model.num_heads": 8})
  with pytest.raises(SweepError, match=r"'model\.num_heads' is not in the config"):
    load_sweep(mixed)
  seed = _per_arg_config(tmp_path, "seed", ["a", "b"], {"seed": 3})
  assert [t["config_arg"] for t in load_sweep(seed)] == ["family=a", "family=b"]
  bad = _per_arg_config(tmp_path, "bad", ["a", "bad"], {})
  with pytest.raises(SweepError, match=r"get_config\('family=bad'\) failed: no such family: bad"):
    load_sweep(bad)
  with pytest.raises(SweepError, match="twice"):
    load_sweep(_per_arg_config(tmp_path, "dup", ["a", "a"], {}))


# ------------------------------------------------------------------ the compare config

@pytest.mark.parametrize("task,expected", [
    ("reverse_long", {f: f for f in SEQ2SEQ}),
    ("multi30k", {f: f for f in SEQ2SEQ}),
    ("text", {"lstm": "lstm_lm", "lstmn": "lstmn_lm", "transformer": "transformer_lm"}),
])
def test_compare_config_models_per_task(task, expected):
  assert cc.families(task) == tuple(expected)
  for size in ("tiny", "small"):
    for family, model in expected.items():
      c = cc.get_config(f"family={family},task={task},size={size}")
      assert c.model.name == model, (family, size)
      if task == "reverse_long":
        assert (c.data.name, c.data.min_len, c.data.num_symbols) == ("reverse", 5, 16)
        assert c.data.max_len == (12 if size == "tiny" else 40)
        assert c.decode.beam_size == 1 and tuple(c.decode.length_buckets) == (0, 10, 20, 30, 40)
      if task == "text":
        assert c.data.name == "text"


def test_compare_config_small_is_shared_and_sized():
  for task in ("reverse_long", "copy", "multi30k", "text"):
    cfgs = {f: cc.get_config(f"family={f},task={task},size=small") for f in cc.families(task)}
    shared = {(c.batch_size, c.eval_batch_size, c.num_train_steps, c.eval_every_steps)
              for c in cfgs.values()}
    assert len(shared) == 1, (task, shared)   # one budget for every family of a task
    batch, eval_batch, steps, every = shared.pop()
    assert steps % every == 0, task
    if task in ("reverse_long", "copy"):
      assert (batch, eval_batch, steps) == (64, 128, 1000), task
  small = {f: cc.get_config(f"family={f},task=reverse_long") for f in SEQ2SEQ}   # default size
  for f in ("rnnencdec", "rnnsearch", "luong", "lstmn"):
    assert (small[f].model.emb_dim, small[f].model.hidden_dim) == (96, 192), f
  assert small["rnnsearch"].model.attention_dim == 192
  t = small["transformer"].model
  assert (t.emb_dim, t.qkv_dim, t.num_layers, t.dropout_rate) == (128, 128, 2, 0.0)
  assert cc.get_config("family=transformer,task=multi30k").model.dropout_rate == 0.1
  assert cc.get_config("family=transformer,task=text").model.dropout_rate == 0.1
  # The LSTM families' tuned rate applies to Multi30k only (reverse_long keeps 1e-3).
  lr = lambda f, task: cc.get_config(f"family={f},task={task}").learning_rate
  assert lr("luong", "multi30k") == lr("lstmn", "multi30k") == 3e-3
  assert lr("rnnsearch", "multi30k") == lr("luong", "reverse_long") == 1e-3
  assert cc.get_config().model.name == "transformer"   # defaults: transformer, reverse_long


@pytest.mark.parametrize("arg,needle", [
    ("family=lstm,task=reverse_long", "family='lstm'"),
    ("family=rnnsearch,task=text", "family='rnnsearch'"),
    ("family=bogus", "family='bogus'"),
    ("task=bogus", "task='bogus'"),
    ("size=huge", "size='huge'"),
    ("famly=rnnsearch", "'famly'"),
])
def test_compare_config_bad_args(arg, needle):
  with pytest.raises(ValueError, match=needle):
    cc.get_config(arg)


# ------------------------------------------------------------------ the report

def _run_dir(root, name, model, data, records):
  d = root / name
  d.mkdir(parents=True)
  (d / "config.json").write_text(json.dumps({"model": {"name": model}, "data": {"name": data}}))
  (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
  return d


def _seq2seq_runs(root):
  # Step 4 comes first in the file and is split over two records; buckets out of order.
  _run_dir(root, "rnnsearch", "rnnsearch", "reverse", [
      {"step": 4, "train/loss": 2.5, "model/num_params": 34900.0, "eval/loss": 1.23456,
       "eval/accuracy": 0.875, "eval/sequence_accuracy": 0.5, "eval/bleu": 45.678},
      {"step": 2, "train/loss": 9.0, "eval/loss": 3.0, "test/bleu": 1.0,
       "test_by_length/exact_match_0-9": 0.01, "test_by_length/count_0-9": 99.0},
      {"step": 4, "test/bleu": 40.0, "test/exact_match": 0.25,
       "test_by_length/exact_match_40+": 0.0, "test_by_length/count_40+": 1.0,
       "test_by_length/exact_match_10-19": 0.4, "test_by_length/count_10-19": 5.0,
       "test_by_length/bleu_10-19": 70.0,
       "test_by_length/exact_match_0-9": 0.75, "test_by_length/count_0-9": 12.0,
       "test_by_length/exact_match_20-29": 0.125, "test_by_length/count_20-29": 3.0,
       "eval_by_length/exact_match_0-9": 0.5, "eval_by_length/count_0-9": 7.0},
  ])
  _run_dir(root, "transformer", "transformer", "reverse", [
      {"step": 6, "train/loss": 0.5, "model/num_params": 1234567.0, "eval/loss": 0.4,
       "eval/accuracy": 0.99, "eval/sequence_accuracy": 0.9, "test/exact_match": 0.8,
       "test_by_length/exact_match_0-9": 1.0, "test_by_length/count_0-9": 12.0,
       "test_by_length/exact_match_10-19": 0.6, "test_by_length/count_10-19": 5.0},
  ])
  (root / "empty").mkdir()            # neither file: not a run
  (root / "notes.txt").write_text("x")


def test_run_final_and_by_length(tmp_path):
  _seq2seq_runs(tmp_path)
  r = cr.Run("rnnsearch", str(tmp_path / "rnnsearch"))
  assert [h["step"] for h in r.history] == [2, 4, 4]
  assert r.final["step"] == 4 and r.final["train/loss"] == 2.5 and r.final["test/bleu"] == 40.0
  assert r.get("eval/loss") == 1.23456 and r.get("model/num_params") == 34900.0
  assert r.get("eval/perplexity") is None
  assert (r.model, r.is_lm, r.synthetic) == ("rnnsearch", False, True)
  by = r.by_length("exact_match")
  assert list(by) == ["0-9", "10-19", "20-29", "40+"]
  assert by == {"0-9": (0.75, 12), "10-19": (0.4, 5), "20-29": (0.125, 3), "40+": (0.0, 1)}
  assert r.by_length("exact_match", split="eval") == {"0-9": (0.5, 7)}
  bleu = r.by_length("bleu")
  assert bleu["10-19"] == (70.0, 5) and math.isnan(bleu["0-9"][0]) and bleu["0-9"][1] == 12
  assert cr.Run("none", str(tmp_path / "empty")).final == {}


def test_find_runs_dirs_and_sweep(tmp_path):
  _seq2seq_runs(tmp_path)
  assert [r.label for r in cr.find_runs(str(tmp_path))] == ["rnnsearch", "transformer"]
  assert [r.label for r in cr.find_runs(str(tmp_path), ["transformer", "rnnsearch"])] == [
      "transformer", "rnnsearch"]
  sweep = tmp_path / "sweep"
  sweep.mkdir()
  (sweep / "sweep.json").write_text(json.dumps({"trials": {
      "t": {"workdir": str(tmp_path / "transformer")},
      "r": {"workdir": str(tmp_path / "rnnsearch")}}}))
  runs = cr.find_runs(str(sweep))
  assert [(r.label, r.model) for r in runs] == [("t", "transformer"), ("r", "rnnsearch")]
  assert [r.label for r in cr.find_runs(str(sweep), ["r"])] == ["r"]


def test_summary_and_length_tables(tmp_path):
  _seq2seq_runs(tmp_path)
  runs = cr.find_runs(str(tmp_path))
  lines = cr.summary_table(runs, {"rnnsearch": 12.3456}).splitlines()
  assert lines[0] == ("| run | model | params | steps | wall s | train loss | eval loss | eval acc"
                      " | eval seq acc | eval BLEU | test BLEU | test exact |")
  assert lines[1] == "|" + "---|" * 12
  assert lines[2] == "| rnnsearch | rnnsearch | 34900 | 4 | 12.35 | 2.50 | 1.23 | 0.875 | 0.500" \
                     " | 45.7 | 40.0 | 0.250 |"
  assert lines[3] == ("| transformer | transformer | 1.23M | 6 | – | 0.500 | 0.400 | 0.990 | 0.900 | – | –"
                      " | 0.800 |")
  assert cr.length_metric(runs) == "exact_match"
  table = cr.length_table(runs, "exact_match").splitlines()
  assert table[0] == ("| test exact_match by source length | 0-9 (n=12) | 10-19 (n=5) | 20-29 (n=3)"
                      " | 40+ (n=1) |")
  assert table[2] == "| rnnsearch | 0.750 | 0.400 | 0.125 | 0 |"
  assert table[3] == "| transformer | 1.00 | 0.600 | – | – |"
  assert cr.length_table(runs, "exact_match", split="dev") == ""
  assert [cr.fmt(v) for v in (None, float("nan"), 0.0, 1234.4, 99999, 2.5e6, 0.012345)] == [
      "–", "–", "0", "1234", "99999", "2.50M", "0.0123"]
  assert [cr.fmt(v) for v in (0.9996, 99.96, 9.9996, 1.0, 21.04, 0.99999999, -0.9996)] == [
      "0.9996", "99.96", "9.9996", "1.00", "21.0", "1.00", "-0.9996"]
  # Trailing zeros say how precise a figure is; a bare trailing point is dropped.
  assert [cr.fmt(v) for v in (30.98, 0.4, 145.5)] == ["31.0", "0.400", "146"]


def test_write_markdown_and_pngs(tmp_path):
  _seq2seq_runs(tmp_path)
  runs = {"rnnsearch": {"command": "python -m experiments.run A", "returncode": 0, "seconds": 7.0},
          "luong": {"command": "python -m experiments.run B", "returncode": 1, "seconds": 1.0}}
  md = cr.write(str(tmp_path), ["rnnsearch", "transformer", "luong"], runs=runs, title="T")
  assert (tmp_path / "compare.md").read_text() == md
  assert md.startswith("# Comparison: T\n")
  assert "| rnnsearch | rnnsearch | 34900 | 4 | 7.000 |" in md
  assert "| test exact_match by source length | 0-9 (n=12) |" in md
  assert "![by length](compare_by_length.png)" in md and "![eval loss](compare_eval_loss.png)" in md
  assert "Not finished: luong." in md
  assert "    python -m experiments.run A\n    python -m experiments.run B" in md
  for png in ("compare_by_length.png", "compare_eval_loss.png"):
    data = (tmp_path / png).read_bytes()
    assert data[:8] == PNG and len(data) > 1000, png


def test_lm_runs_give_perplexity_and_bits(tmp_path):
  loss = 1.75 * math.log(2)   # 1.75 bits per token
  _run_dir(tmp_path, "lstm", "lstm_lm", "text", [
      {"step": 5, "eval/loss": 3.0, "eval/perplexity": 20.0},
      {"step": 10, "train/loss": 1.3, "model/num_params": 987654.0, "eval/loss": loss,
       "eval/perplexity": math.exp(loss), "eval/accuracy": 0.61}])
  _run_dir(tmp_path, "transformer", "transformer_lm", "text", [
      {"step": 10, "train/loss": 1.1, "model/num_params": 1.02e6, "eval/loss": math.log(4),
       "eval/perplexity": 4.0, "eval/accuracy": 0.7}])
  runs = cr.find_runs(str(tmp_path))
  assert all(r.is_lm and not r.synthetic for r in runs)
  table = cr.summary_table(runs).splitlines()
  assert table[0] == ("| run | model | params | steps | wall s | train loss | eval loss | eval ppl"
                      " | bits/token | eval acc |")
  assert table[2] == "| lstm | lstm_lm | 0.99M | 10 | – | 1.30 | 1.21 | 3.36 | 1.75 | 0.610 |"
  assert table[3] == ("| transformer | transformer_lm | 1.02M | 10 | – | 1.10 | 1.39 | 4.00 | 2.00"
                      " | 0.700 |")
  md = cr.write(str(tmp_path))
  assert "by source length" not in md and "compare_by_length" not in md
  assert not (tmp_path / "compare_by_length.png").exists()
  assert (tmp_path / "compare_eval_loss.png").read_bytes()[:8] == PNG


# ------------------------------------------------------------------ the CLI

def _main(capsys, *argv):
  try:
    rc = compare.main(list(argv))
  except SystemExit as e:   # argparse's own errors
    rc = e.code
  return rc, capsys.readouterr()


@pytest.mark.parametrize("args,needles", [
    (["--task", "multi30k"], ["--data_dir"]),
    (["--task", "text"], ["--data_path"]),
    (["--task", "reverse_long", "--families", "rnnsearch,lstm"], ["'lstm'", "--families"]),
    (["--task", "text", "--data_path", "x.txt", "--families", "rnnsearch"], ["'rnnsearch'"]),
    (["--task", "reverse_long", "--stpes", "3"], ["'--stpes'", "--config.key=value"]),
    (["--task", "reverse_long", "data.dir=x"], ["'data.dir=x'"]),
    (["--task", "text", "--data_path", "/nonexistent/t.txt"], ["/nonexistent/t.txt", "no such"]),
    (["--task", "multi30k", "--data_dir", "/nonexistent/m30k"], ["/nonexistent/m30k", "no such"]),
])
def test_cli_bad_input_one_line_errors(tmp_path, capsys, args, needles):
  rc, cap = _main(capsys, *args, "--workdir", str(tmp_path / "w"))
  assert rc == 2
  errors = [l for l in cap.err.splitlines() if l.startswith("error:")]
  assert len(errors) == 1, cap.err
  for needle in needles:
    assert needle in errors[0], errors[0]
  assert not (tmp_path / "w").exists()   # nothing trained, nothing written


def test_cli_argparse_errors_and_report_only_without_workdir(tmp_path, capsys):
  rc, cap = _main(capsys, "--task", "bogus", "--workdir", str(tmp_path))
  assert rc == 2 and "invalid choice: 'bogus'" in cap.err
  rc, cap = _main(capsys, "--task", "copy", "--report_only", "--workdir", str(tmp_path / "none"))
  assert rc == 2 and cap.err.startswith("error: --workdir") and "--report_only" in cap.err


def test_family_command_flags(tmp_path):
  args = compare._parser().parse_args(["--task", "multi30k", "--workdir", "w", "--size", "tiny",
                                       "--steps", "7", "--data_dir", "/d"])
  argv = compare.family_command("luong", args, "w/luong", ["--config.seed=2"])
  assert argv[:4] == [PY, "-m", "experiments.run", "--config"]
  assert argv[4] == f"{ROOT}/{CMP}:family=luong,task=multi30k,size=tiny"
  assert argv[5:] == ["--workdir", "w/luong", "--config.data.dir=/d",
                      "--config.num_train_steps=7", "--config.seed=2"]


def test_cli_subprocess_exit_code():
  res = subprocess.run([PY, "-m", "experiments.compare", "--task", "multi30k",
                        "--workdir", "/nope"], capture_output=True, text=True, timeout=60, cwd=ROOT)
  assert res.returncode == 2 and "Traceback" not in res.stderr
  assert [l for l in res.stderr.splitlines() if l.startswith("error:")] == [
      "error: --task multi30k needs --data_dir DIR (the Multi30k files; see"
      " experiments/data/parallel_text.py to download them)."]


# ------------------------------------------------------------------ end to end

TINY = ["--config.eval_every_steps=4", "--config.checkpoint_every_steps=4",
        "--config.log_every_steps=4", "--config.batch_size=8", "--config.eval_batch_size=8",
        "--config.num_eval_batches=1", "--config.data.num_eval=8",
        "--config.num_plot_examples=0"]
# Unoptimised XLA code compiles about 3x faster on CPU; the run is 4 tiny steps.
FAST_ENV = {**os.environ, "PYTHONUNBUFFERED": "1",
            "XLA_FLAGS": (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
                          " --xla_llvm_disable_expensive_passes=true").strip()}


def _compare_argv(w, *extra, families="rnnencdec,rnnsearch"):
  return [PY, "-m", "experiments.compare", "--task", "reverse_long", "--size", "tiny",
          "--families", families, "--steps", "4", "--workdir", str(w), *extra]


def _compare(w, *extra, families="rnnencdec,rnnsearch", timeout=300):
  cmd = _compare_argv(w, *extra, families=families)
  return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                        env=FAST_ENV)


def test_compare_failed_family_is_reported(tmp_path):
  w = tmp_path / "cmp"
  res = _compare(w, "--config.model.emb_dimm=3", families="rnnencdec", timeout=120)
  log = w / "rnnencdec" / "train.log"
  assert res.returncode == 1, res.stderr[-3000:]
  # The run's own one-line error is repeated, so the cause shows without the log.
  line = [l for l in res.stderr.splitlines() if l.startswith("error: rnnencdec exited with 2")]
  assert len(line) == 1 and line[0].endswith(f"; see {log}"), res.stderr[-3000:]
  assert "--config.model.emb_dimm: no such config field" in line[0]
  text = log.read_text()
  assert "Traceback" not in text and ("error: --config.model.emb_dimm: no such config field"
                                      " or bad value (Did you mean \"emb_dim\"") in text
  assert json.loads((w / "compare.json").read_text())["rnnencdec"]["returncode"] == 2
  assert "Not finished: rnnencdec." in (w / "compare.md").read_text()


def test_compare_end_to_end_skip_and_report_only(tmp_path, capsys):
  w = tmp_path / "cmp"
  res = _compare(w, *TINY)
  assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
  families = ["rnnencdec", "rnnsearch"]
  md = (w / "compare.md").read_text()
  assert res.stdout.startswith("[1/2] rnnencdec: training") and md in res.stdout
  recorded = json.loads((w / "compare.json").read_text())
  assert list(recorded) == families
  mtimes = {}
  for f in families:
    last = json.loads((w / f / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["step"] == 4 and math.isfinite(last["train/loss"])
    params = last["model/num_params"]
    assert params > 1000 and params == int(params)
    row = [l for l in md.splitlines() if l.startswith(f"| {f} | {f} |")]   # summary row
    assert len(row) == 1 and row[0].startswith(f"| {f} | {f} | {int(params)} | 4 | ")
    assert len([l for l in md.splitlines() if l.startswith(f"| {f} | ")]) == 2   # + by length
    rec = recorded[f]
    assert rec["returncode"] == 0 and rec["seconds"] > 0
    assert rec["command"] == (
        f"python -m experiments.run --config {CMP}:family={f},task=reverse_long,size=tiny"
        f" --workdir {w / f} --config.num_train_steps=4 " + " ".join(TINY))
    assert f"    {rec['command']}" in md
    mtimes[f] = os.stat(w / f / "metrics.jsonl").st_mtime_ns
  counts = json.loads((w / "rnnsearch" / "metrics.jsonl").read_text().splitlines()[-1])
  header = [l for l in md.splitlines() if l.startswith("| test exact_match by source length")]
  assert header and f"0-9 (n={int(counts['test_by_length/count_0-9'])})" in header[0]
  for png in ("compare_by_length.png", "compare_eval_loss.png"):
    assert (w / png).read_bytes()[:8] == PNG

  # The same command again, in-process (no training may start, so no subprocess is needed).
  argv = _compare_argv(w, *TINY)[3:]
  rc, again = _main(capsys, *argv)
  assert rc == 0, again.err[-3000:]
  for i, f in enumerate(families, 1):
    assert f"[{i}/2] {f}: done already ({w / f})" in again.out
  assert "training" not in again.out
  assert {f: os.stat(w / f / "metrics.jsonl").st_mtime_ns for f in families} == mtimes
  assert json.loads((w / "compare.json").read_text()) == recorded
  assert (w / "compare.md").read_text() == md

  (w / "compare.md").unlink()
  (w / "compare_eval_loss.png").unlink()
  rc, rebuilt = _main(capsys, *_compare_argv(w, "--report_only")[3:])
  assert rc == 0, rebuilt.err[-3000:]
  assert "done already" not in rebuilt.out and "training" not in rebuilt.out
  assert (w / "compare.md").read_text() == md
  assert (w / "compare_eval_loss.png").read_bytes()[:8] == PNG

  # A later call for one family keeps the rows of the families run before it.
  rc, one = _main(capsys, *_compare_argv(w, "--report_only", families="rnnsearch")[3:])
  assert rc == 0, one.err[-3000:]
  assert (w / "compare.md").read_text() == md

  # A family retrained from scratch (its folder deleted) gets its own wall time,
  # not one added to the deleted run's.
  runs = json.loads((w / "compare.json").read_text())
  runs["rnnencdec"]["seconds"] = 1e6
  (w / "compare.json").write_text(json.dumps(runs))
  shutil.rmtree(w / "rnnencdec")
  start = time.perf_counter()
  res = _compare(w, *TINY, families="rnnencdec")
  assert res.returncode == 0, res.stderr[-3000:]
  seconds = json.loads((w / "compare.json").read_text())["rnnencdec"]["seconds"]
  assert 0 < seconds < time.perf_counter() - start


def test_reports_mark_incomplete_runs_and_read_the_sweeps_own_folders(tmp_path):
  # A run that stopped after its step-5 eval of 10 keeps those metrics: the tables
  # must say so, not show them as final.
  done = _run_dir(tmp_path / "sweep", "a", "rnnsearch", "reverse",
                  [{"step": 10, "eval/loss": 1.0, "test/exact_match": 0.5}])
  cut = _run_dir(tmp_path / "sweep", "b", "rnnsearch", "reverse",
                 [{"step": 5, "eval/loss": 2.0, "test/exact_match": 0.25}])
  for d in (done, cut):
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "num_train_steps": 10}))
  # The manifest's paths point at a copy elsewhere (the sweep was moved): the
  # report must still read the folders under the sweep directory.
  elsewhere = _run_dir(tmp_path / "old", "a", "rnnsearch", "reverse",
                       [{"step": 10, "eval/loss": 9.0}])
  (tmp_path / "sweep" / "sweep.json").write_text(json.dumps({"trials": {
      "a": {"workdir": str(elsewhere)}, "b": {"workdir": "no/such/dir"}}}))
  runs = cr.find_runs(str(tmp_path / "sweep"))
  assert [r.get("eval/loss") for r in runs] == [1.0, 2.0]
  assert [r.incomplete for r in runs] == ["", "step 5/10"]
  table = cr.summary_table(runs).splitlines()
  assert table[2].startswith("| a | rnnsearch |")
  assert table[3].startswith("| b (incomplete: step 5/10) | rnnsearch |")
  md = cr.write(str(tmp_path / "sweep"), ["a", "b"], title="T")
  assert "Not finished: b (step 5/10: its last eval is shown)." in md
  # A torn line after the final eval (a kill mid-write) does not make it incomplete.
  with open(done / "metrics.jsonl", "a") as f:
    f.write('{"step": 1')
  assert cr.Run("a", str(done)).incomplete == ""


def test_length_table_and_plot_share_one_bucket_order(tmp_path, monkeypatch):
  _run_dir(tmp_path, "x", "rnnsearch", "reverse", [{
      "step": 1, "test_by_length/exact_match_10-19": 0.5, "test_by_length/count_10-19": 5.0}])
  _run_dir(tmp_path, "y", "rnnsearch", "reverse", [{
      "step": 1, "test_by_length/exact_match_0-9": 0.9, "test_by_length/count_0-9": 4.0,
      "test_by_length/exact_match_10-19": 0.4, "test_by_length/count_10-19": 6.0}])
  runs = cr.find_runs(str(tmp_path))
  assert cr.length_buckets(runs, "exact_match") == {"0-9": "4", "10-19": "5/6"}
  header = cr.length_table(runs, "exact_match").splitlines()[0]
  assert header == "| test exact_match by source length | 0-9 (n=4) | 10-19 (n=5/6) |"
  assert cr.plot_by_length(runs, "exact_match", str(tmp_path / "p.png"))
  # x is a position in one shared order, not a label placed where it first appears.
  seen = {}
  monkeypatch.setattr(cr, "_line_plot", lambda series, path, **kw: seen.update(series, **kw))
  cr.plot_by_length(runs, "exact_match", str(tmp_path / "q.png"))
  assert seen["xticks"] == ["0-9", "10-19"]
  assert seen["x"] == ([1], [0.5]) and seen["y"] == ([0, 1], [0.9, 0.4])
