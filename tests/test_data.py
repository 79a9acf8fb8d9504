"""Input pipeline: synthetic tasks, tokenizers, parallel text, LM text, iterators."""

import gzip
import json
import os
from pathlib import Path

import numpy as np
import pytest

from experiments.data import DataError, create_datasets, default_config, load_vocabs
from experiments.data import parallel_text, synthetic, tokenizers
from experiments.data.iterators import (BucketedSeq2SeqIterator, LMWindowIterator,
                                        eval_seq2seq_batches)
from experiments.data.tokenizers import BOS, EOS, PAD, UNK

SRC = ["a man walks his dog", "two girls play in the park", "a red car",
       "the old man reads a long book in the garden", "children run",
       "a woman sings a song on a big stage tonight", "dogs bark", "a boy eats"]
TGT = ["ein mann geht mit seinem hund", "zwei mädchen spielen im park", "ein rotes auto",
       "der alte mann liest ein langes buch im garten", "kinder rennen",
       "eine frau singt heute abend ein lied auf einer großen bühne", "hunde bellen",
       "ein junge isst"]


def write(path, lines, gz=False, raw=None):
  data = raw if raw is not None else "".join(line + "\n" for line in lines).encode()
  if gz:
    with gzip.open(path, "wb") as f:
      f.write(data)
  else:
    path.write_bytes(data)
  return path


def make_corpus(root, n_train=40):
  """A tiny corpus: gz train (with a deliberate mix), plain val and test."""
  root.mkdir(exist_ok=True)
  rng = np.random.default_rng(0)
  pick = rng.integers(0, len(SRC), n_train)
  write(root / "train.en.gz", [SRC[i] for i in pick], gz=True)
  write(root / "train.de.gz", [TGT[i] for i in pick], gz=True)
  write(root / "val.en", SRC[:5])
  write(root / "val.de", TGT[:5])
  write(root / "test.en", SRC[5:])
  write(root / "test.de", TGT[5:])
  return root


def parallel_config(root, **overrides):
  c = default_config("parallel")
  c.dir, c.tokenizer, c.test_split, c.max_len, c.cache_dir = (
      str(root), "word", "test", 16, str(root))
  c.update(overrides)
  return c


def take(it, n):
  return [next(it) for _ in range(n)]


def assert_batches_equal(xs, ys):
  assert len(xs) == len(ys)
  for x, y in zip(xs, ys):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


def assert_one_line_naming(excinfo, *names):
  message = str(excinfo.value)
  assert "\n" not in message
  for name in names:
    assert str(name) in message, (name, message)


# ---------------------------------------------------------------- synthetic


@pytest.mark.parametrize("task", synthetic.TASKS)
def test_synthetic_targets_are_correct(task):
  batch = synthetic.generate(task, np.random.default_rng(3), 64, min_len=1, max_len=9,
                             num_symbols=7)
  assert batch["src"].shape == (64, synthetic.padded_lengths(task, 9)[0])
  for src, tgt_in, tgt_out in zip(batch["src"], batch["tgt_in"], batch["tgt_out"]):
    s = src[:np.argmax(src == EOS)]
    t = tgt_out[:np.argmax(tgt_out == EOS)]
    np.testing.assert_array_equal(t, synthetic.transform(task, s))
    assert (src[len(s) + 1:] == PAD).all() and (tgt_out[len(t) + 1:] == PAD).all()
    np.testing.assert_array_equal(tgt_in[:len(t) + 1], np.r_[BOS, t])
    assert (tgt_in[len(t) + 1:] == PAD).all()


def test_synthetic_reference_transforms():
  s = np.array([4, 9, 6, 5, 8])
  np.testing.assert_array_equal(synthetic.transform("reverse", s), [8, 5, 6, 9, 4])
  np.testing.assert_array_equal(synthetic.transform("sort", s), [4, 5, 6, 8, 9])
  np.testing.assert_array_equal(synthetic.transform("swap", s), [6, 5, 8, 4, 9])
  vocab = synthetic.make_vocab("addition", 0)
  src = vocab.encode("4 7 + 5 8")
  assert vocab.decode(synthetic.transform("addition", np.array(src))) == "1 0 5"


