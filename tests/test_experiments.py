"""End-to-end tiny runs of every experiment config, translate, and the CLI's bad-input errors."""

import gzip
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from experiments import generate, train

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "experiments" / "configs"


def load_config(name: str, arg: str | None = None):
  module = importlib.import_module(f"experiments.configs.{name}")
  return module.get_config(arg)


def write_text_corpus(path: Path) -> Path:
  lines = ["the quick brown fox jumps over the lazy dog."] * 40
  path.write_text("\n".join(f"{i} {line}" for i, line in enumerate(lines)) + "\n")
  return path


def write_parallel(d: Path, *, n=64, gz=True, bad=None) -> Path:
  d.mkdir(parents=True, exist_ok=True)
  words = "ein zwei drei vier fünf sechs sieben acht".split()
  english = "one two three four five six seven eight".split()
  for split in ("train", "val", "test_2016_flickr"):
    de, en = [], []
    for i in range(n):
      k = [(i * 7 + j) % 8 for j in range(2 + i % 5)]
      de.append(" ".join(words[j] for j in k))
      en.append(" ".join(english[j] for j in k))
    for lang, lines in (("de", de), ("en", en)):
      data = ("\n".join(lines) + "\n").encode()
      if bad == "count" and split == "train" and lang == "en":
        data = ("\n".join(lines[:-3]) + "\n").encode()
      if bad == "utf8" and split == "train" and lang == "de":
        data = data.replace("fünf".encode(), b"f\xffnf", 1)
      if bad == "empty" and split == "train" and lang == "en":
        data = data.replace(b"\n", b"\n\n", 1)
      path = d / f"{split}.{lang}{'.gz' if gz else ''}"
      path.write_bytes(gzip.compress(data) if gz else data)
  return d


def _last_metrics(workdir: Path) -> dict:
  lines = (workdir / "metrics.jsonl").read_text().strip().splitlines()
  return json.loads(lines[-1])


@pytest.mark.parametrize("name", ["transformer_mt", "rnnsearch_mt", "rnnencdec_mt", "luong_mt",
                                  "lstmn_mt"])
def test_translation_configs_tiny_end_to_end(name, tmp_path):
  c = load_config(name, "data=reverse,tiny" if name != "transformer_mt" else
                  "size=tiny,data=reverse,tiny")
  metrics = train.train_and_evaluate(c, str(tmp_path))
  assert metrics["step"] == c.num_train_steps
  for key in ("eval/loss", "eval/perplexity", "eval/accuracy", "eval/bleu"):
    assert key in metrics and metrics[key] == metrics[key], key   # present and not NaN
  assert (tmp_path / "config.json").is_file()
  assert list((tmp_path / "checkpoints").iterdir())
  assert list((tmp_path / "tensorboard").iterdir())
  if name != "rnnencdec_mt":
    assert list((tmp_path / "plots").glob("alignment_*.png"))


@pytest.mark.parametrize("name", ["transformer_lm", "lstmn_lm", "lstm_lm"])
def test_lm_configs_tiny_end_to_end(name, tmp_path):
  c = load_config(name, "tiny")
  c.data.path = str(write_text_corpus(tmp_path / "corpus.txt"))
  metrics = train.train_and_evaluate(c, str(tmp_path / "run"))
  assert metrics["step"] == c.num_train_steps
  assert 1.0 < metrics["eval/perplexity"] < 100
  # Each eval wrote a sample: a newline, then num_sample_tokens (16) characters.
  samples = (tmp_path / "run" / "samples.txt").read_text().split("=== step ")[1:]
  assert [s.split(" ===")[0] for s in samples] == ["10"]
  text = samples[0].split(" ===\n", 1)[1]
  assert text.startswith("\n") and 1 < len(text.rstrip("\n")) <= 17 and "<unk>" not in text
  # Sampling from the run: two samples, each the prompt and 12 characters.
  out = tmp_path / "samples.txt"
  args = ["--workdir", str(tmp_path / "run"), "--prompt", "3 the", "--length", "12",
          "--num_samples", "2", "--top_k", "5", "--seed", "3", "--output", str(out)]
  assert generate.main(args) == 0
  samples = out.read_text().split(f"\n{generate.SEPARATOR}\n")
  assert len(samples) == 2 and all(s.startswith("3 the") for s in samples)
  assert all(len(s.rstrip("\n")) <= len("3 the") + 12 for s in samples)
  assert generate.main(args) == 2                   # never overwrites without --overwrite
  assert out.read_text().split(f"\n{generate.SEPARATOR}\n") == samples
  assert generate.main(args + ["--overwrite"]) == 0
  assert out.read_text().split(f"\n{generate.SEPARATOR}\n") == samples   # same seed, same text


