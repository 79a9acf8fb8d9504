"""Dropout with a quarter of the random-number work of ``jax.random.bernoulli``.

``jax.random.bernoulli`` spends one Threefry-2x32 evaluation (20 rounds, 64
output bits, of which the partitionable default XORs down to 32 and a float
uniform keeps 23) on every element. In a Transformer train step those masks
(attention weights ``[B, H, T, S]`` plus every residual and embedding dropout)
cost about an eighth of the whole step on CPU. A keep/drop decision needs far
fewer bits: here each element compares 16 random bits with a threshold, so one
Threefry evaluation (both 32-bit output words) serves four elements.

Semantics: an element is kept with probability ``1 - t / 65536`` where
``t = round(rate * 65536)`` (``rate`` is honoured to within ``2**-17``), and
kept elements are scaled by the inverse of that exact probability, so the
output is unbiased, ``E[dropout(x)] = x``. Masks are deterministic in the key.
Threefry keys (the default, typed or raw ``uint32[2]``) take the fast path;
any other key implementation (``rbg``, ...) draws ``uint16`` bits through
``jax.random.bits``, with the same threshold semantics.
"""

from __future__ import annotations

import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.random import threefry2x32_p

Array = jax.Array

_BITS = 16
_LEVELS = 1 << _BITS

# Masks larger than this many elements are drawn a slice of rows at a time
# (lax.map), so the Threefry words and counters of only one slice exist at
# once: a [32768, 32768] attention-dropout pattern (1 GiB of bools) otherwise
# peaks at about 4 GiB of temporaries. Smaller masks are drawn in one go.
_SLICE_ELEMENTS = 1 << 24


def _threshold(rate: float) -> int:
  return min(_LEVELS, int(round(float(rate) * _LEVELS)))


def check_rate(rate, name: str = "rate", *, allow_one: bool = True) -> None:
  """Raises unless ``rate`` is a drop probability in ``[0, 1]`` (``[0, 1)`` without ``allow_one``).

  Out-of-range rates do not fail on their own: ``_threshold`` would clamp a
  negative rate to "keep all" and one above 1 to "drop all". A traced rate
  is let through (it cannot be read here; ``_threshold`` needs it concrete).
  """
  if isinstance(rate, jax.core.Tracer):
    return
  try:
    value = float(rate)
  except (TypeError, ValueError):
    raise TypeError(f"{name} must be a float, got {rate!r}.") from None
  ok = 0.0 <= value <= 1.0 if allow_one else 0.0 <= value < 1.0  # NaN fails both
  if not ok:
    interval = "[0, 1]" if allow_one else "[0, 1)"
    raise ValueError(f"{name}={rate} must be in {interval}; use 0 to disable dropout.")


def keep_scale(rate: float) -> float:
  """The factor kept elements are multiplied by (0.0 when everything is dropped)."""
  t = _threshold(rate)
  return 0.0 if t >= _LEVELS else _LEVELS / (_LEVELS - t)


def _threefry_key_data(rng: Array) -> Array | None:
  """``uint32[2]`` key data if ``rng`` is a single Threefry key, else None."""
  if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
    if rng.shape or str(jax.random.key_impl(rng)) != "threefry2x32":
      return None
    return jax.random.key_data(rng)
  if (rng.dtype == jnp.uint32 and rng.shape == (2,)
      and str(jax.config.jax_default_prng_impl) == "threefry2x32"):
    return rng
  return None


def _linear_index(shape: tuple[int, ...]) -> Array:
  """``uint32`` row-major element index over ``shape`` (sharding-friendly, no reshape)."""
  idx = jnp.zeros(shape, jnp.uint32)
  stride = 1
  for axis in range(len(shape) - 1, -1, -1):
    idx = idx + jax.lax.broadcasted_iota(jnp.uint32, shape, axis) * np.uint32(stride)
    stride *= shape[axis]
  return idx