def test_synthetic_deterministic_lengths_and_vocab():
  c = default_config("reverse")
  c.update(min_len=2, max_len=5, eval_min_len=7, eval_max_len=11, num_symbols=5,
           num_eval=30)
  a, b = (create_datasets(c, seed=7, batch_size=16) for _ in range(2))
  other = create_datasets(c, seed=8, batch_size=16)
  first = take(a.train, 3)
  assert_batches_equal(first, take(b.train, 3))
  assert not np.array_equal(first[0]["src"], next(other.train)["src"])
  for batch in first:
    lengths = (batch["src"] != PAD).sum(1) - 1
    assert lengths.min() >= 2 and lengths.max() <= 5
  eval_batches = list(a.eval())
  assert sum(int(x["mask"].sum()) for x in eval_batches) == 30
  assert {x["src"].shape for x in eval_batches} == {(16, 12)}
  lengths = np.concatenate([(x["src"][x["mask"]] != PAD).sum(1) - 1
                            for x in eval_batches])
  assert lengths.min() >= 7 and lengths.max() <= 11 and len(set(lengths)) > 1
  assert a.src_vocab.size == tokenizers.NUM_SPECIAL + 5
  words = a.eval_sources[0].split()
  assert 7 <= len(words) <= 11 and set(words) <= set("abcde")
  assert a.eval_references[0] == " ".join(reversed(words))
  assert a.stats["eval_max_len"] == 12  # sizes the model's positions: eval's 11 + EOS
  plain = default_config("copy")
  plain.max_len = 5  # the eval range follows the training range unless set
  assert next(create_datasets(plain, seed=0, batch_size=2).eval())["src"].shape == (2, 6)



def test_synthetic_longest_sequence_covers_addition_sources():
  # An addition source is a + b EOS: 2 * max_len + 2 tokens, longer than any
  # length setting; the trainer sizes the position table from this stat.
  c = default_config("addition")
  c.update(max_len=8, eval_max_len=150, num_eval=4)
  ds = create_datasets(c, seed=0, batch_size=4)
  longest = max(x["src"].shape[1] for x in ds.eval())
  assert ds.stats["eval_max_len"] == 302 >= longest > 150
  c.update(max_len=40, eval_max_len=None)
  assert create_datasets(c, seed=0, batch_size=4).stats["eval_max_len"] == 82


# ---------------------------------------------------------------- tokenizers


def test_char_and_word_tokenizers_round_trip_and_save(tmp_path):
  char = tokenizers.CharTokenizer.build(["hello world", "hold"])
  ids = char.encode("hello")
  assert min(ids) >= tokenizers.NUM_SPECIAL and char.decode(ids) == "hello"
  assert char.encode("hz")[1] == UNK
  assert char.decode([BOS] + ids + [EOS] + char.encode("xx") + [PAD]) == "hello"
  assert char.tokens(char.encode("o w")) == ["o", "\u2423", "w"]

  word = tokenizers.WordTokenizer.build(["a b b c", "c c d"], min_count=2)
  assert word.size == tokenizers.NUM_SPECIAL + 2  # c (3x), b (2x)
  assert word.encode("c b a") == [4, 5, UNK]
  assert word.decode([BOS, 4, 5, PAD, EOS, 5]) == "c b"
  capped = tokenizers.WordTokenizer.build(["a b b c c c"], max_size=tokenizers.NUM_SPECIAL + 1)
  assert capped.tokens(capped.encode("c b")) == ["c", "<unk>"]

  for tok in (char, word):
    tok.save(tmp_path / tok.kind)
    loaded = tokenizers.load_tokenizer(tmp_path / tok.kind)
    assert type(loaded) is type(tok) and loaded.to_json() == tok.to_json()


