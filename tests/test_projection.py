"""projection_dot_general: values and gradients against float64 numpy, and its fallbacks."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention.projection import projection_dot_general


def _data(x_shape, k_shape, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal(x_shape).astype(np.float32)
  w = rng.standard_normal(k_shape).astype(np.float32)
  return x, w


@pytest.mark.parametrize("x_shape,k_shape,k", [
    ((5, 7, 16), (16, 24), 1),          # Dense: [B, T, in] @ [in, out]
    ((3, 6, 4, 8), (4, 8, 20), 2),      # DenseGeneral out-projection: [B, T, H, D] @ [H, D, out]
    ((9, 12), (12, 2, 5), 1),           # DenseGeneral to heads: [N, in] @ [in, H, D]
])
def test_values_and_gradients_match_float64(x_shape, k_shape, k):
  x, w = _data(x_shape, k_shape)
  dims = ((tuple(range(len(x_shape) - k, len(x_shape))), tuple(range(k))), ((), ()))
  out_shape = x_shape[:len(x_shape) - k] + k_shape[k:]
  cot = np.random.default_rng(1).standard_normal(out_shape)

  def loss(x, w):
    return jnp.sum(projection_dot_general(x, w, dims) * cot)

  value, (dx, dw) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(x, w)
  x64, w64 = x.astype(np.float64), w.astype(np.float64)
  n_in = int(np.prod(k_shape[:k]))
  x2, w2 = x64.reshape(-1, n_in), w64.reshape(n_in, -1)
  c2 = cot.reshape(x2.shape[0], -1)
  np.testing.assert_allclose(value, np.sum((x2 @ w2) * c2), rtol=1e-5)
  np.testing.assert_allclose(dx, (c2 @ w2.T).reshape(x_shape), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(dw, (x2.T @ c2).reshape(k_shape), rtol=1e-4, atol=1e-4)


def test_weight_gradient_uses_the_materialised_transpose_on_cpu():
  if jax.default_backend() != "cpu":
    pytest.skip("the fast path is CPU-only")
  x, w = _data((4, 6, 8), (8, 10))
  dims = (((2,), (0,)), ((), ()))
  grad = jax.jit(jax.grad(lambda w: projection_dot_general(x, w, dims).sum()))
  assert "optimization_barrier" in grad.lower(w).as_text()
  plain = jax.jit(jax.grad(lambda w: jax.lax.dot_general(x, w, dims).sum()))
  assert "optimization_barrier" not in plain.lower(w).as_text()


def test_other_contractions_fall_back_to_lax():
  rng = np.random.default_rng(2)
  a = rng.standard_normal((3, 4, 5)).astype(np.float32)
  b = rng.standard_normal((3, 5, 6)).astype(np.float32)
  batched = (((2,), (1,)), ((0,), (0,)))
  np.testing.assert_allclose(projection_dot_general(a, b, batched),
                             np.einsum("bij,bjk->bik", a, b), rtol=1e-5, atol=1e-5)
  leading = (((0,), (0,)), ((), ()))  # contracts lhs axis 0: not a projection
  c = rng.standard_normal((3, 7)).astype(np.float32)
  np.testing.assert_allclose(projection_dot_general(a.reshape(3, 20), c, leading),
                             a.reshape(3, 20).T @ c, rtol=1e-5, atol=1e-5)
  text = jax.jit(jax.grad(lambda c: projection_dot_general(a.reshape(3, 20), c, leading).sum())
                 ).lower(c).as_text()
  assert "optimization_barrier" not in text


def test_dense_with_projection_matches_flax_dense_and_its_gradients():
  x = jnp.asarray(np.random.default_rng(3).standard_normal((2, 5, 12)), jnp.float32)
  ours = nn.Dense(7, dot_general=projection_dot_general)
  ref = nn.Dense(7)
  params = ref.init(jax.random.key(0), x)
  loss = lambda m: jax.value_and_grad(lambda p: jnp.sum(jnp.sin(m.apply(p, x))))(params)
  (v1, g1), (v2, g2) = loss(ours), loss(ref)
  np.testing.assert_allclose(v1, v2, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), g1, g2)
