"""Tokenizers with fixed special ids, and their save/load format.

Every tokenizer reserves the same four ids, so models, losses and decoders
never need to ask which tokenizer produced a batch:

  PAD = 0 (padding, ignored by losses), BOS = 1, EOS = 2, UNK = 3.

A tokenizer is saved to a directory as ``tokenizer.json`` (plus
``sentencepiece.model`` for SentencePiece) and restored with
:func:`load_tokenizer`, so evaluation and translation use exactly the
vocabulary the model was trained with.
"""

from __future__ import annotations

import collections
import hashlib
import io
import json
import logging
import os
from pathlib import Path
from typing import Iterable, Protocol, Sequence, runtime_checkable

from experiments.data.files import atomic_write_bytes

PAD, BOS, EOS, UNK = 0, 1, 2, 3
NUM_SPECIAL = 4
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")
_CONFIG_FILE = "tokenizer.json"
_SP_FILE = "sentencepiece.model"
_FORMAT_VERSION = 1
# SentencePiece training threads, fixed so the vocabulary does not depend on
# the machine (see SentencePieceTokenizer.train).
_SPM_THREADS = 16

__all__ = [
    "PAD", "BOS", "EOS", "UNK", "NUM_SPECIAL", "SPECIAL_TOKENS", "Tokenizer",
    "CharTokenizer", "WordTokenizer", "SentencePieceTokenizer", "build_tokenizer",
    "load_tokenizer",
]


@runtime_checkable
class Tokenizer(Protocol):
  """What the training system needs from a vocabulary."""

  kind: str

  @property
  def size(self) -> int:
    """Number of ids, specials included (the embedding table size)."""

  def encode(self, text: str) -> list[int]:
    """Text to ids, without BOS/EOS (the batcher adds those)."""

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    """:meth:`encode` for many texts (faster for SentencePiece)."""

  def decode(self, ids: Iterable[int]) -> str:
    """Ids to text; stops at the first EOS and skips PAD and BOS."""

  def tokens(self, ids: Iterable[int]) -> list[str]:
    """One display string per id (specials included), for plot labels."""

  def save(self, directory: str | os.PathLike) -> None:
    """Writes the tokenizer so :func:`load_tokenizer` restores it exactly."""

  def to_json(self) -> dict:
    """A JSON-serialisable description; equal iff the vocabularies agree."""


def _content_ids(ids: Iterable[int]) -> list[int]:
  out = []
  for i in ids:
    i = int(i)
    if i == EOS:
      break
    if i not in (PAD, BOS):
      out.append(i)
  return out


def _ranked(counts: collections.Counter, min_count: int, max_size: int | None) -> list[str]:
  # Frequency-then-lexicographic order makes the vocabulary a pure
  # function of the training text, so rebuilding it reproduces the ids.
  ranked = sorted((t for t, c in counts.items()
                   if c >= min_count and t not in SPECIAL_TOKENS),
                  key=lambda t: (-counts[t], t))
  if max_size is not None:
    if max_size <= NUM_SPECIAL:
      raise ValueError(f"max_size={max_size} leaves no room beside the "
                       f"{NUM_SPECIAL} special tokens")
    ranked = ranked[: max_size - NUM_SPECIAL]
  return ranked


class _TableTokenizer:
  """A tokenizer defined by an explicit list of token strings."""

  kind = "table"
  _separator = ""

  def __init__(self, tokens: Sequence[str]):
    tokens = list(tokens)
    if len(set(tokens)) != len(tokens):
      raise ValueError("tokenizer tokens must be unique")
    clash = set(tokens) & set(SPECIAL_TOKENS)
    if clash:
      raise ValueError(f"tokens {sorted(clash)} clash with the special tokens")
    self._id_to_token = list(SPECIAL_TOKENS) + tokens
    self._token_to_id = {t: i for i, t in enumerate(self._id_to_token)}

  @property
  def size(self) -> int:
    return len(self._id_to_token)

  def _split(self, text: str) -> Iterable[str]:
    raise NotImplementedError

  def encode(self, text: str) -> list[int]:
    get = self._token_to_id.get
    return [get(t, UNK) for t in self._split(text)]

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return [self.encode(t) for t in texts]

  def decode(self, ids: Iterable[int]) -> str:
    table = self._id_to_token
    return self._separator.join(
        table[i] if 0 <= i < len(table) else SPECIAL_TOKENS[UNK]
        for i in _content_ids(ids))

  def tokens(self, ids: Iterable[int]) -> list[str]:
    table = self._id_to_token
    return [table[int(i)] if 0 <= int(i) < len(table) else SPECIAL_TOKENS[UNK]
            for i in ids]

  def to_json(self) -> dict:
    return {"type": self.kind, "version": _FORMAT_VERSION,
            "tokens": self._id_to_token[NUM_SPECIAL:]}

  def save(self, directory: str | os.PathLike) -> None:
    text = json.dumps(self.to_json(), ensure_ascii=False, indent=0)
    atomic_write_bytes(Path(directory) / _CONFIG_FILE, text.encode("utf-8"))

  def __repr__(self) -> str:
    return f"{type(self).__name__}(size={self.size})"


