"""Mask helpers that flax's ``make_attention_mask`` / ``make_causal_mask`` / ``combine_masks`` lack.

Convention everywhere: boolean, broadcastable to ``[batch, heads, q_len,
kv_len]`` (or ``[batch, q_len, kv_len]`` for single-head recurrent attention),
True = attend.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def as_bool_mask(mask: Array | None) -> Array | None:
  """Boolean view of a mask; flax's helpers return float 0/1 masks, nonzero = attend.

  Array-likes (numpy arrays, nested lists) are converted with ``jnp.asarray``
  first, so a mask written by hand needs no wrapping.
  """
  if mask is None:
    return None
  mask = jnp.asarray(mask)
  if mask.dtype == jnp.bool_:
    return mask
  return mask != 0


def and_masks(a: Array | None, b: Array | None) -> Array | None:
  """``a & b`` where None means "no mask". Unlike flax's ``combine_masks``, the
  two may differ in rank (a ``[q, k]`` causal rule with a ``[B, H, q, k]`` mask)."""
  if a is None:
    return b
  if b is None:
    return a
  return jnp.logical_and(a, b)


def causal_mask(q_len: int, kv_len: int, q_offset: int = 0) -> Array:
  """``[q_len, kv_len]`` boolean, query i attends keys j <= i (top-left aligned, as jax.nn).

  ``q_offset`` shifts the query positions: row i is query ``q_offset + i``, for
  a block of rows cut out of a longer causal pattern.
  """
  q = q_offset + jax.lax.broadcasted_iota(jnp.int32, (q_len, kv_len), 0)
  k = jax.lax.broadcasted_iota(jnp.int32, (q_len, kv_len), 1)
  return k <= q


def masked_softmax(scores: Array, mask: Array | None = None, axis: int = -1) -> Array:
  """Softmax that gives exactly zero weight to masked positions.

  The computation always runs in float32, whatever the dtype of ``scores``:
  bf16 has too little mantissa for the exp/normalise step to be trusted.

  A row in which every position is masked yields all-zero weights (not a
  uniform distribution, and not NaN), and the gradient through such a row is
  exactly zero. This is why masking is done with ``-inf`` *inside* the
  exponent and the normaliser is replaced by 1 when it is zero: dividing by a
  tiny epsilon instead would turn the incoming cotangent into ``g / eps``,
  which overflows to ``inf`` and then produces ``inf * 0 = NaN``.

  Args:
    scores: Unnormalised scores, any float dtype, e.g. ``[batch, q_len, kv_len]``.
    mask: Optional boolean array broadcastable to ``scores.shape``;
      ``True`` marks positions that may be attended to.
    axis: Axis to normalise over.

  Returns:
    float32 weights with the shape of ``scores``; each row sums to 1 over its
    unmasked positions, or to 0 when it has none.
  """
  scores = scores.astype(jnp.float32)
  if mask is None:
    return jax.nn.softmax(scores, axis=axis)
  # Masked entries become -inf *before* exp: exp(-inf) = 0 with derivative 0,
  # whereas exp(x) followed by a where() could leak inf * 0 = NaN backwards.
  scores = jnp.where(mask, scores, -jnp.inf)
  row_max = jnp.max(scores, axis=axis, keepdims=True)
  # A fully masked row has max -inf; shifting it by 0 keeps every entry at
  # exp(-inf) = 0. The shift is a constant of the softmax, so no gradient.
  row_max = jax.lax.stop_gradient(jnp.where(jnp.isfinite(row_max), row_max, 0.0))
  unnormalised = jnp.exp(scores - row_max)
  total = jnp.sum(unnormalised, axis=axis, keepdims=True)
  # Any row with an unmasked entry has total >= 1 (its max contributes
  # exp(0)), so only fully masked rows (total == 0) take the replacement.
  return unnormalised * (1.0 / jnp.where(total > 0, total, 1.0))


def expand_memory_mask(
    mask: Array | None,
    *,
    batch: int,
    q_len: int,
    kv_len: int,
    single_step: bool,
) -> Array | None:
  """Brings a user mask over memory positions to ``[batch, q_len, kv_len]``.

  A ``[batch, kv_len]`` padding mask is the common case for both single-step
  and multi-step queries. NumPy broadcasting would align such a mask's batch
  axis with ``q_len``, so the query axis is inserted explicitly here.

  Args:
    mask: ``None`` or a boolean array. For a single-step query it must be
      broadcastable to ``[batch, kv_len]``. For a multi-step query it may be
      broadcastable to ``[batch, kv_len]`` (same mask for every query step) or
      have rank 3 and be broadcastable to ``[batch, q_len, kv_len]``.
    batch: Batch size.
    q_len: Number of query steps (1 for a single-step query).
    kv_len: Memory length.
    single_step: Whether the query had no time axis.

  Returns:
    ``None`` if ``mask`` is ``None``, else a boolean ``[batch, q_len, kv_len]``.

  Raises:
    TypeError: If ``mask`` is not boolean.
    ValueError: If ``mask`` has an unsupported rank or shape.
  """
  if mask is None:
    return None
  mask = jnp.asarray(mask)
  if mask.dtype != jnp.bool_:
    # Refuse rather than cast: an additive float mask (0 / -inf) cast to bool
    # would silently invert its meaning.
    raise TypeError(f"mask must be boolean (True = attend), got dtype {mask.dtype}")
  if mask.ndim <= 2:
    mask = jnp.broadcast_to(mask, (batch, kv_len))[:, None, :]
  elif mask.ndim == 3 and not single_step:
    pass
  else:
    expected = "[batch, kv_len]" if single_step else "[batch, kv_len] or [batch, q_len, kv_len]"
    raise ValueError(f"mask of shape {mask.shape} is not broadcastable to {expected}")
  return jnp.broadcast_to(mask, (batch, q_len, kv_len))