def test_sentencepiece_round_trip_cache_and_invalidation(tmp_path, monkeypatch):
  spm = pytest.importorskip("sentencepiece")
  corpus = [s for s in SRC + TGT for _ in range(3)]
  cache = tmp_path / "cache"
  tok = tokenizers.SentencePieceTokenizer.train(corpus, vocab_size=60, cache_dir=cache)
  [cached] = list(cache.iterdir())
  assert cached.name.startswith("spm_unigram_60_") and cached.suffix == ".model"
  text = "a man reads a book in the park"
  ids = tok.encode(text)
  assert min(ids) >= tokenizers.NUM_SPECIAL and tok.decode(ids) == text
  assert tok.decode([BOS] + ids + [EOS, 5, 6]) == text
  assert tok.tokens([PAD, BOS, EOS]) == ["<pad>", "<s>", "</s>"]

  tok.save(tmp_path / "saved")
  assert tokenizers.load_tokenizer(tmp_path / "saved").encode(text) == ids

  def no_training(*args, **kwargs):
    raise AssertionError("a cached model was retrained")

  monkeypatch.setattr(spm.SentencePieceTrainer, "train", no_training)
  again = tokenizers.SentencePieceTokenizer.train(corpus, vocab_size=60, cache_dir=cache)
  assert again.to_json() == tok.to_json()
  monkeypatch.undo()
  tokenizers.SentencePieceTokenizer.train(corpus + ["one more line"], vocab_size=60,
                                          cache_dir=cache)
  assert len(list(cache.glob("spm_unigram_60_*.model"))) == 2


def test_sentencepiece_model_does_not_depend_on_the_cpu_count(monkeypatch):
  # SentencePiece's result depends on its thread count: a vocabulary built on
  # a 1-core and a 16-core host from the same texts must still agree.
  pytest.importorskip("sentencepiece")
  from sentencepiece import sentencepiece_model_pb2
  corpus = [s for s in SRC + TGT for _ in range(3)]
  models = []
  for cores in (1, 2, 64):
    monkeypatch.setattr(os, "cpu_count", lambda cores=cores: cores)
    models.append(tokenizers.SentencePieceTokenizer.train(corpus, vocab_size=60)._proto)
  assert models[0] == models[1] == models[2]
  spec = sentencepiece_model_pb2.ModelProto.FromString(models[0]).trainer_spec
  assert spec.num_threads == tokenizers._SPM_THREADS


# ---------------------------------------------------------------- parallel text


def test_parallel_loading_batches_and_eval(tmp_path):
  root = make_corpus(tmp_path / "corpus")
  ds = create_datasets(parallel_config(root), seed=0, batch_size=4, eval_batch_size=4)
  assert ds.task == "seq2seq" and ds.src_vocab is not ds.tgt_vocab
  pairs = set(zip(SRC, TGT))
  batch = next(ds.train)
  for src, tgt_in, tgt_out in zip(batch["src"], batch["tgt_in"], batch["tgt_out"]):
    assert (ds.src_vocab.decode(src), ds.tgt_vocab.decode(tgt_out)) in pairs
    n = int(np.argmax(tgt_out == EOS))
    np.testing.assert_array_equal(tgt_in[1:n + 1], tgt_out[:n])
    assert tgt_in[0] == BOS and (tgt_out[n + 1:] == PAD).all()

  assert ds.eval_sources == SRC[:5] and ds.eval_references == TGT[:5]
  assert ds.test_sources == SRC[5:]
  batches = list(ds.eval())
  assert len(batches) == 2
  last = batches[-1]
  np.testing.assert_array_equal(last["index"], [4, -1, -1, -1])
  np.testing.assert_array_equal(last["mask"], [True, False, False, False])
  assert (last["src"][1:] == PAD).all() and (last["weights"][1:] == 0).all()
  np.testing.assert_array_equal(last["weights"][0], last["tgt_out"][0] != PAD)
  assert ds.tgt_vocab.decode(last["tgt_out"][0]) == TGT[4]
  assert sum(int(b["mask"].sum()) for b in ds.test()) == 3


