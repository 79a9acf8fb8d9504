"""Deterministic, checkpointable, multi-host batch iterators.

Training iterators are infinite and a pure function of ``seed`` and the
position in the stream. An epoch's order comes from
``np.random.default_rng([seed, epoch])``, so the iterator state is just
``(epoch, index within epoch)``: :meth:`get_state` returns it as a small
JSON-serialisable dict and :meth:`set_state` makes a resumed run see exactly
the batches an uninterrupted run would have seen.

Multi-host: every process computes the same *global* batch (same example
indices, same padded length) and keeps rows
``[i * B / n, (i + 1) * B / n)``, where ``i = process_index`` and
``n = process_count``. Because the global stream does not depend on ``n``, a
run may resume with a different number of processes.

Eval iterators are finite and ordered: every global batch has exactly
``batch_size`` rows; the last one is filled with all-PAD rows, which carry
``mask = False`` and zero ``weights``, plus ``index = -1`` (real rows carry
their position in the eval set, for matching predictions to references).
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Protocol, Sequence, runtime_checkable

import numpy as np

from experiments.data.tokenizers import BOS, EOS, PAD

Batch = dict[str, np.ndarray]

__all__ = [
    "Batch", "CheckpointableIterator", "BucketedSeq2SeqIterator", "LMWindowIterator",
    "bucket_length", "check_sharding", "eval_lm_batches", "eval_seq2seq_batches",
    "local_slice", "seq2seq_batch",
]


@runtime_checkable
class CheckpointableIterator(Protocol):
  """An infinite batch iterator whose position can be saved and restored."""

  def __iter__(self) -> Iterator[Batch]: ...

  def __next__(self) -> Batch: ...

  def get_state(self) -> dict[str, Any]: ...

  def set_state(self, state: dict[str, Any]) -> None: ...


def check_sharding(batch_size: int, process_index: int, process_count: int,
                   what: str = "batch_size") -> None:
  """Raises ValueError unless the global batch splits evenly over processes."""
  if batch_size < 1:
    raise ValueError(f"{what} must be positive, got {batch_size}")
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} is not in [0, process_count="
                     f"{process_count})")
  if batch_size % process_count:
    raise ValueError(
        f"global {what}={batch_size} is not divisible by process_count="
        f"{process_count}; use a multiple of {process_count}")


def local_slice(batch_size: int, process_index: int, process_count: int) -> slice:
  """The rows of a global batch that belong to ``process_index``."""
  per_process = batch_size // process_count
  return slice(process_index * per_process, (process_index + 1) * per_process)


def bucket_length(length: int, step: int, max_len: int | None = None) -> int:
  """Rounds ``length`` up to a multiple of ``step``, capped at ``max_len``.

  The cap only applies when ``length <= max_len``, so the last bucket is
  exactly ``max_len`` even when it is not a multiple of ``step``.
  """
  rounded = -(-length // step) * step
  if max_len is not None and length <= max_len:
    rounded = min(rounded, max_len)
  return rounded


def seq2seq_batch(src: Sequence[np.ndarray], tgt: Sequence[np.ndarray],
                  src_len: int, tgt_len: int) -> Batch:
  """Packs token sequences (no specials) into a padded seq2seq batch.

  Returns:
    ``src`` = tokens + EOS, ``tgt_in`` = BOS + tokens, ``tgt_out`` =
    tokens + EOS, each int32 ``[len(src), src_len | tgt_len]``, PAD-filled.
  """
  n = len(src)
  out = {"src": np.full((n, src_len), PAD, np.int32),
         "tgt_in": np.full((n, tgt_len), PAD, np.int32),
         "tgt_out": np.full((n, tgt_len), PAD, np.int32)}
  for row, (s, t) in enumerate(zip(src, tgt)):
    ls, lt = len(s), len(t)
    if ls + 1 > src_len or lt + 1 > tgt_len:
      raise ValueError(f"example of lengths ({ls}, {lt}) does not fit a "
                       f"({src_len}, {tgt_len}) batch with BOS/EOS")
    out["src"][row, :ls] = s
    out["src"][row, ls] = EOS
    out["tgt_in"][row, 0] = BOS
    out["tgt_in"][row, 1:lt + 1] = t
    out["tgt_out"][row, :lt] = t
    out["tgt_out"][row, lt] = EOS
  return out


def _wrap_fill(items: np.ndarray, batch_size: int, pool: np.ndarray) -> np.ndarray:
  # A fixed batch shape matters more than visiting each item exactly once,
  # so the incomplete last batch is topped up with items from the start of
  # the epoch's permutation (cyclically, if the data is tinier than a batch).
  missing = (-len(items)) % batch_size
  return np.concatenate([items, np.resize(pool, missing)]) if missing else items


class _EpochIterator:
  """Shared position/state logic; subclasses define an epoch's plan."""

  def __init__(self, *, num_items: int, batch_size: int, seed: int,
               process_index: int, process_count: int):
    check_sharding(batch_size, process_index, process_count)
    if num_items < 1:
      raise ValueError("cannot iterate over an empty training set")
    self.batch_size = batch_size
    self.seed = int(seed)
    self.num_items = num_items
    self._rows = local_slice(batch_size, process_index, process_count)
    self._epoch, self._index = 0, 0
    self._plan_cache: tuple[int, list[np.ndarray]] | None = None

  def _make_plan(self, rng: np.random.Generator) -> list[np.ndarray]:
    raise NotImplementedError

  def _make_batch(self, items: np.ndarray) -> Batch:
    raise NotImplementedError

  def _plan(self, epoch: int) -> list[np.ndarray]:
    if self._plan_cache is None or self._plan_cache[0] != epoch:
      self._plan_cache = (epoch, self._make_plan(np.random.default_rng([self.seed, epoch])))
    return self._plan_cache[1]

  @property
  def epoch(self) -> int:
    """Epochs completed so far."""
    return self._epoch

  @property
  def batches_per_epoch(self) -> int:
    """Number of batches in the current epoch."""
    return len(self._plan(self._epoch))

  def __iter__(self) -> "_EpochIterator":
    return self

  def __next__(self) -> Batch:
    plan = self._plan(self._epoch)
    if self._index >= len(plan):
      self._epoch, self._index = self._epoch + 1, 0
      plan = self._plan(self._epoch)
    items = plan[self._index]
    self._index += 1
    return self._make_batch(items)

  def get_state(self) -> dict[str, Any]:
    """The position in the stream, plus what must match to restore it."""
    return {"epoch": self._epoch, "index": self._index, "seed": self.seed,
            "batch_size": self.batch_size, "num_items": self.num_items}

  def set_state(self, state: dict[str, Any]) -> None:
    """Continues from a :meth:`get_state` of an identically built iterator."""
    for key in ("seed", "batch_size", "num_items"):
      if state.get(key) != getattr(self, key):
        raise ValueError(
            f"iterator state has {key}={state.get(key)} but this iterator has "
            f"{getattr(self, key)}; restore with the same data and config")
    self._epoch, self._index = int(state["epoch"]), int(state["index"])


