"""Tests for attention.luong (Luong global/local attention) against a float64 NumPy reference."""

from __future__ import annotations

import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention.luong import LuongAttention

B, T, S, D, DV, HID = 3, 5, 9, 4, 3, 6
WINDOW = 2
LENGTHS = (9, 6, 3)
TOL = dict(rtol=1e-5, atol=1e-5)
SCORES = ("dot", "general", "concat")
MODES = ("global", "local-m", "local-p")
COMBOS = list(itertools.product(SCORES, MODES))


# --- Independent float64 reference, written from the paper's equations. ---
def np_masked_softmax(scores, mask):
  out = np.zeros_like(scores)
  for idx in np.ndindex(scores.shape[:-1]):
    m = mask[idx]
    if m.any():
      e = np.exp(scores[idx][m] - scores[idx][m].max())
      out[idx][m] = e / e.sum()
  return out


def np_sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def np_scores(score, p, q, k):
  """q [B,T,dq], k [B,S,dk] -> [B,T,S]."""
  if score == "dot":
    return np.einsum("btd,bsd->bts", q, k)
  if score == "general":  # h_t^T W_a h_s
    return np.einsum("btd,de,bse->bts", q, p["W_a"]["kernel"], k)
  # concat: v_a^T tanh(W_a [h_t; h_s]), with the concatenation built explicitly.
  qq = np.broadcast_to(q[:, :, None, :], q.shape[:2] + (k.shape[1], q.shape[-1]))
  kk = np.broadcast_to(k[:, None, :, :], (k.shape[0], q.shape[1]) + k.shape[1:])
  cat = np.concatenate([qq, kk], axis=-1)
  return np.tanh(cat @ p["W_a"]["kernel"]) @ p["v_a"]["kernel"][:, 0]


def np_position(p, q, mask):
  """local-p centre p_t = S_b * sigmoid(v_p^T tanh(W_p h_t)), S_b = unmasked count."""
  s_len = mask.sum(-1).astype(np.float64)
  return s_len * np_sigmoid(np.tanh(q @ p["W_p"]["kernel"]) @ p["v_p"]["kernel"][:, 0])


def np_luong(score, mode, window, params, q, k, v, mask, step=None):
  """mask [B,T,S] bool; step [B] offsets for local-m. Returns (context, weights)."""
  p = jax.tree.map(lambda x: np.asarray(x, np.float64), params or {})
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  mask = np.asarray(mask, bool)
  scores = np_scores(score, p, q, k)
  s = np.arange(k.shape[1], dtype=np.float64)
  if mode == "global":
    weights = np_masked_softmax(scores, mask)
  else:
    if mode == "local-m":
      offset = np.zeros(q.shape[0]) if step is None else np.asarray(step, np.float64)
      centre = offset[:, None] + np.arange(q.shape[1])[None, :]
      # Past the source's last position the window stays on that position.
      for b, t in np.ndindex(centre.shape):
        if mask[b, t].any():
          centre[b, t] = min(centre[b, t], np.flatnonzero(mask[b, t])[-1])
    else:
      centre = np_position(p, q, mask)
    dist = s[None, None, :] - centre[:, :, None]
    weights = np_masked_softmax(scores, mask & (np.abs(dist) <= window))
    if mode == "local-p":
      sigma = window / 2.0
      weights = weights * np.exp(-(dist**2) / (2 * sigma**2))
  return np.einsum("bts,bsv->btv", weights, v), weights


def make_inputs(seed=0, lengths=LENGTHS):
  # NumPy draws keep the tests fast: every new jax.random shape is a compile.
  rng = np.random.default_rng(seed)
  shapes = ((B, T, D), (B, S, D), (B, S, DV))
  q, k, v = (jnp.asarray(rng.standard_normal(shape), jnp.float32) for shape in shapes)
  mask = jnp.asarray(np.arange(S)[None, :] < np.asarray(lengths)[:, None])
  return q, k, v, mask


def full_mask(mask, q_len=T):
  return np.broadcast_to(np.asarray(mask)[:, None, :], (B, q_len, S))


