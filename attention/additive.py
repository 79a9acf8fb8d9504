"""Additive (Bahdanau) attention over a memory of encoder states.

Implements the alignment model of Bahdanau, Cho & Bengio (2015), "Neural
Machine Translation by Jointly Learning to Align and Translate":

    e_ij     = v^T tanh(W q_i + U k_j + b)
    alpha_ij = softmax_j(e_ij)              (restricted to unmasked j)
    c_i      = sum_j alpha_ij value_j

The module also hosts the small masking/softmax helpers shared by the other
single-head "memory" attentions (see ``attention/luong.py``), so that the
project-wide mask convention (boolean, ``True`` = attend) is implemented once.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import flax.linen as nn
from flax.typing import Array, Dtype, Initializer, PrecisionLike

from attention.masks import expand_memory_mask, masked_softmax

__all__ = [
    "AdditiveAttention",
    "attend",
    "memory_inputs",
]


def memory_inputs(query: Array, keys: Array, values: Array | None
                  ) -> tuple[Array, Array, bool]:
  """Validates single-head memory-attention inputs (shared by Additive and Luong).

  Returns:
    ``(queries [batch, q_len, q_dim], values, single_step)``; a ``[batch, q_dim]``
    query becomes one step.
  """
  if keys.ndim != 3:
    raise ValueError(f"keys must be [batch, kv_len, k_dim], got shape {keys.shape}")
  if query.ndim not in (2, 3):
    raise ValueError(
        f"query must be [batch, q_dim] or [batch, q_len, q_dim], got shape {query.shape}")
  values = keys if values is None else values
  if values.ndim != 3 or values.shape[:2] != keys.shape[:2]:
    raise ValueError(f"values must be [batch, kv_len, v_dim] matching keys {keys.shape[:2]},"
                     f" got shape {values.shape}")
  single_step = query.ndim == 2
  return (query[:, None, :] if single_step else query), values, single_step


def attend(
    weights: Array,
    values: Array,
    *,
    dtype: Dtype | None = None,
    precision: PrecisionLike = None,
) -> Array:
  """Weighted sum of memory values: ``context[b, t] = sum_s w[b, t, s] v[b, s]``.

  Args:
    weights: float32 ``[batch, q_len, kv_len]`` attention weights.
    values: ``[batch, kv_len, v_dim]`` memory values.
    dtype: Dtype of the matmul inputs and of the result; ``None`` promotes
      ``weights`` and ``values`` (Flax's convention for ``dtype=None``).
    precision: Matmul precision.

  Returns:
    ``[batch, q_len, v_dim]`` context vectors.
  """
  out_dtype = dtype if dtype is not None else jnp.result_type(weights.dtype, values.dtype)
  # Accumulate in float32 so a bf16 model still sums long memories accurately.
  context = jnp.einsum(
      "bts,bsv->btv",
      weights.astype(out_dtype),
      values.astype(out_dtype),
      precision=precision,
      preferred_element_type=jnp.float32,
  )
  return context.astype(out_dtype)


class AdditiveAttention(nn.Module):
  """Bahdanau-style additive attention, ``e_ij = v^T tanh(W q_i + U k_j + b)``.

  Works for one decoder step (query ``[batch, q_dim]``) or for all steps at
  once (query ``[batch, q_len, q_dim]``). Because ``U k_j`` does not depend on
  the decoder state, a decoder should compute it once with
  :meth:`project_keys` and pass it as ``projected_keys=`` at every step, as in
  the paper; the result is identical to letting ``__call__`` project the keys.

  Parameters live in three submodules: ``query_proj`` (``W``, no bias),
  ``key_proj`` (``U``, plus ``b`` if ``use_bias``) and ``energy`` (``v``, a
  ``Dense`` to one unit without bias). The single bias sits on the key side
  so that it is folded into the precomputed keys.

  Attributes:
    hidden_dim: Width of the alignment MLP (``W``, ``U`` output size).
    use_bias: Whether ``key_proj`` carries the bias ``b``.
    dtype: Computation dtype of the projections and context; ``None`` infers
      it from inputs and params. Scores are always normalised in float32.
    param_dtype: Dtype of the parameters.
    kernel_init: Initializer for the three kernels.
    precision: Matmul precision.
  """

  hidden_dim: int
  use_bias: bool = True
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  kernel_init: Initializer = nn.linear.default_kernel_init
  precision: PrecisionLike = None

  def setup(self) -> None:
    # setup() rather than @compact so that project_keys() is an ordinary
    # method sharing these submodules, callable through apply(method=...) or
    # from a parent module.
    dense = dict(
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        kernel_init=self.kernel_init,
        precision=self.precision,
    )
    self.query_proj = nn.Dense(self.hidden_dim, use_bias=False, **dense)
    self.key_proj = nn.Dense(self.hidden_dim, use_bias=self.use_bias, **dense)
    self.energy = nn.Dense(1, use_bias=False, **dense)

  def project_keys(self, keys: Array) -> Array:
    """Computes the query-independent term ``U k_j + b``.

    Args:
      keys: ``[batch, kv_len, k_dim]`` memory keys.

    Returns:
      ``[batch, kv_len, hidden_dim]`` projected keys, suitable for the
      ``projected_keys`` argument of ``__call__``.
    """
    return self.key_proj(keys)

  def __call__(
      self,
      query: Array,
      keys: Array,
      values: Array | None = None,
      *,
      mask: Array | None = None,
      projected_keys: Array | None = None,
  ) -> tuple[Array, Array]:
    """Attends from ``query`` over the memory.

    Args:
      query: ``[batch, q_dim]`` (one decoder step) or ``[batch, q_len, q_dim]``.
      keys: ``[batch, kv_len, k_dim]`` memory keys (encoder annotations).
      values: ``[batch, kv_len, v_dim]`` memory values; defaults to ``keys``.
      mask: Optional boolean mask, ``True`` = attend, broadcastable to
        ``[batch, kv_len]``, or of rank 3 and broadcastable to
        ``[batch, q_len, kv_len]`` for a multi-step query.
      projected_keys: Optional ``[batch, kv_len, hidden_dim]`` output of
        :meth:`project_keys` for these ``keys``; skips recomputing ``U k_j``.

    Returns:
      ``(context, weights)``: context is ``[batch, v_dim]`` or
      ``[batch, q_len, v_dim]``; weights are float32 ``[batch, kv_len]`` or
      ``[batch, q_len, kv_len]``. Masked positions get exactly zero weight and
      a fully masked row gives zero weights and a zero context.

    Raises:
      ValueError: On inconsistent input ranks or shapes.
    """
    queries, values, single_step = memory_inputs(query, keys, values)
    batch, q_len, _ = queries.shape
    kv_len = keys.shape[1]

    if projected_keys is None:
      projected_keys = self.project_keys(keys)
    else:
      if projected_keys.shape != (batch, kv_len, self.hidden_dim):
        raise ValueError(
            f"projected_keys must have shape {(batch, kv_len, self.hidden_dim)}, "
            f"got {projected_keys.shape}"
        )
      if self.is_initializing():
        # Initialising on the precompute path must still create U and b,
        # otherwise a later call without projected_keys would fail.
        self.project_keys(keys)

    projected_queries = self.query_proj(queries)  # [batch, q_len, hidden]
    # [batch, q_len, kv_len, hidden]: additive attention inherently needs the
    # tanh of every (query, key) pair; there is no matmul shortcut.
    hidden = jnp.tanh(projected_queries[:, :, None, :] + projected_keys[:, None, :, :])
    scores = self.energy(hidden)[..., 0]

    mask = expand_memory_mask(
        mask, batch=batch, q_len=q_len, kv_len=kv_len, single_step=single_step
    )
    weights = masked_softmax(scores, mask)
    context = attend(weights, values, dtype=self.dtype, precision=self.precision)
    if single_step:
      return context[:, 0], weights[:, 0]
    return context, weights
