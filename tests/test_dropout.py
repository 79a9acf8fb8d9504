"""attention.dropout: cheap 16-bit dropout masks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention.dropout import Dropout, dropout, keep_mask, keep_scale


@pytest.mark.parametrize("rate", [0.1, 0.5])
@pytest.mark.parametrize("impl", ["threefry2x32", "rbg"])
def test_keep_rate_and_unbiased(rate, impl):
  key = jax.random.key(0, impl=impl)
  m = keep_mask(key, rate, (64, 8, 33, 31))  # odd last axis: the quarters are trimmed
  assert m.shape == (64, 8, 33, 31) and m.dtype == jnp.bool_
  n = m.size
  assert abs(float(m.mean()) - (1 - rate)) < 5 * np.sqrt(rate * (1 - rate) / n)
  x = jnp.ones((512, 512))
  assert abs(float(dropout(x, rate, key).mean()) - 1.0) < 0.01
  assert keep_scale(rate) == pytest.approx(1 / (1 - rate), rel=1e-4)


def test_deterministic_in_key_and_independent_across_keys():
  a = keep_mask(jax.random.key(1), 0.5, (4, 1000))
  np.testing.assert_array_equal(a, keep_mask(jax.random.key(1), 0.5, (4, 1000)))
  b = keep_mask(jax.random.key(2), 0.5, (4, 1000))
  assert 0.4 < float(jnp.mean(a == b)) < 0.6
  # Rows are not copies of each other (the four 16-bit fields are independent).
  corr = np.corrcoef(np.asarray(a, np.float64))
  assert np.max(np.abs(corr - np.eye(4))) < 0.15
  raw = keep_mask(jax.random.PRNGKey(1), 0.5, (4, 1000))  # legacy uint32[2] keys work too
  assert raw.shape == (4, 1000)


def test_edge_rates_and_module():
  x = jnp.arange(1.0, 7.0).reshape(2, 3)
  np.testing.assert_array_equal(dropout(x, 0.0, jax.random.key(0)), x)
  np.testing.assert_array_equal(dropout(x, 1.0, jax.random.key(0)), jnp.zeros_like(x))
  mod = Dropout(0.5, broadcast_dims=(0,))
  y = mod.apply({}, jnp.ones((8, 64)), deterministic=False, rngs={"dropout": jax.random.key(3)})
  np.testing.assert_array_equal(y, jnp.broadcast_to(y[:1], y.shape))  # one mask shared on axis 0
  assert set(np.unique(np.asarray(y))) <= {0.0, 2.0}
  np.testing.assert_array_equal(mod.apply({}, x, deterministic=True), x)


@pytest.mark.parametrize("shape", [(2, 3, 40, 37), (6, 5, 16)])
def test_large_masks_drawn_in_slices_are_the_same_bits(monkeypatch, shape):
  """Past _SLICE_ELEMENTS the pattern is drawn a slice of rows at a time; it must
  be bit for bit the one drawn at once (and thus the same for any threshold)."""
  import attention.dropout as dropout_lib
  key = jax.random.key(4)
  whole = np.asarray(keep_mask(key, 0.3, shape))
  monkeypatch.setattr(dropout_lib, "_SLICE_ELEMENTS", 2 * shape[-1] + 5)
  rows = int(np.prod(shape[:-1]))
  per_slice = dropout_lib._rows_per_slice(rows, shape[-1])
  assert per_slice == 2 and rows % per_slice == 0  # drawn in many slices of 2 rows
  sliced = np.asarray(jax.jit(lambda k: keep_mask(k, 0.3, shape))(key))
  np.testing.assert_array_equal(sliced, whole)
  assert dropout_lib._rows_per_slice(7919, 1) is None  # a prime: no divisor near 37+ rows
