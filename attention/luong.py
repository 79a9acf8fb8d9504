"""Multiplicative / global and local (Luong) attention over encoder states.

Implements the attention layer of Luong, Pham & Manning (2015), "Effective
Approaches to Attention-based Neural Machine Translation":

score(h_t, h_s):
  * ``"dot"``:     ``h_t^T h_s``
  * ``"general"``: ``h_t^T W_a h_s``
  * ``"concat"``:  ``v_a^T tanh(W_a [h_t; h_s])``

modes:
  * ``"global"``:  softmax over every (unmasked) source position.
  * ``"local-m"``: monotonic, ``p_t = t``; softmax over ``[p_t - D, p_t + D]``.
  * ``"local-p"``: predictive, ``p_t = S * sigmoid(v_p^T tanh(W_p h_t))``;
    softmax over ``[p_t - D, p_t + D]`` multiplied by a Gaussian
    ``exp(-(s - p_t)^2 / (2 sigma^2))`` with ``sigma = D / 2``.

The attentional hidden state ``h~_t = tanh(W_c [c_t; h_t])`` and input
feeding belong to the decoder model, not to this layer.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import flax.linen as nn
from flax.linen.dtypes import promote_dtype
from flax.typing import Array, Dtype, Initializer, PrecisionLike

from attention.additive import attend, memory_inputs
from attention.masks import expand_memory_mask, masked_softmax

__all__ = ["LuongAttention", "SCORES", "MODES"]

SCORES = ("dot", "general", "concat")
MODES = ("global", "local-m", "local-p")


class _ConcatProjection(nn.Module):
  """``W_a [h_t; h_s]`` for every (t, s) pair without building ``[h_t; h_s]``.

  The kernel has the shape a ``Dense`` on the concatenation would have,
  ``[q_dim + k_dim, features]`` with the query rows first, but is applied as
  ``W_q h_t + W_k h_s`` so each side is projected once rather than once per
  pair.
  """

  features: int
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  kernel_init: Initializer = nn.linear.default_kernel_init
  precision: PrecisionLike = None

  @nn.compact
  def __call__(self, queries: Array, keys: Array) -> Array:
    """Maps ``[b, t, q_dim]``, ``[b, s, k_dim]`` to ``[b, t, s, features]``."""
    q_dim, k_dim = queries.shape[-1], keys.shape[-1]
    kernel = self.param(
        "kernel", self.kernel_init, (q_dim + k_dim, self.features), self.param_dtype
    )
    queries, keys, kernel = promote_dtype(queries, keys, kernel, dtype=self.dtype)
    q_part = jnp.dot(queries, kernel[:q_dim], precision=self.precision)
    k_part = jnp.dot(keys, kernel[q_dim:], precision=self.precision)
    return q_part[:, :, None, :] + k_part[:, None, :, :]


class LuongAttention(nn.Module):
  """Luong attention with ``dot``/``general``/``concat`` scores and global or local modes.

  Parameters (only those the configuration uses are created):
    * ``W_a``: ``general`` -> ``Dense`` without bias, kernel ``[q_dim, k_dim]``
      so that ``score = h_t^T W_a h_s`` exactly as in the paper (which has no
      bias; a bias on the query side would add a per-position constant
      ``b^T h_s`` that the paper's formula does not have). It is applied to
      the query, which is cheaper than projecting every key at each decoder
      step. ``concat`` -> kernel ``[q_dim + k_dim, hidden_dim]``, no bias.
    * ``v_a``: ``concat`` only, ``Dense(1)`` without bias.
    * ``W_p``, ``v_p``: ``local-p`` only, ``Dense(hidden_dim)`` and ``Dense(1)``,
      both without bias as in the paper.

  Choices where the paper leaves room:
    * Source positions are 0-based. Window membership is ``|s - p_t| <= D``
      and is combined with the user mask; positions outside it get exactly
      zero weight, and the softmax is taken over the in-window positions.
    * ``local-m`` centres the window at ``min(t, last)``, where ``last`` is the
      last attendable source position of the row (``kv_len - 1`` without a
      mask). The paper assumes a target no longer than its source; without
      the clamp, every step past ``last + D`` (a target longer than its
      source, or a decoder running to ``max_len``) would see no source
      position and get a zero context.
    * ``local-p`` uses ``S`` = number of attendable positions in the user mask
      row (the true per-example source length with padding masks), or
      ``kv_len`` when there is no mask, so that ``p_t`` cannot land in
      padding. With a mask that has holes this is a count, not a length.
    * ``local-p`` weights are the in-window softmax times the Gaussian, not
      renormalised (as in the paper), so they sum to less than 1. The window
      mask is piecewise constant; gradients reach ``W_p`` and ``v_p`` through
      the Gaussian term.
    * ``local-p``'s ``p_t = S * sigmoid(.)`` lies in ``(0, S)`` on the 0-based
      positions, as the paper's formula reads; its 1-based positions would put
      it one position earlier. ``p_t`` is learned, so the shift is absorbed.

  Attributes:
    score: ``"dot"``, ``"general"`` or ``"concat"``.
    mode: ``"global"``, ``"local-m"`` or ``"local-p"``.
    window: Half-width ``D`` of the local window (``sigma = D / 2``).
    hidden_dim: Width of the ``concat`` ``W_a`` and of ``local-p``'s ``W_p``;
      defaults to the query dimension.
    dtype: Computation dtype of scores and context; ``None`` infers it from
      inputs and params. Softmax and ``p_t`` are always computed in float32.
    param_dtype: Dtype of the parameters.
    kernel_init: Initializer for every kernel.
    precision: Matmul precision.
  """

  score: str = "general"
  mode: str = "global"
  window: int = 10
  hidden_dim: int | None = None
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  kernel_init: Initializer = nn.linear.default_kernel_init
  precision: PrecisionLike = None

  def __post_init__(self) -> None:
    # Validate at construction so a bad config fails where it is written,
    # not at the first init/apply deep inside a training loop.
    if self.score not in SCORES:
      raise ValueError(f"score must be one of {SCORES}, got {self.score!r}")
    if self.mode not in MODES:
      raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
    if self.window < 0 or (self.mode == "local-p" and self.window == 0):
      low = 1 if self.mode == "local-p" else 0
      raise ValueError(f"window must be an int >= {low} for mode={self.mode!r}, got {self.window}")
    if self.hidden_dim is not None and self.hidden_dim <= 0:
      raise ValueError(f"hidden_dim must be a positive int or None, got {self.hidden_dim}")
    super().__post_init__()

  def _dense(self, features: int, name: str) -> nn.Dense:
    return nn.Dense(
        features,
        use_bias=False,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        kernel_init=self.kernel_init,
        precision=self.precision,
        name=name,
    )

  def _scores(self, queries: Array, keys: Array) -> Array:
    """``[b, t, q_dim]`` x ``[b, s, k_dim]`` -> float32 ``[b, t, s]`` scores."""
    q_dim, k_dim = queries.shape[-1], keys.shape[-1]
    if self.score == "concat":
      projection = _ConcatProjection(
          self.hidden_dim or q_dim,
          dtype=self.dtype,
          param_dtype=self.param_dtype,
          kernel_init=self.kernel_init,
          precision=self.precision,
          name="W_a",
      )(queries, keys)
      return self._dense(1, "v_a")(jnp.tanh(projection))[..., 0].astype(jnp.float32)
    if self.score == "dot":
      if q_dim != k_dim:
        raise ValueError(
            f"score='dot' needs query and key dims to match, got {q_dim} and {k_dim}; "
            "use score='general' or 'concat' for different sizes"
        )
    else:  # general
      queries = self._dense(k_dim, "W_a")(queries)
    queries, keys = promote_dtype(queries, keys, dtype=self.dtype)
    scores = jnp.einsum(
        "btd,bsd->bts",
        queries,
        keys,
        precision=self.precision,
        preferred_element_type=jnp.float32,
    )
    return scores.astype(jnp.float32)

  def _predicted_position(self, queries: Array, user_mask: Array | None, kv_len: int) -> Array:
    """local-p's ``p_t = S * sigmoid(v_p^T tanh(W_p h_t))`` as float32 ``[b, t]``."""
    hidden = self._dense(self.hidden_dim or queries.shape[-1], "W_p")(queries)
    logit = self._dense(1, "v_p")(jnp.tanh(hidden))[..., 0]
    # float32: in bf16, p_t = S * sigmoid(.) would be quantised to steps of
    # several positions for long sources.
    fraction = jax.nn.sigmoid(logit.astype(jnp.float32))
    if user_mask is None:
      source_len = jnp.float32(kv_len)
    else:
      source_len = jnp.sum(user_mask, axis=-1).astype(jnp.float32)
    return source_len * fraction

  def _monotonic_position(
      self, step: Array | int | None, batch: int, q_len: int, single_step: bool,
      user_mask: Array | None, kv_len: int,
  ) -> Array:
    """local-m's ``p_t = t`` as float32 ``[b, t]``, clamped to the last source position."""
    if step is None:
      if single_step:
        raise ValueError(
            "mode='local-m' with a single-step query needs step= (the decoder position t)"
        )
      offset = jnp.zeros((batch, 1), jnp.float32)
    else:
      step = jnp.asarray(step)
      if step.ndim > 1:
        raise ValueError(f"step must have shape [] or [batch], got {step.shape}")
      offset = jnp.broadcast_to(step, (batch,)).astype(jnp.float32)[:, None]
    position = offset + jnp.arange(q_len, dtype=jnp.float32)[None, :]
    if user_mask is None:
      last = jnp.float32(kv_len - 1)
    else:
      last = jnp.max(jnp.where(user_mask, jnp.arange(kv_len), -1), axis=-1).astype(jnp.float32)
    # A row with no source position keeps p_t = t: its window is empty anyway.
    return jnp.where(last >= 0, jnp.minimum(position, last), position)

  @nn.compact
  def __call__(
      self,
      query: Array,
      keys: Array,
      values: Array | None = None,
      *,
      mask: Array | None = None,
      step: Array | int | None = None,
  ) -> tuple[Array, Array]:
    """Attends from decoder state(s) ``query`` over source states ``keys``.

    Args:
      query: ``[batch, dim]`` (one decoder step) or ``[batch, q_len, dim]``.
      keys: ``[batch, S, k_dim]`` source hidden states ``h_s``.
      values: ``[batch, S, v_dim]`` vectors averaged into the context;
        defaults to ``keys`` (the paper's setting).
      mask: Optional boolean mask over source positions, ``True`` = attend,
        broadcastable to ``[batch, S]``, or of rank 3 and broadcastable to
        ``[batch, q_len, S]`` for a multi-step query.
      step: ``local-m`` only (ignored otherwise): int ``[]`` or ``[batch]``
        decoder position ``t``. Required for a single-step query. For a
        multi-step query, query ``i`` sits at ``step + i`` (``step``
        defaults to 0), so a decoder can process a chunk of steps at once.

    Returns:
      ``(context, weights)``: context is ``[batch, v_dim]`` or
      ``[batch, q_len, v_dim]``; weights are float32 ``[batch, S]`` or
      ``[batch, q_len, S]``. Masked and out-of-window positions get exactly
      zero weight; a row with nothing to attend to gives zero weights and a
      zero context.

    Raises:
      ValueError: On inconsistent shapes, a ``dot`` score with mismatched
        dims, or ``local-m`` on a single step without ``step``.
    """
    queries, values, single_step = memory_inputs(query, keys, values)
    batch, q_len, _ = queries.shape
    kv_len = keys.shape[1]

    scores = self._scores(queries, keys)
    user_mask = expand_memory_mask(
        mask, batch=batch, q_len=q_len, kv_len=kv_len, single_step=single_step
    )

    if self.mode == "global":
      weights = masked_softmax(scores, user_mask)
    else:
      if self.mode == "local-m":
        centre = self._monotonic_position(step, batch, q_len, single_step,
                                           user_mask, kv_len)
      else:
        centre = self._predicted_position(queries, user_mask, kv_len)
      offset = jnp.arange(kv_len, dtype=jnp.float32) - centre[..., None]  # [b, t, s]
      in_window = jnp.abs(offset) <= self.window
      window_mask = in_window if user_mask is None else in_window & user_mask
      weights = masked_softmax(scores, window_mask)
      if self.mode == "local-p":
        sigma = self.window / 2.0
        weights = weights * jnp.exp(-jnp.square(offset) / (2.0 * sigma * sigma))

    context = attend(weights, values, dtype=self.dtype, precision=self.precision)
    if single_step:
      return context[:, 0], weights[:, 0]
    return context, weights
