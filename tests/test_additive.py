"""Tests for attention.additive (Bahdanau attention) against a float64 NumPy reference."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention.additive import AdditiveAttention
from attention.masks import expand_memory_mask, masked_softmax

B, T, S, DQ, DK, DV, H = 3, 4, 6, 5, 7, 3, 8
TOL = dict(rtol=1e-5, atol=1e-5)


# --- Independent float64 reference. ---
def np_masked_softmax(scores, mask):
  scores = np.asarray(scores, np.float64)
  mask = np.broadcast_to(np.asarray(mask, bool), scores.shape)
  out = np.zeros_like(scores)
  for idx in np.ndindex(scores.shape[:-1]):
    m = mask[idx]
    if m.any():
      e = np.exp(scores[idx][m] - scores[idx][m].max())
      out[idx][m] = e / e.sum()
  return out


def np_additive(params, q, k, v, mask):
  """q [B,T,DQ], k [B,S,DK], v [B,S,DV], mask [B,T,S] -> (context, weights)."""
  p = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  w_q = p["query_proj"]["kernel"]
  u = p["key_proj"]["kernel"]
  b = p["key_proj"].get("bias", np.zeros(u.shape[1]))
  energy = p["energy"]["kernel"][:, 0]
  scores = np.tanh((q @ w_q)[:, :, None, :] + (k @ u + b)[:, None, :, :]) @ energy
  weights = np_masked_softmax(scores, mask)
  return np.einsum("bts,bsv->btv", weights, v), weights


def make_inputs(seed=0, lengths=(6, 3, 1)):
  # NumPy draws keep the tests fast: every new jax.random shape is a compile.
  rng = np.random.default_rng(seed)
  shapes = ((B, T, DQ), (B, S, DK), (B, S, DV))
  q, k, v = (jnp.asarray(rng.standard_normal(shape), jnp.float32) for shape in shapes)
  mask = jnp.asarray(np.arange(S)[None, :] < np.asarray(lengths)[:, None])
  return q, k, v, mask


def init(model, q, k, v=None, seed=42, **kw):
  """Variables with the structure ``model.init`` creates, filled from NumPy.

  ``eval_shape`` traces init (so it checks which params __call__ creates)
  without compiling the PRNG kernels. Biases get non-zero values too, so the
  reference checks that they are used.
  """
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), q, k, v, **kw))
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda s: jnp.asarray(1.5 * rng.standard_normal(s.shape) / np.sqrt(s.shape[0]), s.dtype),
      shapes,
  )


# --- Values. ---
@pytest.mark.parametrize("use_bias", [True, False])
@pytest.mark.parametrize("single_step", [False, True])
def test_matches_numpy_reference(use_bias, single_step):
  q, k, v, mask = make_inputs()
  if single_step:
    q = q[:, 1]
  model = AdditiveAttention(H, use_bias=use_bias)
  variables = init(model, q, k, v, mask=mask)
  assert ("bias" in variables["params"]["key_proj"]) == use_bias
  context, weights = model.apply(variables, q, k, v, mask=mask)

  q3 = q[:, None] if single_step else q
  ref_c, ref_w = np_additive(variables["params"], q3, k, v, np.asarray(mask)[:, None, :])
  if single_step:
    ref_c, ref_w = ref_c[:, 0], ref_w[:, 0]
  assert context.shape == ref_c.shape and weights.shape == ref_w.shape
  assert weights.dtype == jnp.float32
  np.testing.assert_allclose(weights, ref_w, **TOL)
  np.testing.assert_allclose(context, ref_c, **TOL)


def test_param_shapes_and_values_default_to_keys():
  q, k, _, mask = make_inputs()
  model = AdditiveAttention(H)
  params = init(model, q, k, mask=mask)["params"]
  shapes = jax.tree.map(jnp.shape, params)
  assert shapes == {
      "query_proj": {"kernel": (DQ, H)},
      "key_proj": {"kernel": (DK, H), "bias": (H,)},
      "energy": {"kernel": (H, 1)},
  }
  context, _ = model.apply({"params": params}, q, k, mask=mask)
  ref_c, _ = np_additive(params, q, k, k, np.asarray(mask)[:, None, :])
  np.testing.assert_allclose(context, ref_c, **TOL)
  # A real init (default initializers) creates the same tree, and it runs.
  real = jax.jit(lambda key: model.init(key, q, k, mask=mask))(jax.random.key(0))
  assert jax.tree.map(jnp.shape, real["params"]) == shapes
  assert np.all(np.isfinite(model.apply(real, q, k, mask=mask)[0]))


def test_weights_normalised_and_padding_exactly_zero():
  q, k, v, mask = make_inputs(lengths=(6, 3, 1))
  model = AdditiveAttention(H)
  _, weights = model.apply(init(model, q, k, v, mask=mask), q, k, v, mask=mask)
  np.testing.assert_allclose(weights.sum(-1), 1.0, atol=1e-6)
  padding = np.broadcast_to(~np.asarray(mask)[:, None, :], weights.shape)
  assert np.all(np.asarray(weights)[padding] == 0.0)


@pytest.mark.parametrize("mask_kind", ["shared", "per_query"])
def test_mask_shapes(mask_kind):
  q, k, v, _ = make_inputs()
  rng = np.random.default_rng(0)
  if mask_kind == "shared":  # [S]: same mask for every batch row and query
    mask = np.array([True, False, True, True, False, True])
    full = np.broadcast_to(mask, (B, T, S))
  else:  # [B, T, S]: e.g. a causal-like pattern, with one fully masked row
    full = rng.random((B, T, S)) < 0.6
    full[0, 2] = False
    mask = full
  model = AdditiveAttention(H)
  variables = init(model, q, k, v)
  context, weights = model.apply(variables, q, k, v, mask=jnp.asarray(mask))
  ref_c, ref_w = np_additive(variables["params"], q, k, v, full)
  np.testing.assert_allclose(weights, ref_w, **TOL)
  np.testing.assert_allclose(context, ref_c, **TOL)


def test_masked_softmax_helper():
  scores = jnp.array([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0], [1.0, 2.0, 3.0]])
  mask = jnp.array([[True, True, True], [True, False, True], [False, False, False]])
  out = masked_softmax(scores, mask)
  np.testing.assert_allclose(out, np_masked_softmax(scores, mask), atol=1e-7)
  np.testing.assert_allclose(masked_softmax(scores), jax.nn.softmax(scores), atol=1e-7)
  assert masked_softmax(scores.astype(jnp.bfloat16), mask).dtype == jnp.float32


def test_non_boolean_mask_rejected():
  q, k, v, mask = make_inputs()
  model = AdditiveAttention(H)
  variables = init(model, q, k, v)
  with pytest.raises(TypeError, match="boolean"):
    model.apply(variables, q, k, v, mask=mask.astype(jnp.float32))
  with pytest.raises(ValueError, match="not broadcastable"):
    expand_memory_mask(jnp.ones((B, T, S), bool), batch=B, q_len=1, kv_len=S, single_step=True)


def test_shape_errors():
  q, k, v, _ = make_inputs()
  model = AdditiveAttention(H)
  variables = init(model, q, k, v)
  with pytest.raises(ValueError, match="keys"):
    model.apply(variables, q, k[0], v)
  with pytest.raises(ValueError, match="projected_keys"):
    model.apply(variables, q, k, v, projected_keys=jnp.zeros((B, S, H + 1)))
  with pytest.raises(ValueError, match="values"):
    model.apply(variables, q, k, v[:, :-1])


def test_fully_masked_row_zero_output_and_finite_grads():
  q, k, v, mask = make_inputs(lengths=(6, 0, 2))
  model = AdditiveAttention(H)
  variables = init(model, q, k, v, mask=mask)
  context, weights = model.apply(variables, q, k, v, mask=mask)
  assert np.all(np.asarray(context[1]) == 0.0)
  assert np.all(np.asarray(weights[1]) == 0.0)
  assert np.all(np.isfinite(context)) and np.all(np.isfinite(weights))

  def loss(params, q, k, v):
    c, w = model.apply({"params": params}, q, k, v, mask=mask)
    return c.sum() + (w * jnp.arange(S)).sum()

  grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(variables["params"], q, k, v)
  for g in jax.tree.leaves(grads):
    assert np.all(np.isfinite(g))
  # The fully masked row must not receive (or send) any gradient.
  g_q, g_k, g_v = grads[1:]
  assert np.all(np.asarray(g_q[1]) == 0.0)
  assert np.all(np.asarray(g_k[1]) == 0.0) and np.all(np.asarray(g_v[1]) == 0.0)


# --- Precomputed keys and single-step use. ---
def test_precomputed_keys_match_and_project_keys_method():
  q, k, v, mask = make_inputs()
  model = AdditiveAttention(H)
  variables = init(model, q, k, v, mask=mask)
  projected = model.apply(variables, k, method=AdditiveAttention.project_keys)
  p = variables["params"]["key_proj"]
  np.testing.assert_allclose(
      projected, np.asarray(k, np.float64) @ np.asarray(p["kernel"]) + np.asarray(p["bias"]), **TOL
  )
  plain = model.apply(variables, q, k, v, mask=mask)
  pre = model.apply(variables, q, k, v, mask=mask, projected_keys=projected)
  for a, b in zip(plain, pre):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_init_on_precompute_path_creates_all_params():
  q, k, v, mask = make_inputs()
  model = AdditiveAttention(H)
  variables = init(model, q, k, v, mask=mask, projected_keys=jnp.zeros((B, S, H)))
  assert set(variables["params"]) == {"query_proj", "key_proj", "energy"}
  model.apply(variables, q, k, v, mask=mask)  # the non-precompute path must work too


def test_single_step_matches_sequence():
  q, k, v, mask = make_inputs()
  model = AdditiveAttention(H)
  variables = init(model, q, k, v, mask=mask)
  seq_c, seq_w = model.apply(variables, q, k, v, mask=mask)
  projected = model.apply(variables, k, method=model.project_keys)
  for t in range(T):
    c, w = model.apply(variables, q[:, t], k, v, mask=mask, projected_keys=projected)
    np.testing.assert_allclose(c, seq_c[:, t], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(w, seq_w[:, t], rtol=1e-6, atol=1e-6)


class _CompactParent(nn.Module):
  @nn.compact
  def __call__(self, q, k, v, mask):
    attn = AdditiveAttention(H, name="attn")
    projected = attn.project_keys(k)
    return attn(q, k, v, mask=mask, projected_keys=projected)


class _SetupParent(nn.Module):
  def setup(self):
    self.attn = AdditiveAttention(H)

  def __call__(self, q, k, v, mask):
    projected = self.attn.project_keys(k)
    return self.attn(q, k, v, mask=mask, projected_keys=projected)


@pytest.mark.parametrize("parent_cls", [_CompactParent, _SetupParent])
def test_project_keys_from_parent_module(parent_cls):
  q, k, v, mask = make_inputs()
  parent = parent_cls()
  variables = init(parent, q, k, v, mask=mask)
  inner = variables["params"]["attn"]
  assert set(inner) == {"query_proj", "key_proj", "energy"}
  context, weights = parent.apply(variables, q, k, v, mask)
  ref_c, ref_w = np_additive(inner, q, k, v, np.asarray(mask)[:, None, :])
  np.testing.assert_allclose(weights, ref_w, **TOL)
  np.testing.assert_allclose(context, ref_c, **TOL)


# --- Transformations. ---
def test_jit_vmap_grad():
  q, k, v, mask = make_inputs()
  model = AdditiveAttention(H)
  variables = init(model, q, k, v, mask=mask)
  params = variables["params"]
  apply = lambda vs, q, k, v, m: model.apply(vs, q, k, v, mask=m)
  # vmap over an extra leading axis (e.g. an ensemble of independent batches).
  qs, ks, vs = (jnp.stack([x, x[::-1] * 0.5]) for x in (q, k, v))
  ms = jnp.stack([mask, mask[::-1]])

  def loss(params):
    c, w = apply({"params": params}, q, k, v, mask)
    return jnp.sum(jnp.sin(c)) + jnp.sum(w * w)

  @jax.jit  # one compile for all three transformations keeps the test fast
  def transformed(variables):
    batched = jax.vmap(lambda q, k, v, m: apply(variables, q, k, v, m))(qs, ks, vs, ms)
    return apply(variables, q, k, v, mask), batched, jax.grad(loss)(variables["params"])

  jitted, batched, grads = transformed(variables)
  for a, b in zip(apply(variables, q, k, v, mask), jitted):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  for i in range(2):
    c, w = apply(variables, qs[i], ks[i], vs[i], ms[i])
    np.testing.assert_allclose(batched[0][i], c, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(batched[1][i], w, rtol=1e-5, atol=1e-6)

  # Gradient against a central finite difference along a random direction.
  rng = np.random.default_rng(1)
  direction = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), x.dtype), params)
  eps = 1e-2
  shift = lambda s: jax.tree.map(lambda p, d: p + s * eps * d, params, direction)
  numeric = (loss(shift(1.0)) - loss(shift(-1.0))) / (2 * eps)
  analytic = sum(jnp.vdot(g, d) for g, d in zip(jax.tree.leaves(grads), jax.tree.leaves(direction)))
  np.testing.assert_allclose(analytic, numeric, rtol=2e-2, atol=2e-3)


class _ScanDecoder(nn.Module):
  """Decoder-like loop: precompute U k once, then one attention call per step."""

  def setup(self):
    self.attn = AdditiveAttention(H)

  def __call__(self, queries, k, v, mask):
    projected = self.attn.project_keys(k)

    def body(mdl, carry, q_t, projected, k, v, mask):
      c, w = mdl.attn(q_t, k, v, mask=mask, projected_keys=projected)
      return carry + 1, (c, w)

    scan = nn.scan(
        body,
        variable_broadcast="params",
        split_rngs={"params": False},
        in_axes=(1, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
        out_axes=1,
    )
    steps, outputs = scan(self, jnp.zeros((), jnp.int32), queries, projected, k, v, mask)
    return steps, outputs


def test_inside_nn_scan():
  q, k, v, mask = make_inputs()
  decoder = _ScanDecoder()
  variables = init(decoder, q, k, v, mask=mask)
  assert set(variables["params"]["attn"]) == {"query_proj", "key_proj", "energy"}
  steps, (context, weights) = jax.jit(decoder.apply)(variables, q, k, v, mask)
  assert int(steps) == T
  ref_c, ref_w = np_additive(variables["params"]["attn"], q, k, v, np.asarray(mask)[:, None, :])
  np.testing.assert_allclose(weights, ref_w, **TOL)
  np.testing.assert_allclose(context, ref_c, **TOL)


def test_nn_remat():
  q, k, v, mask = make_inputs()
  plain = AdditiveAttention(H)
  remat = nn.remat(AdditiveAttention)(H)
  variables = init(plain, q, k, v, mask=mask)
  assert jax.tree.map(jnp.shape, init(remat, q, k, v, mask=mask)) == jax.tree.map(
      jnp.shape, variables
  )

  def loss(model, params):
    c, w = model.apply({"params": params}, q, k, v, mask=mask)
    return jnp.sum(c**2) + jnp.sum(w[..., 0])

  remat_out, remat_grads = jax.jit(
      lambda vs: (
          remat.apply(vs, q, k, v, mask=mask),
          jax.grad(lambda p: loss(remat, p))(vs["params"]),
      )
  )(variables)
  for a, b in zip(plain.apply(variables, q, k, v, mask=mask), remat_out):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  plain_grads = jax.grad(lambda p: loss(plain, p))(variables["params"])
  for a, b in zip(jax.tree.leaves(plain_grads), jax.tree.leaves(remat_grads)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


# --- Mixed precision. ---
@pytest.mark.parametrize("dtype", [None, jnp.bfloat16])
def test_bf16_inputs(dtype):
  q, k, v, mask = make_inputs()
  model32 = AdditiveAttention(H)
  variables = init(model32, q, k, v, mask=mask)
  ref_c, ref_w = np_additive(variables["params"], q, k, v, np.asarray(mask)[:, None, :])

  model = AdditiveAttention(H, dtype=dtype)
  qb, kb, vb = (x.astype(jnp.bfloat16) for x in (q, k, v))
  context, weights = model.apply(variables, qb, kb, vb, mask=mask)
  assert weights.dtype == jnp.float32
  assert context.dtype == (jnp.bfloat16 if dtype is not None else jnp.float32)
  assert np.all(np.isfinite(np.asarray(context, np.float32)))
  np.testing.assert_allclose(weights, ref_w, atol=3e-2)
  np.testing.assert_allclose(np.asarray(context, np.float32), ref_c, atol=5e-2)
  padding = np.broadcast_to(~np.asarray(mask)[:, None, :], weights.shape)
  assert np.all(np.asarray(weights)[padding] == 0.0)