def make(score, mode, **kw):
  return LuongAttention(score=score, mode=mode, window=kw.pop("window", WINDOW), **kw)


def init(model, q, k, v=None, seed=7, **kw):
  """Variables with the structure ``model.init`` creates, filled from NumPy.

  ``eval_shape`` traces init (so it checks which params __call__ creates)
  without compiling the PRNG kernels; N(0, 1/fan_in) * 2 gives peakier
  attention than the default init, which exercises the softmax better.
  """
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), q, k, v, **kw))
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda s: jnp.asarray(2.0 * rng.standard_normal(s.shape) / np.sqrt(s.shape[0]), s.dtype),
      shapes,
  )


# --- Values against the reference. ---
@pytest.mark.parametrize("score,mode", COMBOS)
def test_sequence_query_matches_numpy(score, mode):
  q, k, v, mask = make_inputs()
  model = make(score, mode)
  variables = init(model, q, k, v, mask=mask)
  context, weights = model.apply(variables, q, k, v, mask=mask)
  ref_c, ref_w = np_luong(score, mode, WINDOW, variables.get("params"), q, k, v, full_mask(mask))
  assert weights.dtype == jnp.float32
  assert weights.shape == (B, T, S) and context.shape == (B, T, DV)
  np.testing.assert_allclose(weights, ref_w, **TOL)
  np.testing.assert_allclose(context, ref_c, **TOL)
  # Padding gets exactly zero weight.
  assert np.all(np.asarray(weights)[~full_mask(mask)] == 0.0)


