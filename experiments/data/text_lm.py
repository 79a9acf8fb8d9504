"""Plain-text language modelling data (e.g. tinyshakespeare).

The file is split contiguously by characters: the first
``1 - val_fraction`` of the text is the training part, the rest the
validation part, so no validation text leaks into training windows. The
tokenizer (``char`` or ``sentencepiece``) is built on the training part only;
SentencePiece keeps newlines and spaces verbatim so decoded text reproduces
the layout of the original.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np

from experiments.data.files import DataError, read_text
from experiments.data.tokenizers import Tokenizer, build_tokenizer

__all__ = ["TextLMData", "load_text_lm"]


@dataclasses.dataclass
class TextLMData:
  """Token streams of the two parts of a text file."""

  vocab: Tokenizer
  train: np.ndarray
  val: np.ndarray
  stats: dict[str, int]


def _tokenize(vocab: Tokenizer, text: str) -> np.ndarray:
  # Encoding line by line bounds SentencePiece's per-call input size; with
  # verbatim whitespace the pieces of the lines concatenate to the whole.
  lines = text.splitlines(keepends=True) if vocab.kind == "sentencepiece" else [text]
  ids = [np.asarray(line_ids, np.int32) for line_ids in vocab.encode_batch(lines)]
  return np.concatenate(ids) if ids else np.zeros(0, np.int32)


def load_text_lm(path: str | os.PathLike, *, tokenizer: str = "char", seq_len: int,
                 val_fraction: float = 0.1, vocab_size: int | None = None,
                 model_type: str = "unigram", min_count: int = 1,
                 cache_dir: str | os.PathLike | None = None,
                 vocab: Tokenizer | None = None) -> TextLMData:
  """Reads, splits and tokenises a text file for language modelling.

  Args:
    path: UTF-8 text file (plain or ``.gz``).
    tokenizer: ``"char"`` or ``"sentencepiece"``.
    seq_len: Window length; the training part must hold at least one window
      of ``seq_len + 1`` tokens.
    val_fraction: Fraction of the characters, at the end of the file, held
      out for validation; in ``(0, 1)``.
    vocab_size: SentencePiece vocabulary size.
    model_type: SentencePiece model type.
    min_count: Minimum character frequency for ``"char"``.
    cache_dir: SentencePiece cache directory.
    vocab: Use this tokenizer instead of building one.

  Raises:
    DataError: The file is missing, empty or not UTF-8, or a part is too
      short for the requested windows.
  """
  if tokenizer not in ("char", "sentencepiece"):
    raise ValueError(f"text LM tokenizer must be 'char' or 'sentencepiece', "
                     f"got {tokenizer!r}")
  if not 0.0 < val_fraction < 1.0:
    raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
  path = Path(path)
  text = read_text(path, what="text file")
  if not text.strip():
    raise DataError(f"{path}: text file is empty; point data.path at a non-empty "
                    "UTF-8 text")
  cut = int(round(len(text) * (1.0 - val_fraction)))
  train_text, val_text = text[:cut], text[cut:]
  if vocab is None:
    training = (train_text.splitlines(keepends=True) if tokenizer == "sentencepiece"
                else [train_text])
    vocab = build_tokenizer(tokenizer, training, vocab_size=vocab_size,
                            min_count=min_count, model_type=model_type,
                            cache_dir=cache_dir, keep_newlines=True)
  train, val = _tokenize(vocab, train_text), _tokenize(vocab, val_text)
  if len(train) < seq_len + 1:
    raise DataError(
        f"{path}: training part has {len(train)} tokens, fewer than seq_len + 1 = "
        f"{seq_len + 1}; lower data.seq_len or data.val_fraction, or use a longer text")
  if len(val) < 2:
    raise DataError(f"{path}: validation part has {len(val)} tokens, too few to "
                    "predict any; raise data.val_fraction or use a longer text")
  return TextLMData(vocab, train, val, {"train_tokens": len(train),
                                        "val_tokens": len(val)})
