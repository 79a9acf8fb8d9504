"""Built-in algorithmic seq2seq tasks, generated deterministically from a seed.

Tasks (a source of ``n`` symbols ``x_1 .. x_n``):

* ``copy``: the target is the source (monotonic, diagonal attention).
* ``reverse``: ``x_n .. x_1`` (anti-diagonal attention).
* ``sort``: the symbols in ascending id order (content-based attention).
* ``swap``: the two halves exchanged, ``x_{h+1} .. x_n x_1 .. x_h`` with
  ``h = n // 2`` (non-monotonic alignment with one jump).
* ``addition``: the source is the decimal sum ``a + b`` (each operand's digit
  count drawn on its own from the length range, most significant digit
  first, no leading zeros), the target its value; the vocabulary
  is fixed to the digits and ``+`` and ``num_symbols`` is ignored.

Symbols use ids ``4 .. 3 + num_symbols`` (right after the special ids) and are
named ``a, b, c, ...`` (``s0, s1, ...`` beyond 26), so decoded sequences are
space-separated symbol names that BLEU and plots can use directly.

Training lengths are drawn uniformly from ``[min_len, max_len]`` and eval
lengths from ``[eval_min_len, eval_max_len]``, to study length
generalisation. Training batch ``step`` comes from
``default_rng([seed, 0, step])``; the eval set from ``default_rng([seed, 1])``
and the test set from ``default_rng([seed, 2])``.
"""

from __future__ import annotations

import string
from typing import Any, Sequence

import numpy as np

from experiments.data.iterators import Batch, check_sharding, local_slice
from experiments.data.tokenizers import BOS, EOS, NUM_SPECIAL, PAD, WordTokenizer

TASKS = ("copy", "reverse", "sort", "swap", "addition")
_PLUS = NUM_SPECIAL + 10  # id of "+" in the addition vocabulary

__all__ = ["TASKS", "SyntheticStream", "eval_set", "generate", "make_vocab",
           "padded_lengths", "transform", "unpad"]


def make_vocab(task: str, num_symbols: int) -> WordTokenizer:
  """The tokenizer of a task: one word per symbol."""
  if task == "addition":
    return WordTokenizer(list(string.digits) + ["+"])
  if num_symbols < 1:
    raise ValueError(f"num_symbols must be positive, got {num_symbols}")
  if num_symbols <= 26:
    return WordTokenizer(list(string.ascii_lowercase[:num_symbols]))
  return WordTokenizer([f"s{i}" for i in range(num_symbols)])


def transform(task: str, src: Sequence[int]) -> np.ndarray:
  """The target of one source sequence (a slow reference, used by tests)."""
  src = np.asarray(src)
  if task == "copy":
    return src.copy()
  if task == "reverse":
    return src[::-1].copy()
  if task == "sort":
    return np.sort(src)
  if task == "swap":
    h = len(src) // 2
    return np.concatenate([src[h:], src[:h]])
  if task == "addition":
    plus = int(np.flatnonzero(src == _PLUS)[0])
    a = int("".join(str(d - NUM_SPECIAL) for d in src[:plus]))
    b = int("".join(str(d - NUM_SPECIAL) for d in src[plus + 1:]))
    return np.array([int(c) + NUM_SPECIAL for c in str(a + b)])
  raise ValueError(f"unknown synthetic task {task!r}: use one of {TASKS}")


def padded_lengths(task: str, max_len: int) -> tuple[int, int]:
  """``(S, T)``: the padded source/target lengths that fit every example."""
  if task == "addition":
    return 2 * max_len + 2, max_len + 2  # a + b EOS; carry digit + EOS
  return max_len + 1, max_len + 1


def _check_task(task: str, min_len: int, max_len: int) -> None:
  if task not in TASKS:
    raise ValueError(f"unknown synthetic task {task!r}: use one of {TASKS}")
  if not 1 <= min_len <= max_len:
    raise ValueError(f"need 1 <= min_len <= max_len, got {min_len}, {max_len}")