def test_generate_one_line_errors(tmp_path, capsys):
  assert generate.main(["--workdir", str(tmp_path / "none")]) == 2
  assert generate.main(["--workdir", str(tmp_path), "--length", "0"]) == 2
  assert generate.main(["--workdir", str(tmp_path), "--output", str(tmp_path / "no" / "x")]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 3 and "config.json not found" in err[0] and "--length" in err[1]
  assert "does not exist" in err[2]


def test_multi30k_layout_run_then_translate(tmp_path):
  data = write_parallel(tmp_path / "m30k")
  c = load_config("transformer_mt", "size=tiny,tiny")
  c.data.dir = str(data)
  c.data.tokenizer = "word"
  c.data.vocab_size = None
  workdir = tmp_path / "run"
  metrics = train.train_and_evaluate(c, str(workdir))
  assert "eval/bleu" in metrics and "eval_by_length/count_0-9" in metrics
  src = tmp_path / "input.de"
  src.write_text("ein zwei\ndrei vier fünf\n")
  out = tmp_path / "hyp.en"
  cmd = [sys.executable, "-m", "experiments.translate", "--workdir", str(workdir),
         "--input", str(src), "--output", str(out), "--beam_size", "2"]
  res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
  assert res.returncode == 0, res.stderr
  assert len(out.read_text().splitlines()) == 2
  again = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
  assert again.returncode == 2 and "exists" in again.stderr   # never overwrites
  assert generate.main(["--workdir", str(workdir)]) == 2     # not a language model


def _cli(tmp_path, *args, timeout=300):
  cmd = [sys.executable, "-m", "experiments.run", "--workdir", str(tmp_path / "w"), *args]
  return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                        env={**os.environ, "PYTHONUNBUFFERED": "1"})


def _one_line_error(res, *needles):
  assert res.returncode == 2, res.stderr[-2000:]
  assert "Traceback" not in res.stderr
  errors = [l for l in res.stderr.splitlines() if l.startswith("error:")]
  assert len(errors) == 1, res.stderr[-2000:]
  for needle in needles:
    assert needle in errors[0], errors[0]
  return errors[0]


MT = ["--config", str(CONFIGS / "transformer_mt.py") + ":size=tiny,tiny",
      "--config.data.tokenizer=word"]


@pytest.mark.parametrize("case,args,needles", [
    ("unknown field", ["--config.model.emb_dimm=3"], ["--config.model.emb_dimm", "emb_dim"]),
    ("bad type", ["--config.num_train_steps=abc"], ["num_train_steps"]),
    ("heads", ["--config.model.num_heads=3"], ["num_heads=3", "qkv_dim"]),
    ("no data dir", MT, ["data.dir"]),
    ("missing data dir", MT + ["--config.data.dir=/nonexistent/m30k"], ["/nonexistent/m30k"]),
    ("keep no checkpoint", ["--config.max_checkpoints_to_keep=0"],
     ["max_checkpoints_to_keep=0", ">= 1"]),
    ("no steps", ["--config.num_train_steps=0"], ["num_train_steps=0"]),
    ("log every 0", ["--config.log_every_steps=0"], ["log_every_steps=0"]),
    ("schedule", ["--config.schedule=noam"], ["schedule='noam'", "rsqrt"]),
    ("data field", ["--config.data.max_len=0"], ["data.max_len=0"]),
    ("data name", ["--config.data.name=revers"], ["revers", "reverse"]),
    ("no config file", ["--config", "experiments/configs/nope.py"], ["nope.py", "No such file"]),
    ("config arg", ["--config", str(CONFIGS / "transformer_mt.py") + ":size=huge"],
     ["size='huge'", "multi30k"]),
])
def test_cli_bad_input_one_line_errors(tmp_path, case, args, needles):
  _one_line_error(_cli(tmp_path, *args), *needles)
  assert not (tmp_path / "w").exists()   # refused, and no empty workdir left behind


def test_cli_empty_workdir_is_refused(tmp_path):
  cmd = [sys.executable, "-m", "experiments.run", "--workdir", ""]
  res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
  _one_line_error(res, "--workdir is empty")
  assert not list(tmp_path.iterdir())   # nothing written into the current directory


@pytest.mark.parametrize("bad,needle", [("count", "train."), ("utf8", "UTF-8"),
                                        ("empty", "empty")])
def test_cli_bad_corpus_one_line_errors(tmp_path, bad, needle):
  data = write_parallel(tmp_path / "m30k", bad=bad)
  err = _one_line_error(_cli(tmp_path, *MT, f"--config.data.dir={data}"), needle)
  assert str(data) in err


def test_none_default_fields_can_be_overridden(tmp_path):
  # data.dir defaults to None (a typed placeholder) and still accepts a value.
  data = write_parallel(tmp_path / "m30k", gz=False)
  res = _cli(tmp_path, *MT, f"--config.data.dir={data}", "--config.num_train_steps=2",
             "--config.eval_every_steps=2", "--config.decode.enabled=False",
             "--config.num_plot_examples=0")
  assert res.returncode == 0, res.stderr[-3000:]
  assert "outputs in" in res.stdout
  # experiments.run re-executes itself with huge pages where that helps.
  from attention import huge_pages
  if "GLIBC_TUNABLES" not in os.environ and huge_pages.huge_pages_environ(
      {}, glibc=huge_pages.glibc_version(), thp=huge_pages.thp_mode()) is not None:
    assert "host huge pages: on" in res.stderr, res.stderr[-3000:]
  assert json.loads((tmp_path / "w" / "config.json").read_text())["data"]["dir"] == str(data)


