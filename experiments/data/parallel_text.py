"""Parallel corpora in the Multi30k layout, and the Multi30k downloader.

A corpus directory holds one file per split and language, named
``{split}.{lang}`` or ``{split}.{lang}.gz`` (e.g. ``train.en.gz``,
``val.de``), UTF-8, one sentence per line, line ``i`` of the source file
translating line ``i`` of the target file. Every problem is reported as a
one-line :class:`DataError` naming the file and the fix.

Run ``python -m experiments.data.parallel_text DEST_DIR`` to download
Multi30k (task 1) into ``DEST_DIR``.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Sequence

import numpy as np

from experiments.data.files import DataError, atomic_write_bytes, read_lines
from experiments.data.tokenizers import Tokenizer, build_tokenizer

DEFAULT_URL = "https://raw.githubusercontent.com/multi30k/dataset/master/data/task1/raw"
MULTI30K_SPLITS = ("train", "val", "test_2016_flickr")
MULTI30K_LANGS = ("en", "de", "fr")

__all__ = ["DEFAULT_URL", "MULTI30K_LANGS", "MULTI30K_SPLITS", "ParallelData", "Split",
           "corpus_file", "download_multi30k", "load_parallel", "load_parallel_data"]


def corpus_file(data_dir: str | os.PathLike, split: str, lang: str) -> Path:
  """Finds ``{split}.{lang}`` or ``{split}.{lang}.gz`` in ``data_dir``.

  Raises:
    DataError: The directory or the file is missing, or both the plain and
      the gzip version exist (it would be ambiguous which one is current).
  """
  data_dir = Path(data_dir)
  if not data_dir.is_dir():
    raise DataError(
        f"{data_dir}: data directory not found; pass --config.data.dir=/path/to/corpus "
        "or download Multi30k with: python -m experiments.data.parallel_text DIR")
  plain, gz = data_dir / f"{split}.{lang}", data_dir / f"{split}.{lang}.gz"
  if plain.exists() and gz.exists():
    raise DataError(f"{plain}: both it and {gz.name} exist; delete the stale one")
  if plain.exists():
    return plain
  if gz.exists():
    return gz
  raise DataError(
      f"{gz}: missing (nor is there an uncompressed {plain.name}); check "
      f"data.dir and the split/language names, or download the corpus")


def load_parallel(data_dir: str | os.PathLike, split: str, src_lang: str,
                  tgt_lang: str) -> tuple[list[str], list[str]]:
  """Reads and validates the sentence pairs of one split.

  Returns:
    ``(sources, targets)``, aligned lists of stripped, non-empty sentences.

  Raises:
    DataError: A file is missing or bad (see :func:`read_lines`), or the two
      files have different numbers of lines.
  """
  if src_lang == tgt_lang:
    raise DataError(f"source and target language are both {src_lang!r}; set "
                    "data.source_lang and data.target_lang to different languages")
  src_path = corpus_file(data_dir, split, src_lang)
  tgt_path = corpus_file(data_dir, split, tgt_lang)
  sources = read_lines(src_path, what="corpus file")
  targets = read_lines(tgt_path, what="corpus file")
  if len(sources) != len(targets):
    raise DataError(
        f"{src_path}: has {len(sources)} lines but {tgt_path} has {len(targets)}; "
        "parallel files must be line-aligned: repair or re-download the pair")
  return sources, targets


@dataclasses.dataclass
class Split:
  """One tokenised split; ids exclude BOS/EOS."""

  src: list[np.ndarray]
  tgt: list[np.ndarray]
  src_text: list[str]
  tgt_text: list[str]


@dataclasses.dataclass
class ParallelData:
  """Tokenised parallel corpus with its vocabularies."""

  src_vocab: Tokenizer
  tgt_vocab: Tokenizer
  train: Split
  eval: Split
  test: Split | None
  stats: dict[str, int]


def _encode(tokenizer: Tokenizer, texts: Sequence[str]) -> list[np.ndarray]:
  return [np.asarray(ids, np.int32) for ids in tokenizer.encode_batch(texts)]


def load_parallel_data(data_dir: str | os.PathLike, *, src_lang: str, tgt_lang: str,
                       train_split: str, eval_split: str, test_split: str | None,
                       tokenizer: str, vocab_size: int | None, shared_vocab: bool,
                       max_len: int, min_count: int = 1, model_type: str = "unigram",
                       cache_dir: str | os.PathLike | None = None,
                       src_vocab: Tokenizer | None = None,
                       tgt_vocab: Tokenizer | None = None) -> ParallelData:
  """Reads, tokenises and length-filters a parallel corpus.

  Vocabularies are built on the training split only (SentencePiece models
  are cached in ``cache_dir``). Training pairs whose source or target needs
  more than ``max_len`` positions (tokens + EOS/BOS) are dropped and
  counted in ``stats["train_dropped"]``; eval and test pairs are kept whole
  so scores cover the full standard sets.

  Args:
    data_dir: Corpus directory.
    src_lang: Source language suffix, e.g. ``"en"``.
    tgt_lang: Target language suffix, e.g. ``"de"``.
    train_split: Split to train on (and build vocabularies from).
    eval_split: Split evaluated during training.
    test_split: Optional held-out split.
    tokenizer: ``"char"``, ``"word"`` or ``"sentencepiece"``.
    vocab_size: See :func:`build_tokenizer`.
    shared_vocab: One vocabulary for both languages (``src_vocab is
      tgt_vocab``), e.g. for tied embeddings.
    max_len: Longest padded training sequence.
    min_count: Minimum token frequency for ``char``/``word``.
    model_type: SentencePiece model type.
    cache_dir: SentencePiece cache directory.
    src_vocab: Use this vocabulary instead of building one.
    tgt_vocab: Use this vocabulary instead of building one.
  """
  train_src, train_tgt = load_parallel(data_dir, train_split, src_lang, tgt_lang)
  eval_src, eval_tgt = load_parallel(data_dir, eval_split, src_lang, tgt_lang)
  test = load_parallel(data_dir, test_split, src_lang, tgt_lang) if test_split else None

  def build(texts: list[str]) -> Tokenizer:
    return build_tokenizer(tokenizer, texts, vocab_size=vocab_size, min_count=min_count,
                           model_type=model_type, cache_dir=cache_dir)

  if src_vocab is None or tgt_vocab is None:
    if shared_vocab:
      src_vocab = tgt_vocab = build(train_src + train_tgt)
    else:
      src_vocab, tgt_vocab = build(train_src), build(train_tgt)

  def split(sources: list[str], targets: list[str]) -> Split:
    return Split(_encode(src_vocab, sources), _encode(tgt_vocab, targets),
                 sources, targets)

  train = split(train_src, train_tgt)
  keep = [i for i, (s, t) in enumerate(zip(train.src, train.tgt))
          if max(len(s), len(t)) + 1 <= max_len]
  dropped = len(train.src) - len(keep)
  if not keep:
    raise DataError(f"{corpus_file(data_dir, train_split, src_lang)}: all "
                    f"{len(train.src)} training pairs exceed max_len={max_len} "
                    "tokens; raise data.max_len")
  if dropped:
    logging.info("Dropped %d of %d training pairs longer than max_len=%d tokens",
                 dropped, len(train.src), max_len)
    if dropped > 0.1 * len(train.src):
      logging.warning("max_len=%d drops %.0f%% of the training pairs; consider "
                      "raising data.max_len", max_len, 100 * dropped / len(train.src))
    train = Split(*([getattr(train, f.name)[i] for i in keep]
                    for f in dataclasses.fields(Split)))
  held_out = [split(eval_src, eval_tgt)] + ([split(*test)] if test else [])
  stats = {"train_pairs": len(keep), "train_dropped": dropped,
           "eval_pairs": len(eval_src), "test_pairs": len(test[0]) if test else 0,
           # Eval/test pairs are never dropped: a model whose positional
           # table or decode length stops at max_len must cover this too.
           "eval_max_len": max(max(len(s), len(t)) + 1 for part in held_out
                               for s, t in zip(part.src, part.tgt))}
  return ParallelData(src_vocab, tgt_vocab, train, held_out[0],
                      held_out[1] if test else None, stats)


def download_multi30k(dest_dir: str | os.PathLike, base_url: str = DEFAULT_URL,
                      splits: Sequence[str] = MULTI30K_SPLITS,
                      langs: Sequence[str] = MULTI30K_LANGS, *, overwrite: bool = False,
                      timeout: float = 60.0) -> list[Path]:
  """Downloads ``{base_url}/{split}.{lang}.gz`` into ``dest_dir``.

  Existing files are kept (and not re-fetched) unless ``overwrite``. Each
  file is written atomically, so an interrupted download leaves no partial
  file behind.

  Args:
    dest_dir: Directory to fill (created if needed).
    base_url: URL of the folder with the ``.gz`` files; any urllib scheme,
      including ``file://``.
    splits: Split names.
    langs: Language suffixes.
    overwrite: Replace files that already exist.
    timeout: Seconds per request.

  Returns:
    The paths of all requested files.

  Raises:
    DataError: A download failed or did not return gzip data.
  """
  dest_dir = Path(dest_dir)
  dest_dir.mkdir(parents=True, exist_ok=True)
  paths = []
  for split in splits:
    for lang in langs:
      path = dest_dir / f"{split}.{lang}.gz"
      paths.append(path)
      if path.exists() and not overwrite:
        logging.info("Keeping existing %s", path)
        continue
      url = f"{base_url.rstrip('/')}/{split}.{lang}.gz"
      try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
          data = response.read()
      except (urllib.error.URLError, OSError, ValueError) as e:
        raise DataError(f"{url}: download failed ({e}); check the network and "
                        f"base_url, or copy the files into {dest_dir}") from e
      if not data.startswith(b"\x1f\x8b"):
        raise DataError(f"{url}: response is not a gzip file; check base_url "
                        "(it must point at the folder holding the .gz files)")
      atomic_write_bytes(path, data)
      logging.info("Downloaded %s (%d bytes)", path, len(data))
  return paths


def main(argv: Sequence[str] | None = None) -> None:
  """Command line: download Multi30k."""
  parser = argparse.ArgumentParser(description="Download Multi30k (task 1).")
  parser.add_argument("dest_dir")
  parser.add_argument("--base-url", default=DEFAULT_URL)
  parser.add_argument("--splits", nargs="+", default=list(MULTI30K_SPLITS))
  parser.add_argument("--langs", nargs="+", default=list(MULTI30K_LANGS))
  parser.add_argument("--overwrite", action="store_true")
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(message)s")
  try:
    download_multi30k(args.dest_dir, args.base_url, args.splits, args.langs,
                      overwrite=args.overwrite)
  except DataError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  main()
