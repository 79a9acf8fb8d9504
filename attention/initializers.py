"""Initializers that work for every ``param_dtype``."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


def orthogonal(scale: float = 1.0) -> nn.initializers.Initializer:
  """flax's orthogonal initializer, drawn in float32 and cast to ``dtype``.

  The QR decomposition it runs has no bfloat16 kernel, so flax's own one fails
  for ``param_dtype=jnp.bfloat16``; recurrent kernels of every RNN cell here
  use this one.
  """
  init = nn.initializers.orthogonal(scale)

  def draw(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
    return init(key, shape, jnp.float32).astype(dtype)

  return draw
