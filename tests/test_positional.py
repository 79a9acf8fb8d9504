"""Positional encodings against their closed forms."""

import cmath
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention import (
    LearnedPositionalEmbedding,
    SinusoidalPositionalEncoding,
    apply_rotary,
    sinusoidal_table,
)


def test_sinusoidal_matches_paper_formula():
  table = sinusoidal_table(50, 8)
  for pos in (0, 1, 17, 49):
    for i in range(4):
      angle = pos / 10000 ** (2 * i / 8)
      assert table[pos, 2 * i] == pytest.approx(math.sin(angle), abs=1e-6)
      assert table[pos, 2 * i + 1] == pytest.approx(math.cos(angle), abs=1e-6)


def test_sinusoidal_module_adds_table_and_respects_positions():
  x = jnp.ones((2, 5, 8))
  mod = SinusoidalPositionalEncoding(max_len=32)
  y = mod.apply({}, x)
  np.testing.assert_allclose(y, np.broadcast_to(1 + sinusoidal_table(32, 8)[None, :5], y.shape), atol=1e-6)
  shifted = mod.apply({}, x, positions=jnp.arange(3, 8)[None])
  np.testing.assert_allclose(shifted, np.broadcast_to(1 + sinusoidal_table(32, 8)[None, 3:8], shifted.shape), atol=1e-6)
  with pytest.raises(ValueError, match="exceeds max_len"):
    mod.apply({}, jnp.ones((1, 40, 8)))


def test_learned_embedding_has_table_param():
  x = jnp.zeros((2, 5, 8))
  mod = LearnedPositionalEmbedding(max_len=16)
  v = mod.init(jax.random.key(0), x)
  table = v["params"]["pos_embedding"]
  assert table.shape == (16, 8)
  np.testing.assert_allclose(mod.apply(v, x), np.broadcast_to(table[:5], (2, 5, 8)))


def test_rotary_equals_complex_rotation():
  """RoPE pairs (i, i + d/2) as a complex number rotated by pos * base^(-2i/d)."""
  rng = np.random.default_rng(0)
  d = 8
  x = rng.normal(size=(1, 4, 1, d)).astype(np.float32)
  pos = np.array([0, 3, 10, 250])
  y = np.asarray(apply_rotary(jnp.asarray(x), jnp.asarray(pos)))
  for t, p in enumerate(pos):
    for i in range(d // 2):
      z = complex(x[0, t, 0, i], x[0, t, 0, i + d // 2]) * cmath.exp(1j * p * 10000 ** (-2 * i / d))
      assert y[0, t, 0, i] == pytest.approx(z.real, abs=1e-4)
      assert y[0, t, 0, i + d // 2] == pytest.approx(z.imag, abs=1e-4)


def test_rotary_scores_depend_only_on_offset():
  rng = np.random.default_rng(1)
  q, k = (jnp.asarray(rng.normal(size=(1, 1, 1, 16)), jnp.float32) for _ in range(2))
  def score(m, n):
    return float(jnp.sum(apply_rotary(q, jnp.array([m])) * apply_rotary(k, jnp.array([n]))))
  assert score(7, 3) == pytest.approx(score(107, 103), abs=1e-4)
  assert score(7, 3) != pytest.approx(score(7, 4), abs=1e-3)