class CharTokenizer(_TableTokenizer):
  """One token per Unicode character; unseen characters map to UNK."""

  kind = "char"
  _DISPLAY = {" ": "\u2423", "\n": "\u21b5", "\t": "\u21e5"}

  def _split(self, text: str) -> Iterable[str]:
    return text

  def tokens(self, ids: Iterable[int]) -> list[str]:
    # Blank characters would be invisible as plot tick labels.
    return [self._DISPLAY.get(t, t) for t in super().tokens(ids)]

  @classmethod
  def build(cls, texts: Iterable[str], *, min_count: int = 1,
            max_size: int | None = None) -> "CharTokenizer":
    """Builds the vocabulary of characters seen at least ``min_count`` times.

    Args:
      texts: Training texts.
      min_count: Rarer characters become UNK.
      max_size: Cap on the vocabulary size, specials included.
    """
    counts = collections.Counter()
    for text in texts:
      counts.update(text)
    return cls(_ranked(counts, min_count, max_size))


class WordTokenizer(_TableTokenizer):
  """Whitespace-separated words; decoding joins them with single spaces."""

  kind = "word"
  _separator = " "

  def _split(self, text: str) -> Iterable[str]:
    return text.split()

  @classmethod
  def build(cls, texts: Iterable[str], *, min_count: int = 1,
            max_size: int | None = None) -> "WordTokenizer":
    """Builds the vocabulary of words seen at least ``min_count`` times.

    Args:
      texts: Training texts.
      min_count: Rarer words become UNK.
      max_size: Cap on the vocabulary size, specials included; the most
        frequent words are kept.
    """
    counts = collections.Counter()
    for text in texts:
      counts.update(text.split())
    return cls(_ranked(counts, min_count, max_size))


class SentencePieceTokenizer:
  """A SentencePiece model whose special ids follow this module's constants."""

  kind = "sentencepiece"

  def __init__(self, model_proto: bytes):
    import sentencepiece as spm  # optional dependency; only loaded when used

    self._proto = bytes(model_proto)
    self._sp = spm.SentencePieceProcessor(model_proto=self._proto)
    got = (self._sp.pad_id(), self._sp.bos_id(), self._sp.eos_id(), self._sp.unk_id())
    if got != (PAD, BOS, EOS, UNK):
      raise ValueError(
          f"SentencePiece model has (pad, bos, eos, unk) ids {got}, expected "
          f"{(PAD, BOS, EOS, UNK)}; train it with SentencePieceTokenizer.train")

  @property
  def size(self) -> int:
    return self._sp.get_piece_size()

  def encode(self, text: str) -> list[int]:
    return list(self._sp.encode(text))

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return [list(ids) for ids in self._sp.encode(list(texts))]

  def decode(self, ids: Iterable[int]) -> str:
    return self._sp.decode(_content_ids(ids))

  def tokens(self, ids: Iterable[int]) -> list[str]:
    size = self.size
    return [self._sp.id_to_piece(int(i)) if 0 <= int(i) < size
            else SPECIAL_TOKENS[UNK] for i in ids]

  def to_json(self) -> dict:
    return {"type": self.kind, "version": _FORMAT_VERSION, "model_file": _SP_FILE,
            "sha256": hashlib.sha256(self._proto).hexdigest()}

  def save(self, directory: str | os.PathLike) -> None:
    directory = Path(directory)
    atomic_write_bytes(directory / _SP_FILE, self._proto)
    atomic_write_bytes(directory / _CONFIG_FILE,
                       json.dumps(self.to_json(), indent=0).encode("utf-8"))

  @classmethod
  def train(cls, texts: Sequence[str], *, vocab_size: int, model_type: str = "unigram",
            cache_dir: str | os.PathLike | None = None, keep_newlines: bool = False,
            character_coverage: float = 1.0) -> "SentencePieceTokenizer":
    """Trains a model on ``texts``, or loads it from the cache.

    The cache file is named
    ``spm_{model_type}_{vocab_size}_{hash}.model``, where the hash covers
    the training text and every training option, so editing the data or
    the options can never pick up a stale model.

    Args:
      texts: Training sentences (the training split only).
      vocab_size: Requested size, specials included. On a corpus too small
        for it the model comes out smaller rather than failing; check
        :attr:`size`.
      model_type: ``"unigram"``, ``"bpe"``, ``"char"`` or ``"word"``.
      cache_dir: Directory for the cached model; ``None`` disables caching.
      keep_newlines: Make ``"\\n"`` a token and keep whitespace verbatim,
        for language modelling on running text. Texts should then end in
        ``"\\n"`` where the original had a line break.
      character_coverage: Fraction of characters the model must cover.

    Returns:
      The tokenizer.
    """
    import sentencepiece as spm

    # A fixed thread count, not the machine's: SentencePiece's result depends on
    # it, and every host of a multi-host run (and every rerun elsewhere) must
    # build the same vocabulary from the same texts.
    options = dict(vocab_size=int(vocab_size), model_type=model_type,
                   character_coverage=float(character_coverage),
                   pad_id=PAD, bos_id=BOS, eos_id=EOS, unk_id=UNK,
                   hard_vocab_limit=False, num_threads=_SPM_THREADS)
    if keep_newlines:
      options.update(user_defined_symbols=["\n"], normalization_rule_name="identity",
                     remove_extra_whitespaces=False, add_dummy_prefix=False)
    digest = hashlib.sha256(json.dumps(options, sort_keys=True).encode())
    for text in texts:
      digest.update(text.encode("utf-8"))
      digest.update(b"\0")
    name = f"spm_{model_type}_{int(vocab_size)}_{digest.hexdigest()[:16]}.model"
    cached = Path(cache_dir) / name if cache_dir is not None else None
    if cached is not None and cached.is_file():
      logging.info("Loading cached SentencePiece model %s", cached)
      return cls(cached.read_bytes())
    if not texts:
      raise ValueError("cannot train SentencePiece on an empty corpus")

    buffer = io.BytesIO()
    logging.info("Training a %d-piece SentencePiece %s model on %d texts", int(vocab_size),
                 model_type, len(texts))
    try:
      spm.SentencePieceTrainer.train(
          sentence_iterator=iter(texts), model_writer=buffer, minloglevel=2,
          input_sentence_size=5_000_000, shuffle_input_sentence=True, **options)
    except RuntimeError as e:  # e.g. an unknown model_type or a vocab_size it cannot reach
      raise ValueError(f"SentencePiece training failed ({' '.join(str(e).split())[:200]});"
                       " check data.vocab_size and data.spm_model_type") from None
    tokenizer = cls(buffer.getvalue())
    logging.info("Trained SentencePiece %s model: %d pieces (asked for %d)",
                 model_type, tokenizer.size, vocab_size)
    if cached is not None:
      try:
        atomic_write_bytes(cached, buffer.getvalue())
      except OSError as e:  # a read-only data dir must not abort training
        logging.warning("Cannot cache SentencePiece model at %s: %s", cached, e)
    return tokenizer

  def __repr__(self) -> str:
    return f"SentencePieceTokenizer(size={self.size})"


