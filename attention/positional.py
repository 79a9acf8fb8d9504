"""Position information: sinusoidal (Vaswani et al. 2017), learned, and rotary (Su et al. 2021)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def sinusoidal_table(max_len: int, features: int, *, max_timescale: float = 10000.0) -> np.ndarray:
  """``[max_len, features]`` table with PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(...).

  Sines fill the even columns and cosines the odd ones, exactly as in the paper.
  Built in numpy so it is a compile-time constant, not traced work.
  """
  if features % 2:
    raise ValueError(f"sinusoidal encodings need an even feature size, got {features}.")
  pos = np.arange(max_len, dtype=np.float64)[:, None]
  inv = np.power(max_timescale, -np.arange(0, features, 2, dtype=np.float64) / features)
  table = np.zeros((max_len, features), np.float32)
  table[:, 0::2] = np.sin(pos * inv)
  table[:, 1::2] = np.cos(pos * inv)
  return table


class SinusoidalPositionalEncoding(nn.Module):
  """Adds the fixed sinusoidal encoding to ``inputs [batch, length, features]``.

  Attributes:
    max_len: longest sequence supported.
    max_timescale: the 10000 of the paper.
  """

  max_len: int = 2048
  max_timescale: float = 10000.0

  @nn.compact
  def __call__(self, inputs: Array, positions: Array | None = None) -> Array:
    """Args: inputs ``[batch, length, features]``; positions ``[batch, length]`` int (default 0..length-1)."""
    length, features = inputs.shape[-2], inputs.shape[-1]
    table = jnp.asarray(sinusoidal_table(self.max_len, features, max_timescale=self.max_timescale))
    if positions is None:
      if length > self.max_len:
        raise ValueError(f"sequence length {length} exceeds max_len={self.max_len}.")
      pe = table[None, :length]
    else:
      pe = jnp.take(table, positions, axis=0)
    return inputs + pe.astype(inputs.dtype)


class LearnedPositionalEmbedding(nn.Module):
  """Adds a trained ``[max_len, features]`` position table to the inputs.

  Attributes:
    max_len: number of positions.
    embedding_init: initialiser of the table.
    param_dtype: parameter dtype.
  """

  max_len: int = 2048
  embedding_init: Any = nn.initializers.normal(stddev=0.02)
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, inputs: Array, positions: Array | None = None) -> Array:
    """Args: inputs ``[batch, length, features]``; positions ``[batch, length]`` int (default 0..length-1)."""
    length, features = inputs.shape[-2], inputs.shape[-1]
    table = self.param("pos_embedding", self.embedding_init, (self.max_len, features), self.param_dtype)
    if positions is None:
      if length > self.max_len:
        raise ValueError(f"sequence length {length} exceeds max_len={self.max_len}.")
      pe = table[None, :length]
    else:
      pe = jnp.take(table, positions, axis=0)
    return inputs + pe.astype(inputs.dtype)


def apply_rotary(x: Array, positions: Array, *, max_timescale: float = 10000.0) -> Array:
  """Rotary position embedding (RoPE), rotate-half convention.

  Feature pairs ``(i, i + d/2)`` of each head are rotated by angle
  ``pos * max_timescale^(-2i/d)``, so ``<rope(q, m), rope(k, n)>`` depends only
  on ``m - n``. Pass absolute positions (cache index + offset) when decoding.

  Args:
    x: ``[batch..., length, heads, head_dim]`` with even ``head_dim``.
    positions: integer positions broadcastable to ``[batch..., length]``.
    max_timescale: base of the frequencies.

  Returns:
    Array of ``x``'s shape and dtype.
  """
  d = x.shape[-1]
  if d % 2:
    raise ValueError(f"rotary embeddings need an even head_dim, got {d}.")
  inv = max_timescale ** (-jnp.arange(0, d, 2, dtype=jnp.float32) / d)   # [d/2]
  angle = jnp.asarray(positions, jnp.float32)[..., None] * inv            # [..., L, d/2]
  sin, cos = jnp.sin(angle)[..., None, :], jnp.cos(angle)[..., None, :]  # heads axis
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)