def keep_mask(rng: Array, rate: float, shape: Sequence[int]) -> Array:
  """Boolean ``shape`` mask, True = keep, each True with probability ``1 - rate``.

  Args:
    rng: a PRNG key (typed, or a raw ``uint32[2]`` legacy key).
    rate: drop probability in ``[0, 1]``, a Python float.
    shape: mask shape.
  """
  check_rate(rate)
  shape = tuple(int(d) for d in shape)
  t = _threshold(rate)
  if t <= 0:
    return jnp.ones(shape, jnp.bool_)
  if t >= _LEVELS:
    return jnp.zeros(shape, jnp.bool_)
  thr = np.uint32(t)
  data = _threefry_key_data(rng)
  n = shape[-1] if shape else 1
  size = int(np.prod(shape, dtype=np.int64))
  if data is None or size >= 2 ** 32:
    return jax.random.bits(rng, shape, jnp.uint16) >= np.uint16(t)
  data = data.astype(jnp.uint32)
  quarter = -(-n // 4)
  rows = size // n if n else 0
  per_slice = _rows_per_slice(rows, n)
  if per_slice is None:
    counts = _linear_index(tuple(shape[:-1]) + (quarter,))
    return _keep_from_counts(data, thr, counts, n).reshape(shape)
  # Row r's counters are r * quarter + column whether drawn at once or in
  # slices, so the pattern is the same bit for bit.
  local = _linear_index((per_slice, quarter))

  def one_slice(i):
    return _keep_from_counts(data, thr, local + i * np.uint32(per_slice * quarter), n)

  slices = jax.lax.map(one_slice, jnp.arange(rows // per_slice, dtype=jnp.uint32))
  return slices.reshape(shape)


def _rows_per_slice(rows: int, n: int) -> int | None:
  """Rows per slice for a large mask (a divisor of ``rows``); None: draw it at once."""
  if rows * n <= _SLICE_ELEMENTS or rows < 2:
    return None
  target = max(1, _SLICE_ELEMENTS // n)
  small = [d for d in range(1, math.isqrt(rows) + 1) if rows % d == 0]
  best = max(d for d in small + [rows // d for d in small] if d <= target)
  # A row count with no divisor near the target (a large prime) would make
  # thousands of tiny slices: draw it at once instead.
  return best if best * 8 >= target else None


def _keep_from_counts(data: Array, thr: np.uint32, counts: Array, n: int) -> Array:
  """Keep bits of the rows whose Threefry counters are ``counts`` ``[..., ceil(n/4)]``.

  One Threefry evaluation per 4 elements along the last axis: its two output
  words split into four 16-bit fields, laid out as four contiguous quarters.
  """
  hi, lo = threefry2x32_p.bind(data[0], data[1], jnp.zeros_like(counts), counts)
  low16 = np.uint32(_LEVELS - 1)
  parts = [(hi & low16) >= thr, (hi >> np.uint32(_BITS)) >= thr,
           (lo & low16) >= thr, (lo >> np.uint32(_BITS)) >= thr]
  return jnp.concatenate(parts, axis=-1)[..., :n]


def dropout(x: Array, rate: float, rng: Array,
            broadcast_dims: Sequence[int] = ()) -> Array:
  """Inverted dropout of ``x``: zeros with probability ``rate``, else ``x / (1 - rate)``.

  ``broadcast_dims`` share one mask along those axes (as ``flax.linen.Dropout``).
  ``rate`` must be in ``[0, 1]``; 1 gives zeros.
  """
  check_rate(rate)
  if rate <= 0.0:
    return x
  if _threshold(rate) >= _LEVELS:
    return jnp.zeros_like(x)
  shape = tuple(1 if ax in {a % x.ndim for a in broadcast_dims} else d
                for ax, d in enumerate(x.shape))
  keep = keep_mask(rng, rate, shape)
  scale = jnp.asarray(keep_scale(rate), x.dtype)
  return jnp.where(keep, x * scale, jnp.zeros((), x.dtype))


class Dropout(nn.Module):
  """``flax.linen.Dropout`` with the cheaper mask of :func:`keep_mask`.

  Same fields and call signature as flax's module (``rate``,
  ``broadcast_dims``, ``deterministic``, ``rng_collection``); draws its key
  from the ``'dropout'`` collection unless ``rng`` is passed.
  """

  rate: float
  broadcast_dims: Sequence[int] = ()
  deterministic: bool | None = None
  rng_collection: str = "dropout"

  @nn.compact
  def __call__(self, inputs: Array, deterministic: bool | None = None,
               rng: Array | None = None) -> Array:
    check_rate(self.rate)  # before the early return, so a bad rate fails in eval too
    deterministic = nn.merge_param("deterministic", self.deterministic, deterministic)
    if self.rate == 0.0 or deterministic:
      return inputs
    if rng is None:
      rng = self.make_rng(self.rng_collection)
    return dropout(inputs, self.rate, rng, self.broadcast_dims)