def test_default_config_needs_only_workdir():
  c = load_config("default")
  assert c.data.name in ("copy", "reverse", "sort", "swap")
  assert c.model.name == "transformer"


@pytest.mark.parametrize("field,value", [
    ("max_checkpoints_to_keep", 0), ("batch_size", -4), ("grad_accum_steps", 0),
    ("num_train_steps", 0), ("num_eval_batches", 0), ("decode.beam_size", 0),
    ("learning_rate", -1e-3), ("label_smoothing", 1.0), ("eval_every_steps", True),
])
def test_check_fields_names_the_field(field, value):
  from experiments.configs import default
  from experiments.models import ConfigError
  c = default.get_config()
  train.check_fields(c)   # the default is fine
  node, _, leaf = field.rpartition(".")
  (c[node] if node else c)[leaf] = value
  with pytest.raises(ConfigError, match=rf"^{field}={value!r} "):
    train.check_fields(c)


def test_config_json_without_checkpoint_is_replaced_and_kept(tmp_path):
  from experiments.checkpoints import ResumeError, check_and_write_config
  check_and_write_config({"batch_size": 64}, tmp_path, None)
  # Stopped before its first checkpoint, the run restarts with another batch size:
  # no checkpoint holds the old one, so it is not a resume and is not refused.
  check_and_write_config({"batch_size": 32}, tmp_path, None)
  assert json.loads((tmp_path / "config.json").read_text()) == {"batch_size": 32}
  assert json.loads((tmp_path / "config.unused-1.json").read_text()) == {"batch_size": 64}
  with pytest.raises(ResumeError, match="batch_size was 32, now 16"):
    check_and_write_config({"batch_size": 16}, tmp_path, 10)   # with a checkpoint



def test_resume_of_a_run_from_before_num_sample_tokens_is_accepted(tmp_path):
  # A workdir written before the field existed lacks it; the field only shapes
  # eval output, so resuming with it (or changing it) must not be refused.
  from experiments.checkpoints import check_and_write_config
  from experiments.configs import default
  config = default.get_config().to_dict()
  old = {k: v for k, v in config.items() if k != "num_sample_tokens"}
  check_and_write_config(old, tmp_path, None)
  check_and_write_config(config, tmp_path, 10)
  check_and_write_config({**config, "num_sample_tokens": 0}, tmp_path, 20)
  assert json.loads((tmp_path / "config.resume-20.json").read_text())["num_sample_tokens"] == 0
  assert "num_sample_tokens" not in json.loads((tmp_path / "config.json").read_text())


def test_grad_clip_norm_zero_keeps_optimizer_structure_and_does_not_clip():
  import jax
  import jax.numpy as jnp
  import optax
  from experiments import optim
  from experiments.configs import default
  params = {"w": jnp.arange(3.0)}
  grads = {"w": jnp.array([30.0, -40.0, 0.0])}   # global norm 50
  states, updates = [], []
  for clip in (0.0, 1.0):
    c = default.get_config()
    c.grad_clip_norm = clip
    tx = optim.make_optimizer(c)
    state = tx.init(params)
    states.append(jax.tree.structure(state))
    updates.append(tx.update(grads, state, params)[0]["w"])
  assert states[0] == states[1]   # a resume may change grad_clip_norm
  plain = optax.adamw(1.0, b1=0.9, b2=0.98, eps=1e-9, weight_decay=0.0)
  c = default.get_config()
  scale = c.learning_rate
  want = plain.update(grads, plain.init(params), params)[0]["w"] * scale
  np.testing.assert_allclose(updates[0], want, rtol=1e-6)   # 0: no clipping
  clipped = plain.update(jax.tree.map(lambda g: g / 50.0, grads), plain.init(params),
                         params)[0]["w"] * scale
  np.testing.assert_allclose(updates[1], clipped, rtol=1e-6)


def test_every_top_level_config_field_is_classed_for_resume():
  # A field added to the configs must be put in RESUMABLE_CHANGES or here, on
  # purpose: a field in neither makes every run written before it unresumable
  # (its old config lacks the field, which then reads as a change).
  from experiments.checkpoints import RESUMABLE_CHANGES
  fixed_on_resume = {"adam_b1", "adam_b2", "adam_eps", "batch_size", "data",
                     "grad_accum_steps", "model", "model_parallelism", "seed"}
  for name, arg in [("default", None), ("transformer_lm", "tiny"), ("compare", "task=text")]:
    keys = set(load_config(name, arg).keys())
    assert keys - set(RESUMABLE_CHANGES) == fixed_on_resume, name