def test_shared_vocab_plain_train_files_and_length_filter(tmp_path):
  root = tmp_path / "plain"
  root.mkdir()
  write(root / "train.en", SRC)
  write(root / "train.de", TGT)
  write(root / "val.en.gz", SRC[:2], gz=True)
  write(root / "val.de.gz", TGT[:2], gz=True)
  ds = create_datasets(parallel_config(root, shared_vocab=True, max_len=8,
                                       test_split=None), seed=0, batch_size=2)
  assert ds.src_vocab is ds.tgt_vocab and ds.test is None
  too_long = sum(max(len(s.split()), len(t.split())) + 1 > 8 for s, t in zip(SRC, TGT))
  assert too_long > 0 and ds.stats["train_dropped"] == too_long
  assert ds.stats["train_pairs"] == len(SRC) - too_long
  assert ds.stats["eval_max_len"] == 6 + 1  # "ein mann geht mit seinem hund" + EOS


def test_bucketing_few_shapes_and_correct_padding():
  rng = np.random.default_rng(0)
  lengths = rng.integers(1, 40, size=300)
  src = [rng.integers(4, 50, size=n).astype(np.int32) for n in lengths]
  tgt = [(s + 1)[:max(1, len(s) - 2)] for s in src]  # equal sources, equal targets
  it = BucketedSeq2SeqIterator(src, tgt, batch_size=8, seed=1, max_len=44)
  seen, shapes = set(), set()
  for batch in take(it, it.batches_per_epoch):
    shapes.add(batch["src"].shape)
    for row in range(8):
      s_row, t_row = batch["src"][row], batch["tgt_out"][row]
      n = int(np.argmax(s_row == EOS))
      key = tuple(s_row[:n])
      match = [i for i in range(300) if tuple(src[i]) == key]
      assert match, "row is not a source sentence + EOS"
      seen.update(match)
      assert (s_row[n + 1:] == PAD).all()
      m = int(np.argmax(t_row == EOS))
      np.testing.assert_array_equal(t_row[:m], tgt[match[0]])
  assert seen == set(range(300))  # one epoch covers every example
  assert it.epoch == 0
  next_epoch = take(it, 3)
  assert it.epoch == 1
  assert not all(np.array_equal(a["src"], b["src"])
                 for a, b in zip(next_epoch, take(BucketedSeq2SeqIterator(
                     src, tgt, batch_size=8, seed=1, max_len=44), 3)))
  widths = {w for _, w in shapes}
  assert all(w % 8 == 0 or w == 44 for w in widths) and len(widths) <= 6
  assert {b for b, _ in shapes} == {8}


def test_iterator_resume_matches_uninterrupted_run():
  rng = np.random.default_rng(0)
  src = [rng.integers(4, 20, size=n).astype(np.int32) for n in rng.integers(1, 20, 37)]
  tgt = [s[::-1].copy() for s in src]
  tokens = rng.integers(4, 30, size=500).astype(np.int32)
  makers = [
      lambda: BucketedSeq2SeqIterator(src, tgt, batch_size=4, seed=5, max_len=24),
      lambda: LMWindowIterator(tokens, seq_len=16, batch_size=4, seed=5),
      lambda: synthetic.SyntheticStream("sort", batch_size=4, seed=5, min_len=1,
                                        max_len=6, num_symbols=5),
  ]
  for make in makers:
    it = make()
    # Save two batches before the end of an epoch so the m batches cross it.
    take(it, getattr(it, "batches_per_epoch", 13) - 2)
    state = json.loads(json.dumps(it.get_state()))
    expected = take(it, 9)
    resumed = make()
    resumed.set_state(state)
    assert_batches_equal(take(resumed, 9), expected)
    assert getattr(resumed, "epoch", 1) == 1
  state = makers[0]().get_state()
  with pytest.raises(ValueError, match="batch_size"):
    BucketedSeq2SeqIterator(src, tgt, batch_size=8, seed=5, max_len=24).set_state(state)