@pytest.mark.parametrize("score,mode", COMBOS)
def test_single_step_matches_numpy_and_sequence(score, mode):
  q, k, v, mask = make_inputs(seed=1)
  model = make(score, mode)
  step = jnp.array([0, 3, 7])
  variables = init(model, q[:, 0], k, v, mask=mask, step=step)
  context, weights = model.apply(variables, q[:, 2], k, v, mask=mask, step=step)
  assert context.shape == (B, DV) and weights.shape == (B, S)
  ref_c, ref_w = np_luong(
      score, mode, WINDOW, variables.get("params"), q[:, 2:3], k, v, full_mask(mask, 1), step
  )
  np.testing.assert_allclose(weights, ref_w[:, 0], **TOL)
  np.testing.assert_allclose(context, ref_c[:, 0], **TOL)

  # A decoder stepping t = 0..T-1 one at a time agrees with the all-steps call.
  seq_c, seq_w = model.apply(variables, q, k, v, mask=mask)
  for t in range(T):
    c, w = model.apply(variables, q[:, t], k, v, mask=mask, step=t)
    np.testing.assert_allclose(c, seq_c[:, t], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(w, seq_w[:, t], rtol=1e-6, atol=1e-6)
  # For a multi-step query, step offsets the positions (local-m) or is ignored.
  _, offset_w = model.apply(variables, q, k, v, mask=mask, step=step)
  _, ref_w = np_luong(score, mode, WINDOW, variables.get("params"), q, k, v, full_mask(mask), step)
  np.testing.assert_allclose(offset_w, ref_w, **TOL)


def test_param_shapes_and_different_query_dim():
  q, k, v, mask = make_inputs()
  q5 = jnp.concatenate([q, q[..., :1] * 0.3], axis=-1)  # q_dim 5 != k_dim 4
  shapes = lambda m, q: jax.tree.map(jnp.shape, init(m, q, k, v, mask=mask).get("params"))
  assert shapes(make("dot", "global"), q) is None
  assert shapes(make("general", "global"), q5) == {"W_a": {"kernel": (5, D)}}
  assert shapes(make("concat", "local-m", hidden_dim=HID), q5) == {
      "W_a": {"kernel": (5 + D, HID)},
      "v_a": {"kernel": (HID, 1)},
  }
  assert shapes(make("general", "local-p"), q5) == {
      "W_a": {"kernel": (5, D)},
      "W_p": {"kernel": (5, 5)},
      "v_p": {"kernel": (5, 1)},
  }
  for score in ("general", "concat"):
    model = make(score, "local-p")
    variables = init(model, q5, k, v, mask=mask)
    context, weights = model.apply(variables, q5, k, v, mask=mask)
    ref_c, ref_w = np_luong(
        score, "local-p", WINDOW, variables["params"], q5, k, v, full_mask(mask)
    )
    np.testing.assert_allclose(weights, ref_w, **TOL)
    np.testing.assert_allclose(context, ref_c, **TOL)


# --- Properties of the weights. ---
@pytest.mark.parametrize("score", SCORES)
@pytest.mark.parametrize("mode", ["global", "local-m"])
def test_weights_sum_to_one(score, mode):
  q, k, v, mask = make_inputs()
  model = make(score, mode)
  _, weights = model.apply(init(model, q, k, v, mask=mask), q, k, v, mask=mask)
  sums = np.asarray(weights).sum(-1)
  if mode == "global":
    np.testing.assert_allclose(sums, 1.0, atol=1e-6)
  else:
    # local-m clamps p_t = t to the last source position, so every row sums
    # to 1 even where t - D is past the source (LENGTHS[2] = 3, t = 4 > 3 - 1 + D
    # would have been all zero).
    np.testing.assert_allclose(sums, 1.0, atol=1e-6)


def test_local_m_clamps_to_last_source_position():
  q, k, v, mask = make_inputs(lengths=(9, 6, 2))
  model = make("general", "local-m", window=1)
  _, weights = model.apply(init(model, q, k, v), q, k, v, mask=mask)
  weights = np.asarray(weights)
  # Example 2 has source positions 0 and 1: from t = 1 on, the window is
  # centred at 1 and covers positions 0..1 (2 is padding).
  for t in range(1, T):
    assert np.all(weights[2, t, 2:] == 0.0) and np.all(weights[2, t, :2] > 0.0)
  # Example 0 never reaches its end (T = 5 < 9): windows stay at t.
  assert np.all(weights[0, 4, 3:6] > 0.0) and weights[0, 4, 2] == 0.0
  # A single step far past the end still attends, around the last position.
  _, w = model.apply(init(model, q, k, v), q[:, 0], k, v, mask=mask, step=jnp.array([40, 40, 40]))
  np.testing.assert_allclose(np.asarray(w).sum(-1), 1.0, atol=1e-6)
  assert np.all(np.asarray(w)[2, :2] > 0.0) and np.all(np.asarray(w)[1, :4] == 0.0)


def test_local_m_zero_outside_window():
  q, k, v, mask = make_inputs(lengths=(9, 9, 9))
  model = make("general", "local-m", window=1)
  _, weights = model.apply(init(model, q, k, v), q, k, v, mask=mask)
  dist = np.abs(np.arange(S)[None, :] - np.arange(T)[:, None])
  outside = np.broadcast_to(dist > 1, weights.shape)
  assert np.all(np.asarray(weights)[outside] == 0.0)
  assert np.all(np.asarray(weights)[~outside] > 0.0)


def test_local_p_is_window_softmax_times_gaussian():
  q, k, v, mask = make_inputs()
  model = make("general", "local-p", window=3)
  variables = init(model, q, k, v, mask=mask)
  _, weights = model.apply(variables, q, k, v, mask=mask)
  p = jax.tree.map(lambda x: np.asarray(x, np.float64), variables["params"])
  q64, k64 = np.asarray(q, np.float64), np.asarray(k, np.float64)
  centre = np_position(p, q64, full_mask(mask))
  assert np.all(centre <= np.asarray(LENGTHS)[:, None])  # p_t uses the true length
  dist = np.arange(S)[None, None, :] - centre[..., None]
  in_window = (np.abs(dist) <= 3) & full_mask(mask)
  softmax = np_masked_softmax(np_scores("general", p, q64, k64), in_window)
  gauss = np.exp(-(dist**2) / (2 * 1.5**2))
  w = np.asarray(weights, np.float64)
  np.testing.assert_allclose(w[in_window] / softmax[in_window], gauss[in_window], rtol=1e-4)
  assert np.all(w[~in_window] == 0.0)
  assert np.all(w.sum(-1) < 1.0)  # not renormalised after the Gaussian


def test_local_p_without_mask_uses_kv_len():
  q, k, v, _ = make_inputs()
  model = make("concat", "local-p")
  variables = init(model, q, k, v)
  no_mask = model.apply(variables, q, k, v)
  all_true = model.apply(variables, q, k, v, mask=jnp.ones((B, S), bool))
  for a, b in zip(no_mask, all_true):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def loss_grads(model, variables, q, k, v, mask):
  """Grads w.r.t. (params, q, k, v) of one shared loss (keeps eager compiles cached)."""

  def loss(params, q, k, v):
    c, w = model.apply({"params": params}, q, k, v, mask=mask)
    return jnp.sum(c * jnp.arange(1, DV + 1)) + jnp.sum(w * jnp.arange(S))

  return jax.grad(loss, argnums=(0, 1, 2, 3))(variables.get("params", {}), q, k, v)


def test_local_p_gradient_reaches_position_network():
  q, k, v, mask = make_inputs(lengths=(9, 0, 4))
  model = make("dot", "local-p")  # dot: W_p / v_p act only through p_t
  grads = loss_grads(model, init(model, q, k, v, mask=mask), q, k, v, mask)[0]
  for name in ("W_p", "v_p"):
    g = np.asarray(grads[name]["kernel"])
    assert np.all(np.isfinite(g)) and np.abs(g).max() > 1e-4, name


@pytest.mark.parametrize("score,mode", COMBOS)
def test_fully_masked_row(score, mode):
  q, k, v, mask = make_inputs(lengths=(9, 0, 4))
  model = make(score, mode)
  variables = init(model, q, k, v, mask=mask)
  context, weights = model.apply(variables, q, k, v, mask=mask)
  assert np.all(np.asarray(context[1]) == 0.0) and np.all(np.asarray(weights[1]) == 0.0)
  grads = loss_grads(model, variables, q, k, v, mask)
  for g in jax.tree.leaves(grads):
    assert np.all(np.isfinite(g))
  assert np.all(np.asarray(grads[1][1]) == 0.0)  # no gradient into the dead row's query


# --- Errors. ---
def test_errors():
  with pytest.raises(ValueError, match=r"score must be one of \('dot', 'general', 'concat'\)"):
    LuongAttention(score="bilinear")
  with pytest.raises(ValueError, match=r"mode must be one of \('global', 'local-m', 'local-p'\)"):
    LuongAttention(mode="local")
  with pytest.raises(ValueError, match="window"):
    LuongAttention(mode="local-p", window=0)
  q, k, v, mask = make_inputs()
  with pytest.raises(ValueError, match="score='dot' needs query and key dims to match"):
    init(make("dot", "global"), q[..., :3], k, v)
  model = make("general", "local-m")
  variables = init(model, q, k, v)
  with pytest.raises(ValueError, match="needs step="):
    model.apply(variables, q[:, 0], k, v, mask=mask)
  with pytest.raises(TypeError, match="boolean"):
    model.apply(variables, q, k, v, mask=mask.astype(jnp.int32))


# --- Transformations. ---
@pytest.mark.parametrize("score,mode", [("general", "local-m"), ("concat", "local-p")])
def test_jit_vmap_grad(score, mode):
  q, k, v, mask = make_inputs()
  model = make(score, mode)
  variables = init(model, q, k, v, mask=mask)
  apply = lambda vs, q, k, v, m, s=None: model.apply(vs, q, k, v, mask=m, step=s)
  qs, ks, vs = (jnp.stack([x, -x]) for x in (q, k, v))
  ms = jnp.stack([mask, mask[::-1]])
  loss = lambda p: jnp.sum(apply({"params": p}, q, k, v, mask)[0] ** 2)

  @jax.jit  # one compile for all three transformations keeps the test fast
  def transformed(variables, step):
    single = apply(variables, q[:, 1], k, v, mask, step)  # traced step
    batched = jax.vmap(lambda q, k, v, m: apply(variables, q, k, v, m))(qs, ks, vs, ms)
    return single, batched, jax.grad(loss)(variables["params"])

  single, batched, grads = transformed(variables, jnp.asarray(1))
  for a, b in zip(single, apply(variables, q[:, 1], k, v, mask, 1)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  for i in range(2):
    c, w = apply(variables, qs[i], ks[i], vs[i], ms[i])
    np.testing.assert_allclose(batched[0][i], c, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(batched[1][i], w, rtol=1e-5, atol=1e-6)
  eager_grads = jax.grad(loss)(variables["params"])
  for g, e in zip(jax.tree.leaves(grads), jax.tree.leaves(eager_grads)):
    assert np.all(np.isfinite(g)) and np.abs(g).max() > 0
    np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-5)


class _ScanCell(nn.Module):
  score: str
  mode: str

  @nn.compact
  def __call__(self, step, q_t, k, v, mask):
    c, w = make(self.score, self.mode, name="attn")(q_t, k, v, mask=mask, step=step)
    return step + 1, (c, w)


class _ScanDecoder(nn.Module):
  score: str
  mode: str

  @nn.compact
  def __call__(self, queries, k, v, mask):
    cell = nn.scan(
        _ScanCell,
        variable_broadcast="params",
        split_rngs={"params": False},
        in_axes=(1, nn.broadcast, nn.broadcast, nn.broadcast),
        out_axes=1,
    )(self.score, self.mode, name="cell")
    return cell(jnp.zeros((queries.shape[0],), jnp.int32), queries, k, v, mask)


@pytest.mark.parametrize(
    "score,mode", [("general", "local-m"), ("concat", "global"), ("dot", "local-p")]
)
def test_inside_nn_scan(score, mode):
  q, k, v, mask = make_inputs()
  decoder = _ScanDecoder(score, mode)
  variables = init(decoder, q, k, v, mask=mask)
  steps, (context, weights) = jax.jit(decoder.apply)(variables, q, k, v, mask)
  np.testing.assert_array_equal(steps, T)
  params = variables.get("params", {}).get("cell", {}).get("attn")
  ref_c, ref_w = np_luong(score, mode, WINDOW, params, q, k, v, full_mask(mask))
  np.testing.assert_allclose(weights, ref_w, **TOL)
  np.testing.assert_allclose(context, ref_c, **TOL)


def test_nn_remat():
  q, k, v, mask = make_inputs()
  plain = make("concat", "local-p")
  remat = nn.remat(LuongAttention)(score="concat", mode="local-p", window=WINDOW)
  variables = init(plain, q, k, v, mask=mask)

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
  assert jax.tree.structure(plain_grads) == jax.tree.structure(remat_grads)
  for a, b in zip(jax.tree.leaves(plain_grads), jax.tree.leaves(remat_grads)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


# --- Mixed precision. ---
@pytest.mark.parametrize(
    "score,mode", [("dot", "global"), ("general", "local-m"), ("concat", "local-p")]
)
def test_bf16_inputs(score, mode):
  q, k, v, mask = make_inputs()
  variables = init(make(score, mode), q, k, v, mask=mask)
  ref_c, ref_w = np_luong(score, mode, WINDOW, variables.get("params"), q, k, v, full_mask(mask))
  model = make(score, mode, dtype=jnp.bfloat16)
  qb, kb, vb = (x.astype(jnp.bfloat16) for x in (q, k, v))
  context, weights = model.apply(variables, qb, kb, vb, mask=mask)
  assert weights.dtype == jnp.float32 and context.dtype == jnp.bfloat16
  assert np.all(np.isfinite(np.asarray(context, np.float32)))
  np.testing.assert_allclose(weights, ref_w, atol=5e-2)
  np.testing.assert_allclose(np.asarray(context, np.float32), ref_c, atol=1e-1)
  assert np.all(np.asarray(weights)[~full_mask(mask)] == 0.0)