def generate(task: str, rng: np.random.Generator, n: int, *, min_len: int,
             max_len: int, num_symbols: int) -> Batch:
  """Draws ``n`` examples as a padded seq2seq batch.

  Returns:
    ``src``, ``tgt_in``, ``tgt_out`` of shapes ``[n, S]``, ``[n, T]`` with
    ``(S, T) = padded_lengths(task, max_len)``.
  """
  _check_task(task, min_len, max_len)
  if task == "addition":
    return _generate_addition(rng, n, min_len, max_len)
  lengths = rng.integers(min_len, max_len + 1, size=n)
  symbols = rng.integers(0, num_symbols, size=(n, max_len)) + NUM_SPECIAL
  positions = np.arange(max_len)
  valid = positions < lengths[:, None]
  src = np.where(valid, symbols, PAD)
  # Every task maps target position j to some source position; expressing
  # that as an index array keeps generation vectorised.
  if task == "copy":
    tgt = src
  elif task == "reverse":
    tgt = np.take_along_axis(src, np.maximum(lengths[:, None] - 1 - positions, 0), 1)
  elif task == "swap":
    source_pos = (positions + lengths[:, None] // 2) % lengths[:, None]
    tgt = np.take_along_axis(src, source_pos, 1)
  else:  # sort: push padding past every symbol, sort, then restore it
    tgt = np.sort(np.where(valid, src, np.iinfo(np.int64).max), axis=1)
  tgt = np.where(valid, tgt, PAD)
  return _assemble(src, tgt, lengths, lengths, *padded_lengths(task, max_len))


def _generate_addition(rng: np.random.Generator, n: int, min_len: int,
                       max_len: int) -> Batch:
  src_rows, tgt_rows = [], []
  for _ in range(n):
    a, b = (_random_number(rng, int(rng.integers(min_len, max_len + 1)))
            for _ in range(2))
    src_rows.append([int(c) + NUM_SPECIAL for c in a] + [_PLUS]
                    + [int(c) + NUM_SPECIAL for c in b])
    tgt_rows.append([int(c) + NUM_SPECIAL for c in str(int(a) + int(b))])
  s_len, t_len = padded_lengths("addition", max_len)
  src = np.zeros((n, s_len - 1), np.int64)
  tgt = np.zeros((n, t_len - 1), np.int64)
  for row, (s, t) in enumerate(zip(src_rows, tgt_rows)):
    src[row, :len(s)], tgt[row, :len(t)] = s, t
  return _assemble(src, tgt, np.array([len(s) for s in src_rows]),
                   np.array([len(t) for t in tgt_rows]), s_len, t_len)


def _random_number(rng: np.random.Generator, digits: int) -> str:
  # No leading zeros, so every operand really has `digits` digits.
  first = str(int(rng.integers(1, 10))) if digits > 1 else str(int(rng.integers(0, 10)))
  return first + "".join(str(d) for d in rng.integers(0, 10, size=digits - 1))


def _assemble(src: np.ndarray, tgt: np.ndarray, src_lens: np.ndarray,
              tgt_lens: np.ndarray, s_len: int, t_len: int) -> Batch:
  n = len(src)
  rows = np.arange(n)
  out_src = np.zeros((n, s_len), np.int32)
  out_src[:, :src.shape[1]] = src
  out_src[rows, src_lens] = EOS
  tgt_out = np.zeros((n, t_len), np.int32)
  tgt_out[:, :tgt.shape[1]] = tgt
  tgt_out[rows, tgt_lens] = EOS
  tgt_in = np.zeros((n, t_len), np.int32)
  tgt_in[:, 0] = BOS
  tgt_in[:, 1:] = np.where(tgt_out[:, :-1] == EOS, PAD, tgt_out[:, :-1])
  return {"src": out_src, "tgt_in": tgt_in, "tgt_out": tgt_out}


def unpad(batch: Batch) -> tuple[list[np.ndarray], list[np.ndarray]]:
  """Splits a batch back into source/target sequences without specials."""
  def strip(rows: np.ndarray) -> list[np.ndarray]:
    return [row[:int(np.argmax(row == EOS))] for row in rows]
  return strip(batch["src"]), strip(batch["tgt_out"])


class SyntheticStream:
  """The infinite training stream of a synthetic task.

  Batch ``step`` depends only on ``(seed, step)``, so the state is the step.
  All batches have the fixed shape ``padded_lengths(task, max_len)``.
  """

  def __init__(self, task: str, *, batch_size: int, seed: int, min_len: int,
               max_len: int, num_symbols: int, process_index: int = 0,
               process_count: int = 1):
    _check_task(task, min_len, max_len)
    check_sharding(batch_size, process_index, process_count)
    self.task, self.batch_size, self.seed = task, batch_size, int(seed)
    self._kwargs = dict(min_len=min_len, max_len=max_len, num_symbols=num_symbols)
    self._rows = local_slice(batch_size, process_index, process_count)
    self.step = 0

  def __iter__(self) -> "SyntheticStream":
    return self

  def __next__(self) -> Batch:
    rng = np.random.default_rng([self.seed, 0, self.step])
    self.step += 1
    batch = generate(self.task, rng, self.batch_size, **self._kwargs)
    return {k: v[self._rows] for k, v in batch.items()}

  def get_state(self) -> dict[str, Any]:
    """The position in the stream, plus what must match to restore it."""
    return {"step": self.step, "seed": self.seed, "batch_size": self.batch_size,
            "task": self.task}

  def set_state(self, state: dict[str, Any]) -> None:
    """Continues from a :meth:`get_state` of an identically built stream."""
    for key in ("seed", "batch_size", "task"):
      if state.get(key) != getattr(self, key):
        raise ValueError(
            f"iterator state has {key}={state.get(key)!r} but this stream has "
            f"{getattr(self, key)!r}; restore with the same config")
    self.step = int(state["step"])


def eval_set(task: str, *, seed: int, split: int, num: int, min_len: int, max_len: int,
             num_symbols: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
  """A fixed eval (``split=1``) or test (``split=2``) set as token sequences."""
  batch = generate(task, np.random.default_rng([seed, split]), num, min_len=min_len,
                   max_len=max_len, num_symbols=num_symbols)
  return unpad(batch)