class BucketedSeq2SeqIterator(_EpochIterator):
  """Infinite, shuffled, length-bucketed seq2seq training batches.

  Bucketing policy: an example's length is ``max(len(src), len(tgt)) + 1``
  (room for EOS/BOS), rounded up to a multiple of ``bucket_step`` and capped
  at ``max_len``; ``src`` and targets of a batch are padded to the same
  bucket length, so there are at most ``ceil(max_len / bucket_step)``
  distinct shapes, all ``[batch_size / process_count, L]``. Each epoch the
  examples are shuffled, cut into full batches within each bucket, and the
  leftovers of all buckets (in length order) are joined into a few mixed
  batches padded to their longest member, the last one topped up with
  examples from the start of the epoch. Every example is seen at least once
  per epoch; batch order is shuffled.
  """

  def __init__(self, src: Sequence[np.ndarray], tgt: Sequence[np.ndarray], *,
               batch_size: int, seed: int, max_len: int, bucket_step: int = 8,
               process_index: int = 0, process_count: int = 1):
    super().__init__(num_items=len(src), batch_size=batch_size, seed=seed,
                     process_index=process_index, process_count=process_count)
    if len(src) != len(tgt):
      raise ValueError(f"{len(src)} sources but {len(tgt)} targets")
    self._src, self._tgt = src, tgt
    lengths = np.array([max(len(s), len(t)) + 1 for s, t in zip(src, tgt)])
    if lengths.max() > max_len:
      raise ValueError(f"an example needs length {lengths.max()} > max_len="
                       f"{max_len}; filter long examples first")
    self._lengths = np.array([bucket_length(int(n), bucket_step, max_len)
                              for n in lengths])

  def _make_plan(self, rng: np.random.Generator) -> list[np.ndarray]:
    perm = rng.permutation(self.num_items)
    buckets = self._lengths[perm]
    batches, leftovers = [], []
    for length in np.unique(buckets):
      members = perm[buckets == length]
      full = len(members) // self.batch_size * self.batch_size
      batches.extend(members[:full].reshape(-1, self.batch_size))
      leftovers.append(members[full:])
    rest = _wrap_fill(np.concatenate(leftovers), self.batch_size, perm)
    batches.extend(rest.reshape(-1, self.batch_size))
    return [batches[i] for i in rng.permutation(len(batches))]

  def _make_batch(self, items: np.ndarray) -> Batch:
    length = int(self._lengths[items].max())  # from the *global* batch
    rows = items[self._rows]
    return seq2seq_batch([self._src[i] for i in rows], [self._tgt[i] for i in rows],
                         length, length)