def test_process_slices_concatenate_to_global_batch():
  rng = np.random.default_rng(1)
  src = [rng.integers(4, 20, size=n).astype(np.int32) for n in rng.integers(1, 30, 50)]
  tokens = rng.integers(4, 30, size=400).astype(np.int32)
  makers = [
      lambda **kw: BucketedSeq2SeqIterator(src, src, batch_size=6, seed=2, max_len=32, **kw),
      lambda **kw: LMWindowIterator(tokens, seq_len=8, batch_size=6, seed=2, **kw),
      lambda **kw: synthetic.SyntheticStream("swap", batch_size=6, seed=2, min_len=1,
                                             max_len=7, num_symbols=4, **kw),
      lambda **kw: eval_seq2seq_batches(src[:13], src[:13], batch_size=6, **kw),
  ]
  for make in makers:
    whole = take(make(), 3)
    parts = [take(make(process_index=i, process_count=2), 3) for i in range(2)]
    for k, batch in enumerate(whole):
      for key in batch:
        np.testing.assert_array_equal(
            np.concatenate([parts[0][k][key], parts[1][k][key]]), batch[key])
  with pytest.raises(ValueError, match="divisible by process_count=4"):
    LMWindowIterator(tokens, seq_len=8, batch_size=6, seed=2, process_count=4)


# ---------------------------------------------------------------- bad inputs


def test_bad_parallel_inputs_raise_one_line_errors(tmp_path):
  with pytest.raises(DataError) as e:
    create_datasets(parallel_config(tmp_path / "nope"), seed=0, batch_size=2)
  assert_one_line_naming(e, tmp_path / "nope")
  with pytest.raises(DataError, match="data.dir is not set: pass "
                     "--config.data.dir=/path/to/multi30k"):
    create_datasets(default_config("multi30k"), seed=0, batch_size=2)

  cases = {
      "missing": lambda d: os.remove(d / "val.de"),
      "count": lambda d: write(d / "val.de", TGT[:4]),
      "empty": lambda d: write(d / "val.de", [TGT[0], "  ", *TGT[2:5]]),
      "utf8": lambda d: write(d / "val.de", None, raw=b"ok\nok\nbad \xff byte\nok\nok\n"),
      "gzip": lambda d: (d / "train.de.gz").write_bytes(b"\x1f\x8bnot really"),
  }
  expect = {"missing": ["val.de.gz"], "count": ["val.en", "val.de", "5", "4"],
            "empty": ["val.de:2", "empty line"], "utf8": ["val.de:3", "UTF-8"],
            "gzip": ["train.de.gz", "gzip"]}
  for name, damage in cases.items():
    root = make_corpus(tmp_path / name)
    damage(root)
    with pytest.raises(DataError) as e:
      create_datasets(parallel_config(root), seed=0, batch_size=2)
    assert_one_line_naming(e, *expect[name])
    assert isinstance(e.value, ValueError)


# ---------------------------------------------------------------- text LM


def test_text_lm_windows_shift_by_one_and_eval_covers_val(tmp_path):
  text = "".join(f"line {i}: to be or not to be.\n" for i in range(60))
  path = tmp_path / "input.txt"
  path.write_text(text)
  c = default_config("text")
  c.update(path=str(path), seq_len=16, val_fraction=0.25)
  ds = create_datasets(c, seed=0, batch_size=4, eval_batch_size=8, workdir=str(tmp_path / "w"))
  assert ds.task == "lm" and ds.src_vocab is ds.tgt_vocab
  cut = round(len(text) * 0.75)
  for batch in take(ds.train, 5):
    assert batch["inputs"].shape == (4, 16)
    np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])
    for inp, tgt in zip(batch["inputs"], batch["targets"]):
      window = ds.src_vocab.decode(np.r_[inp, tgt[-1:]])
      assert window in text[:cut]
  targets = [b["targets"][b["weights"] > 0] for b in ds.eval()]
  assert ds.src_vocab.decode(np.concatenate(targets)) == text[cut + 1:]
  assert ds.eval_sources[0] == text[cut:cut + 16]
  assert ds.eval_references[0] == text[cut + 1:cut + 17]
  src, tgt = load_vocabs(tmp_path / "w")
  assert src is tgt and src.to_json() == ds.src_vocab.to_json()