def build_tokenizer(kind: str, texts: Sequence[str], *, vocab_size: int | None = None,
                    min_count: int = 1, model_type: str = "unigram",
                    cache_dir: str | os.PathLike | None = None,
                    keep_newlines: bool = False) -> Tokenizer:
  """Builds a tokenizer of the given kind from training texts.

  Args:
    kind: ``"char"``, ``"word"`` or ``"sentencepiece"``.
    texts: Training texts.
    vocab_size: Size cap for ``"word"`` (``None``: unlimited) and the target
      size for ``"sentencepiece"`` (required); ignored for ``"char"``.
    min_count: Minimum frequency for ``"char"`` and ``"word"`` tokens.
    model_type: SentencePiece model type.
    cache_dir: SentencePiece model cache directory.
    keep_newlines: See :meth:`SentencePieceTokenizer.train`.
  """
  if kind == "char":
    return CharTokenizer.build(texts, min_count=min_count)
  if kind == "word":
    return WordTokenizer.build(texts, min_count=min_count, max_size=vocab_size)
  if kind == "sentencepiece":
    if not vocab_size:
      raise ValueError("the sentencepiece tokenizer needs a vocab_size")
    return SentencePieceTokenizer.train(
        texts, vocab_size=vocab_size, model_type=model_type, cache_dir=cache_dir,
        keep_newlines=keep_newlines)
  raise ValueError(f"unknown tokenizer {kind!r}: use 'char', 'word' or 'sentencepiece'")


def load_tokenizer(directory: str | os.PathLike) -> Tokenizer:
  """Restores a tokenizer written by its ``save`` method."""
  directory = Path(directory)
  config_path = directory / _CONFIG_FILE
  if not config_path.is_file():
    raise FileNotFoundError(f"{config_path}: no saved tokenizer here")
  config = json.loads(config_path.read_text(encoding="utf-8"))
  kind = config.get("type")
  if kind == "char":
    return CharTokenizer(config["tokens"])
  if kind == "word":
    return WordTokenizer(config["tokens"])
  if kind == "sentencepiece":
    tokenizer = SentencePieceTokenizer((directory / config["model_file"]).read_bytes())
    if tokenizer.to_json()["sha256"] != config["sha256"]:
      raise ValueError(f"{directory / config['model_file']}: does not match the "
                       f"hash in {config_path}; the vocabulary was modified")
    return tokenizer
  raise ValueError(f"{config_path}: unknown tokenizer type {kind!r}")