class LMWindowIterator(_EpochIterator):
  """Infinite, shuffled language-modelling windows of a token stream.

  Each epoch draws a random offset in ``[0, seq_len)`` (so window
  boundaries move between epochs), cuts the stream into windows of
  ``seq_len + 1`` tokens that start every ``seq_len`` tokens (so the inputs
  tile the stream and each token is a target once), shuffles them and yields
  ``inputs = w[:-1]``, ``targets = w[1:]``, int32 ``[B / n, seq_len]``,
  never padded.
  """

  def __init__(self, tokens: np.ndarray, *, seq_len: int, batch_size: int, seed: int,
               process_index: int = 0, process_count: int = 1):
    tokens = np.asarray(tokens, np.int32)
    if len(tokens) < seq_len + 1:
      raise ValueError(f"a stream of {len(tokens)} tokens is shorter than one "
                       f"window of seq_len + 1 = {seq_len + 1}")
    super().__init__(num_items=len(tokens), batch_size=batch_size, seed=seed,
                     process_index=process_index, process_count=process_count)
    self._tokens, self.seq_len = tokens, seq_len

  def _make_plan(self, rng: np.random.Generator) -> list[np.ndarray]:
    n = len(self._tokens)
    offset = int(rng.integers(0, min(self.seq_len, n - self.seq_len)))
    starts = offset + self.seq_len * np.arange((n - 1 - offset) // self.seq_len)
    perm = rng.permutation(starts)
    return list(_wrap_fill(perm, self.batch_size, perm).reshape(-1, self.batch_size))

  def _make_batch(self, items: np.ndarray) -> Batch:
    windows = self._tokens[items[self._rows, None] + np.arange(self.seq_len + 1)]
    return {"inputs": windows[:, :-1], "targets": windows[:, 1:]}

  def get_state(self) -> dict[str, Any]:
    return {**super().get_state(), "seq_len": self.seq_len}

  def set_state(self, state: dict[str, Any]) -> None:
    if state.get("seq_len") != self.seq_len:
      raise ValueError(f"iterator state has seq_len={state.get('seq_len')} but this "
                       f"iterator has {self.seq_len}; restore with the same config")
    super().set_state(state)


def _eval_batches(num: int, batch_size: int, process_index: int, process_count: int,
                  make: Callable[[np.ndarray, np.ndarray], Batch]) -> Iterator[Batch]:
  check_sharding(batch_size, process_index, process_count, "eval_batch_size")
  rows = local_slice(batch_size, process_index, process_count)
  for start in range(0, num, batch_size):
    index = np.arange(start, start + batch_size)
    index[index >= num] = -1
    batch = make(index, index[rows])
    batch["mask"] = batch["index"] >= 0
    yield batch


def eval_seq2seq_batches(src: Sequence[np.ndarray], tgt: Sequence[np.ndarray], *,
                         batch_size: int, lengths: tuple[int, int] | None = None,
                         bucket_step: int = 8, process_index: int = 0,
                         process_count: int = 1) -> Iterator[Batch]:
  """Finite, ordered seq2seq eval batches.

  Args:
    src: Source token sequences (no specials).
    tgt: Target token sequences (no specials).
    batch_size: Global eval batch size.
    lengths: Fixed ``(S, T)`` padded lengths; by default each batch is
      padded to its longest example rounded up to ``bucket_step`` (eval
      examples are never dropped, so this may exceed the training max_len).
    bucket_step: Rounding for the default padding.
    process_index: This process.
    process_count: Number of processes.

  Yields:
    Batches with ``src``, ``tgt_in``, ``tgt_out``, ``weights`` (float32
    ``[b, T]``, 1 on real target tokens), ``mask`` (bool ``[b]``) and
    ``index`` (int32 ``[b]``, -1 on padding rows).
  """
  def make(global_index: np.ndarray, index: np.ndarray) -> Batch:
    if lengths is None:
      longest = max(max(len(src[i]), len(tgt[i])) + 1 for i in global_index if i >= 0)
      src_len = tgt_len = bucket_length(longest, bucket_step)
    else:
      src_len, tgt_len = lengths
    real = index[index >= 0]
    batch = seq2seq_batch([src[i] for i in real], [tgt[i] for i in real],
                          src_len, tgt_len)
    pad_rows = len(index) - len(real)  # padding rows only ever trail
    batch = {k: np.pad(v, ((0, pad_rows), (0, 0))) for k, v in batch.items()}
    batch["weights"] = (batch["tgt_out"] != PAD).astype(np.float32)
    batch["index"] = index.astype(np.int32)
    return batch

  return _eval_batches(len(src), batch_size, process_index, process_count, make)


def eval_lm_windows(num_tokens: int, seq_len: int) -> np.ndarray:
  """Start positions of the contiguous eval windows covering a stream."""
  return np.arange(0, max(num_tokens - 1, 0), seq_len)


def eval_lm_batches(tokens: np.ndarray, *, seq_len: int, batch_size: int,
                    process_index: int = 0, process_count: int = 1) -> Iterator[Batch]:
  """Finite, ordered LM eval batches covering every next-token prediction once.

  Windows start at ``0, seq_len, 2 * seq_len, ...``; the last window is
  PAD-filled past the end of the stream.

  Yields:
    Batches with ``inputs``, ``targets`` (int32 ``[b, seq_len]``),
    ``weights`` (float32, 1 where ``targets`` is real), ``mask`` and
    ``index`` (window number, -1 on padding rows).
  """
  tokens = np.asarray(tokens, np.int32)
  # Trailing PADs let every window be a plain slice, including the last.
  padded = np.concatenate([tokens, np.full(seq_len + 1, PAD, np.int32)])
  starts = eval_lm_windows(len(tokens), seq_len)

  def make(global_index: np.ndarray, index: np.ndarray) -> Batch:
    del global_index
    windows = padded[starts[np.maximum(index, 0), None] + np.arange(seq_len + 1)]
    windows[index < 0] = PAD
    inputs, targets = windows[:, :-1], windows[:, 1:].copy()
    # The input at the stream's last real token has no target; PAD it too.
    inputs = np.where(targets == PAD, PAD, inputs)
    return {"inputs": inputs, "targets": targets,
            "weights": (targets != PAD).astype(np.float32),
            "index": index.astype(np.int32)}

  return _eval_batches(len(starts), batch_size, process_index, process_count, make)