def test_text_lm_sentencepiece_keeps_layout(tmp_path):
  pytest.importorskip("sentencepiece")
  text = "".join(f"ROMEO:\nline {i}, good  night.\n\n" for i in range(80))
  path = tmp_path / "t.txt"
  path.write_text(text)
  c = default_config("text")
  c.update(path=str(path), tokenizer="sentencepiece", vocab_size=60, seq_len=8,
           cache_dir=str(tmp_path))
  ds = create_datasets(c, seed=0, batch_size=2)
  targets = [b["targets"][b["weights"] > 0] for b in ds.eval()]
  val = text[round(len(text) * 0.9):]
  assert ds.src_vocab.decode(np.concatenate(targets)) in val


def test_text_lm_bad_files(tmp_path):
  c = default_config("text")
  bad = {"missing.txt": None, "empty.txt": b"  \n", "latin1.txt": "caf\xe9\n".encode("latin1")}
  for name, data in bad.items():
    if data is not None:
      (tmp_path / name).write_bytes(data)
    c.path = str(tmp_path / name)
    with pytest.raises(DataError) as e:
      create_datasets(c, seed=0, batch_size=2)
    assert_one_line_naming(e, name)


# ---------------------------------------------------------------- workdir, download


def test_workdir_vocab_is_saved_and_guarded(tmp_path):
  root = make_corpus(tmp_path / "corpus")
  workdir = tmp_path / "run"
  ds = create_datasets(parallel_config(root), seed=0, batch_size=2, workdir=str(workdir))
  src, tgt = load_vocabs(workdir)
  assert src.to_json() == ds.src_vocab.to_json() and tgt.to_json() == ds.tgt_vocab.to_json()
  with pytest.raises(DataError) as e:
    create_datasets(parallel_config(root, tokenizer="char"), seed=0, batch_size=2,
                    workdir=str(workdir))
  assert_one_line_naming(e, workdir / "vocab", "tokenizer")


def test_download_multi30k_from_file_url(tmp_path):
  remote = make_corpus(tmp_path / "remote")
  for split in ("val", "test"):
    for lang in ("en", "de"):
      write(remote / f"{split}.{lang}.gz", None, gz=True,
            raw=(remote / f"{split}.{lang}").read_bytes())
  dest = tmp_path / "dest"
  url = remote.as_uri()
  paths = parallel_text.download_multi30k(dest, url, ("train", "val"), ("en", "de"))
  assert sorted(p.name for p in dest.iterdir()) == sorted(p.name for p in paths)
  for p in paths:
    assert p.read_bytes() == (remote / p.name).read_bytes()
  (dest / "val.en.gz").write_bytes(b"local edit")
  parallel_text.download_multi30k(dest, url, ("val",), ("en",))
  assert (dest / "val.en.gz").read_bytes() == b"local edit"
  parallel_text.download_multi30k(dest, url, ("val",), ("en",), overwrite=True)
  assert (dest / "val.en.gz").read_bytes() == (remote / "val.en.gz").read_bytes()
  with pytest.raises(DataError) as e:
    parallel_text.download_multi30k(dest, url, ("nosuch",), ("en",))
  assert_one_line_naming(e, "nosuch.en.gz")
  assert not (dest / "nosuch.en.gz").exists()


def test_downloader_cli_runs_clean_from_a_file_url(tmp_path):
  import subprocess
  import sys
  remote = make_corpus(tmp_path / "remote")
  write(remote / "val.en.gz", None, gz=True, raw=(remote / "val.en").read_bytes())
  res = subprocess.run([sys.executable, "-m", "experiments.data.parallel_text",
                        str(tmp_path / "dest"), "--base-url", remote.as_uri(),
                        "--splits", "val", "--langs", "en"],
                       capture_output=True, text=True, timeout=120,
                       cwd=Path(__file__).resolve().parents[1])
  assert res.returncode == 0, res.stderr
  assert "Warning" not in res.stderr   # runpy warned when the package imported it first
  assert (tmp_path / "dest" / "val.en.gz").read_bytes() == (remote / "val.en.gz").read_bytes()
