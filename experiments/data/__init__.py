"""Input pipeline: one entry point, :func:`create_datasets`, for every task.

Token ids: PAD = 0, BOS = 1, EOS = 2, UNK = 3. Batches are dicts of numpy
int32 arrays (eval batches add float32 ``weights``, bool ``mask`` and int32
``index``):

* seq2seq: ``src [B, S]`` (tokens + EOS), ``tgt_in [B, T]`` (BOS + tokens),
  ``tgt_out [B, T]`` (tokens + EOS), PAD-filled.
* lm: ``inputs [B, T]`` and ``targets [B, T]`` (the next tokens).

``data_config`` fields (``None`` or absent means the task default, see
:func:`default_config`):

* ``name``: ``copy``/``reverse``/``sort``/``swap``/``addition`` (synthetic),
  ``multi30k`` or ``parallel`` (parallel text), ``text`` (language model).
* ``dir``: corpus directory of ``{split}.{lang}[.gz]`` files (parallel text).
* ``path``: text file (``text``).
* ``source_lang``, ``target_lang``: language suffixes (``en``, ``de``).
* ``tokenizer``: ``char``, ``word`` or ``sentencepiece`` (parallel: default
  ``sentencepiece``; text: ``char`` or ``sentencepiece``, default ``char``).
* ``vocab_size``: SentencePiece size (8000 parallel, 1000 text) or the word
  vocabulary cap (default unlimited); specials included.
* ``shared_vocab``: one vocabulary for source and target (default False).
* ``max_len``: synthetic: longest training sequence in symbols (16);
  parallel: longest padded training sequence in tokens incl. EOS/BOS (64),
  longer training pairs are dropped.
* ``min_len``: shortest synthetic training sequence (1).
* ``eval_min_len``, ``eval_max_len``: synthetic eval length range (default:
  the training range).
* ``num_symbols``: synthetic vocabulary size without specials (16).
* ``num_eval``: synthetic eval (and test) set size (512).
* ``train_split``, ``eval_split``, ``test_split``: parallel split names
  (``train``, ``val``; test ``test_2016_flickr`` for multi30k, none for
  ``parallel``).
* ``seq_len``: LM window length (256).
* ``val_fraction``: LM validation fraction, taken from the end (0.1).
* ``bucket_step``: parallel length-bucket granularity (8).
* ``min_count``: minimum frequency of char/word tokens (1).
* ``spm_model_type``: SentencePiece ``unigram`` or ``bpe`` (``unigram``).
* ``cache_dir``: SentencePiece model cache; set it to share trained models
  between runs (default: ``workdir/spm_cache``; no workdir: no caching).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from ml_collections import config_dict

from experiments.data import synthetic, text_lm
from experiments.data.files import DataError, atomic_write_bytes
from experiments.data.iterators import (Batch, BucketedSeq2SeqIterator,
                                        CheckpointableIterator, LMWindowIterator,
                                        eval_lm_batches, eval_lm_windows,
                                        eval_seq2seq_batches)
from experiments.data.tokenizers import (BOS, EOS, PAD, UNK, Tokenizer, load_tokenizer)

__all__ = ["BOS", "EOS", "PAD", "UNK", "DataError", "Datasets", "create_datasets",
           "default_config", "load_vocabs"]

_PARALLEL = ("multi30k", "parallel")
_NAMES = synthetic.TASKS + _PARALLEL + ("text",)
_OPTIONAL_INT = ("vocab_size", "eval_min_len", "eval_max_len")
# Settings that determine the vocabulary; a workdir's saved vocabulary is only
# reused when these match, so a resumed run cannot silently change ids.
_VOCAB_KEYS = {
    "synthetic": ("name", "num_symbols"),
    "parallel": ("name", "tokenizer", "vocab_size", "shared_vocab", "min_count",
                 "spm_model_type", "source_lang", "target_lang", "train_split"),
    "text": ("name", "tokenizer", "vocab_size", "min_count", "spm_model_type",
             "val_fraction"),
}


def _vocab_settings(c: dict[str, Any]) -> dict[str, Any]:
  family = ("synthetic" if c["name"] in synthetic.TASKS
            else "parallel" if c["name"] in _PARALLEL else "text")
  return {k: c[k] for k in _VOCAB_KEYS[family]}


@dataclasses.dataclass
class Datasets:
  """Everything a trainer needs from the data.

  Attributes:
    task: ``"seq2seq"`` or ``"lm"``.
    train: Infinite checkpointable iterator of local training batches.
    eval: Returns a fresh finite iterator over the eval set.
    test: Like ``eval`` for the test set, or None.
    src_vocab: Source tokenizer (for LM the same object as ``tgt_vocab``).
    tgt_vocab: Target tokenizer.
    eval_sources: Source text of eval example ``i`` (batch ``index``); LM:
      the text of input window ``i``.
    eval_references: Reference translation of example ``i``; LM: the text
      of target window ``i``.
    test_sources: As ``eval_sources`` for the test set.
    test_references: As ``eval_references`` for the test set.
    config: The resolved data settings.
    stats: Example counts (and training pairs dropped for length).
  """

  task: str
  train: CheckpointableIterator
  eval: Callable[[], Iterator[Batch]]
  test: Callable[[], Iterator[Batch]] | None
  src_vocab: Tokenizer
  tgt_vocab: Tokenizer
  eval_sources: list[str]
  eval_references: list[str]
  test_sources: list[str]
  test_references: list[str]
  config: dict[str, Any]
  stats: dict[str, int]


def _defaults(name: str, tokenizer: str | None) -> dict[str, Any]:
  if name not in _NAMES:
    raise ValueError(f"unknown data.name {name!r}: use one of {', '.join(_NAMES)}")
  d = dict(name=name, dir=None, path=None, source_lang="en", target_lang="de",
           tokenizer=None, vocab_size=None, shared_vocab=False, max_len=16, min_len=1,
           eval_min_len=None, eval_max_len=None, num_symbols=16, num_eval=512,
           train_split="train", eval_split="val", test_split=None, seq_len=256,
           val_fraction=0.1, bucket_step=8, min_count=1, spm_model_type="unigram",
           cache_dir=None)
  if name in _PARALLEL:
    d.update(tokenizer=tokenizer or "sentencepiece", max_len=64)
    if name == "multi30k":
      d.update(test_split="test_2016_flickr")
  elif name == "text":
    d.update(tokenizer=tokenizer or "char")
  if d["tokenizer"] == "sentencepiece":
    d.update(vocab_size=1000 if name == "text" else 8000)
  return d


def default_config(name: str = "copy") -> config_dict.ConfigDict:
  """The data config with every field set to the default for ``name``.

  Fields whose default depends on other fields (``vocab_size`` on the
  tokenizer, the eval length range on the training one) and optional paths
  are typed ``None`` placeholders, resolved by :func:`create_datasets`; being
  typed, they still accept command-line overrides such as
  ``--config.data.dir=/path``.
  """
  d = _defaults(name, None)
  d.update(vocab_size=None, eval_min_len=None, eval_max_len=None)
  for key, value in d.items():
    if value is None:
      d[key] = config_dict.placeholder(int if key in _OPTIONAL_INT else str)
  return config_dict.ConfigDict(d)


def _field(cfg: Any, key: str) -> Any:
  if isinstance(cfg, Mapping):
    return cfg.get(key)
  try:
    return getattr(cfg, key)
  except (AttributeError, KeyError):
    return None


_POSITIVE_INTS = ("max_len", "min_len", "num_symbols", "num_eval", "seq_len", "bucket_step",
                  "min_count")


def _resolve(cfg: Any) -> dict[str, Any]:
  name = _field(cfg, "name")
  if not name:
    raise ValueError("data.name is not set: use one of " + ", ".join(_NAMES))
  resolved = _defaults(name, _field(cfg, "tokenizer"))
  for key in resolved:
    value = _field(cfg, key)
    if value is not None:
      resolved[key] = value
  for key in _POSITIVE_INTS:
    value = resolved[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise DataError(f"data.{key}={value!r} must be an integer >= 1; set"
                      f" --config.data.{key}=N.")
  if resolved["eval_min_len"] is None:
    resolved["eval_min_len"] = resolved["min_len"]
  if resolved["eval_max_len"] is None:
    resolved["eval_max_len"] = resolved["max_len"]
  return resolved


def _cache_dir(c: dict[str, Any], workdir: str | None) -> Path | None:
  # Data directories are often shared and read-only by convention (root can
  # write anyway), so the pipeline never writes there unless asked to.
  if c["cache_dir"]:
    return Path(c["cache_dir"])
  return Path(workdir) / "spm_cache" if workdir else None


def load_vocabs(directory: str | os.PathLike) -> tuple[Tokenizer, Tokenizer]:
  """Restores ``(src_vocab, tgt_vocab)`` saved by :func:`create_datasets`.

  Args:
    directory: The run's workdir (or its ``vocab`` subdirectory).

  Returns:
    The two tokenizers; the same object when the vocabulary is shared.
  """
  directory = Path(directory)
  if not (directory / "meta.json").is_file():
    directory = directory / "vocab"
  meta = json.loads((directory / "meta.json").read_text())
  src = load_tokenizer(directory / "src")
  return src, (src if meta["shared"] else load_tokenizer(directory / "tgt"))


def _saved_vocabs(workdir: str | None, c: dict[str, Any]) -> tuple | None:
  if not workdir or not (Path(workdir) / "vocab" / "meta.json").is_file():
    return None
  meta = json.loads((Path(workdir) / "vocab" / "meta.json").read_text())
  want = _vocab_settings(c)
  if meta.get("settings") != want:
    changed = sorted(k for k in want if meta.get("settings", {}).get(k) != want[k])
    raise DataError(
        f"{Path(workdir) / 'vocab'}: saved vocabulary was built with different data "
        f"settings ({', '.join(changed)}); use a fresh --workdir or restore them")
  logging.info("Reusing the vocabulary saved in %s/vocab", workdir)
  return load_vocabs(workdir)


def _save_vocabs(workdir: str, c: dict[str, Any], src: Tokenizer, tgt: Tokenizer) -> None:
  directory = Path(workdir) / "vocab"
  src.save(directory / "src")
  if tgt is not src:
    tgt.save(directory / "tgt")
  meta = {"shared": tgt is src, "settings": _vocab_settings(c)}
  # meta.json last: its presence marks a complete save.
  atomic_write_bytes(directory / "meta.json", json.dumps(meta, indent=1).encode())


def create_datasets(data_config: Any, *, seed: int, batch_size: int,
                    eval_batch_size: int | None = None, workdir: str | None = None,
                    process_index: int = 0, process_count: int = 1) -> Datasets:
  """Builds the training stream, eval/test sets and vocabularies.

  Args:
    data_config: ConfigDict-like object (or mapping) with the fields in the
      module docstring.
    seed: Seed of the training order / synthetic data.
    batch_size: Global training batch size in sequences; each process gets
      ``batch_size // process_count`` rows.
    eval_batch_size: Global eval batch size (default ``batch_size``).
    workdir: Run directory. The vocabulary is saved to ``workdir/vocab``
      (by process 0) and reused from there on resume; see
      :func:`load_vocabs`.
    process_index: This process (``jax.process_index()``).
    process_count: Number of processes (``jax.process_count()``).

  Raises:
    DataError: Missing or malformed data (one-line message naming the file).
    ValueError: Inconsistent settings, e.g. a batch size not divisible by
      ``process_count``.
  """
  c = _resolve(data_config)
  eval_batch_size = eval_batch_size or batch_size
  shard = dict(process_index=process_index, process_count=process_count)
  saved = _saved_vocabs(workdir, c)
  name = c["name"]

  if name in synthetic.TASKS:
    src_vocab = tgt_vocab = synthetic.make_vocab(name, c["num_symbols"])
    train = synthetic.SyntheticStream(
        name, batch_size=batch_size, seed=seed, min_len=c["min_len"],
        max_len=c["max_len"], num_symbols=c["num_symbols"], **shard)
    lengths = synthetic.padded_lengths(name, c["eval_max_len"])
    sets = [synthetic.eval_set(name, seed=seed, split=split, num=c["num_eval"],
                               min_len=c["eval_min_len"], max_len=c["eval_max_len"],
                               num_symbols=c["num_symbols"]) for split in (1, 2)]

    def make_eval(src, tgt):
      return lambda: eval_seq2seq_batches(src, tgt, batch_size=eval_batch_size,
                                          lengths=lengths, **shard)

    texts = [([src_vocab.decode(s) for s in src], [tgt_vocab.decode(t) for t in tgt])
             for src, tgt in sets]
    result = Datasets("seq2seq", train, make_eval(*sets[0]), make_eval(*sets[1]),
                      src_vocab, tgt_vocab, *texts[0], *texts[1], c,
                      {"eval_examples": c["num_eval"], "test_examples": c["num_eval"],
                       # The longest padded sequence, training's included (an
                       # addition source is 2 * max_len + 2 long): it sizes the
                       # model's position table.
                       "eval_max_len": max(synthetic.padded_lengths(
                           name, max(c["max_len"], c["eval_max_len"])))})

  elif name in _PARALLEL:
    if not c["dir"]:
      corpus = "multi30k" if name == "multi30k" else "corpus"
      raise DataError(f"data.dir is not set: pass --config.data.dir=/path/to/{corpus}")
    # Imported here, not at the top: `python -m experiments.data.parallel_text`
    # (the downloader) would otherwise find the module already imported by this
    # package and warn.
    from experiments.data import parallel_text
    data = parallel_text.load_parallel_data(
        c["dir"], src_lang=c["source_lang"], tgt_lang=c["target_lang"],
        train_split=c["train_split"], eval_split=c["eval_split"],
        test_split=c["test_split"], tokenizer=c["tokenizer"],
        vocab_size=c["vocab_size"], shared_vocab=c["shared_vocab"],
        max_len=c["max_len"], min_count=c["min_count"],
        model_type=c["spm_model_type"],
        cache_dir=_cache_dir(c, workdir),
        src_vocab=saved[0] if saved else None, tgt_vocab=saved[1] if saved else None)
    train = BucketedSeq2SeqIterator(
        data.train.src, data.train.tgt, batch_size=batch_size, seed=seed,
        max_len=c["max_len"], bucket_step=c["bucket_step"], **shard)

    def make_eval(split):
      return lambda: eval_seq2seq_batches(split.src, split.tgt,
                                          batch_size=eval_batch_size,
                                          bucket_step=c["bucket_step"], **shard)

    test = data.test
    result = Datasets("seq2seq", train, make_eval(data.eval),
                      make_eval(test) if test else None, data.src_vocab, data.tgt_vocab,
                      data.eval.src_text, data.eval.tgt_text,
                      test.src_text if test else [], test.tgt_text if test else [],
                      c, data.stats)

  else:  # text
    if not c["path"]:
      raise DataError("data.path is not set: pass --config.data.path=/path/to/text.txt")
    path = Path(c["path"])
    data = text_lm.load_text_lm(
        path, tokenizer=c["tokenizer"], seq_len=c["seq_len"],
        val_fraction=c["val_fraction"], vocab_size=c["vocab_size"],
        model_type=c["spm_model_type"], min_count=c["min_count"],
        cache_dir=_cache_dir(c, workdir),
        vocab=saved[0] if saved else None)
    train = LMWindowIterator(data.train, seq_len=c["seq_len"], batch_size=batch_size,
                             seed=seed, **shard)
    val, seq_len = data.val, c["seq_len"]
    starts = eval_lm_windows(len(val), seq_len)
    sources = [data.vocab.decode(val[s:s + seq_len]) for s in starts]
    references = [data.vocab.decode(val[s + 1:s + seq_len + 1]) for s in starts]
    result = Datasets(
        "lm", train,
        lambda: eval_lm_batches(val, seq_len=seq_len, batch_size=eval_batch_size, **shard),
        None, data.vocab, data.vocab, sources, references, [], [], c,
        {**data.stats, "eval_windows": len(starts)})

  if workdir and saved is None and process_index == 0:
    _save_vocabs(workdir, c, result.src_vocab, result.tgt_vocab)
  logging.info("Data %s: %s; vocab sizes %d/%d", name, result.stats,
               result.src_vocab.size, result.tgt_vocab.size)
  return result

