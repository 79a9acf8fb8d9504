"""The "xla" backend's custom backward pass and the CPU form of ``pᵀ @ x``.

The reference is the textbook backward in float64 numpy, with the softmax
gradient written as ``P ∘ (dP − rowsum(dP ∘ P))``, not the ``rowsum(dO ∘ O)``
that the code under test uses.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention import dot_product_attention
from attention import transposed_matmul
from attention.softmax_attention import softmax_attention
from attention.transposed_matmul import pt_matmul


def _reference(q, k, v, bias, mask, keep, keep_scale, dout):
  """float64 (out, dq, dk, dv, dlogits) for heads-first inputs."""
  q, k, v, dout = (np.asarray(x, np.float64) for x in (q, k, v, dout))
  s = np.einsum("...qd,...kd->...qk", q, k)
  if bias is not None:
    s = s + np.asarray(bias, np.float64)
  allowed = np.ones(s.shape, bool) if mask is None else np.broadcast_to(mask, s.shape)
  s = np.where(allowed, s, -np.inf)
  row_max = np.max(s, -1, keepdims=True)
  e = np.exp(s - np.where(np.isfinite(row_max), row_max, 0.0))
  total = e.sum(-1, keepdims=True)
  p = e / np.where(total > 0, total, 1.0)
  drop = 1.0 if keep is None else np.where(keep, keep_scale, 0.0)
  out = np.einsum("...qk,...kd->...qd", p * drop, v)
  dv = np.einsum("...qk,...qd->...kd", p * drop, dout)
  dp = np.einsum("...qd,...kd->...qk", dout, v) * drop
  ds = p * (dp - np.sum(dp * p, -1, keepdims=True))
  dq = np.einsum("...qk,...kd->...qd", ds, k)
  dk = np.einsum("...qk,...qd->...kd", ds, q)
  return out, dq, dk, dv, ds


def _sum_to(x, shape):
  lead = x.ndim - len(shape)
  x = x.sum(axis=tuple(range(lead)))
  return x.sum(axis=tuple(a for a, n in enumerate(shape) if n == 1), keepdims=True)


def _qkv_dout(rng, b, h, t, s, d):
  """float32 heads-first q ``[b, h, t, d]``, k and v ``[b, h, s, d]``, and an output cotangent."""
  return tuple(rng.normal(size=shape).astype(np.float32) for shape in
               ((b, h, t, d), (b, h, s, d), (b, h, s, d), (b, h, t, d)))


def _grads(q, k, v, bias, mask, keep, keep_scale, dout):
  def loss(q, k, v, bias):
    out = softmax_attention(q, k, v, bias, mask, keep, keep_scale)
    return jnp.sum(out * dout), out
  (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True)(
      q, k, v, bias)
  return out, grads


@pytest.mark.parametrize("with_dropout", [False, True])
def test_values_and_gradients_match_float64(with_dropout):
  """Mask with a fully masked row, a bias broadcast over the batch, and optionally
  a dropout pattern: output, dq, dk, dv and dbias against float64."""
  rng = np.random.default_rng(0)
  b, h, t, s, d = 2, 3, 5, 7, 4
  q, k, v, dout = _qkv_dout(rng, b, h, t, s, d)
  bias = rng.normal(size=(1, h, t, s)).astype(np.float32)
  mask = rng.random((b, 1, t, s)) < 0.7
  mask[1, 0, 2] = False  # query 2 of example 1 sees no key
  keep = rng.random((b, h, t, s)) < 0.8 if with_dropout else None
  keep_scale = 1.25
  out, (dq, dk, dv, dbias) = _grads(q, k, v, bias, mask, keep, keep_scale, dout)
  r_out, r_dq, r_dk, r_dv, r_ds = _reference(q, k, v, bias, mask, keep, keep_scale, dout)
  np.testing.assert_allclose(out, r_out, atol=2e-5, rtol=2e-5)
  for got, want in ((dq, r_dq), (dk, r_dk), (dv, r_dv), (dbias, _sum_to(r_ds, bias.shape))):
    np.testing.assert_allclose(got, want, atol=5e-5, rtol=5e-5)
  assert dbias.shape == bias.shape
  # The row without keys: zero output, zero gradient, no NaN anywhere.
  assert np.all(np.asarray(out)[1, :, 2] == 0) and np.all(np.asarray(dq)[1, :, 2] == 0)
  assert all(np.all(np.isfinite(np.asarray(g))) for g in (dq, dk, dv, dbias))


def test_batch_broadcast_keys_get_summed_gradients():
  """k and v shared by the batch ([1, ...]): their gradients sum over it."""
  rng = np.random.default_rng(1)
  q, dout = (rng.normal(size=(3, 2, 6, 4)).astype(np.float32) for _ in range(2))
  k, v = (rng.normal(size=(1, 2, 6, 4)).astype(np.float32) for _ in range(2))
  out, (dq, dk, dv, _) = _grads(q, k, v, None, None, None, 1.0, dout)
  r_out, r_dq, r_dk, r_dv, _ = _reference(q, k, v, None, None, None, 1.0, dout)
  assert dk.shape == k.shape and dv.shape == v.shape
  np.testing.assert_allclose(out, r_out, atol=2e-5, rtol=2e-5)
  for got, want in ((dq, r_dq), (dk, r_dk.sum(0, keepdims=True)),
                    (dv, r_dv.sum(0, keepdims=True))):
    np.testing.assert_allclose(got, want, atol=5e-5, rtol=5e-5)


def test_bf16_gradients_keep_input_dtypes_and_track_fp32():
  rng = np.random.default_rng(2)
  q, k, v, dout = (rng.normal(size=(2, 2, 8, 16)).astype(np.float32) for _ in range(4))
  bias = rng.normal(size=(2, 1, 8, 8)).astype(np.float32)
  _, g32 = _grads(q, k, v, bias, None, None, 1.0, dout)
  bf = [jnp.asarray(x, jnp.bfloat16) for x in (q, k, v, bias)]
  _, g16 = _grads(*bf[:3], bf[3], None, None, 1.0, dout)
  for a, b in zip(g16, g32):
    assert a.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(a, np.float32), b, atol=0.1, rtol=0.05)


def test_dropout_gradient_through_dot_product_attention():
  """dropout_rate > 0 on the "xla" backend: gradients equal the float64
  reference fed with the same keep pattern (read back from the weights of a
  value-one run)."""
  rng = np.random.default_rng(3)
  q, k, v, dout = (rng.normal(size=(1, 6, 2, 4)).astype(np.float32) for _ in range(4))
  key = jax.random.key(7)
  kw = dict(dropout_rng=key, dropout_rate=0.3, deterministic=False, implementation="xla")
  # With v = one-hot rows the output is the dropped-out weight matrix itself.
  eye = jnp.broadcast_to(jnp.eye(6)[None, :, None, :], (1, 6, 2, 6))
  weights = np.asarray(dot_product_attention(q, k, eye, **kw))  # [1, q, h, k]
  keep = np.swapaxes(weights, 1, 2) != 0
  keep_scale = 1.0 / 0.7
  grads = jax.grad(lambda q, k, v: jnp.sum(dot_product_attention(q, k, v, **kw) * dout),
                   argnums=(0, 1, 2))(q, k, v)
  heads = lambda x: np.swapaxes(x, 1, 2)  # noqa: E731
  _, r_dq, r_dk, r_dv, _ = _reference(heads(q) / 2.0, heads(k), heads(v), None, None,
                                      keep, keep_scale, heads(dout))
  for got, want in zip(grads, (r_dq / 2.0, r_dk, r_dv)):
    np.testing.assert_allclose(heads(np.asarray(got)), want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", ["cpu", "gpu"])
def test_pt_matmul_equals_einsum_on_both_paths(monkeypatch, backend):
  """The CPU form (xᵀp, transposed back) and the plain einsum other backends use."""
  monkeypatch.setattr(transposed_matmul.jax, "default_backend", lambda: backend)
  rng = np.random.default_rng(4)
  p = rng.normal(size=(2, 3, 9, 5)).astype(np.float32)
  x = rng.normal(size=(2, 3, 9, 4)).astype(np.float32)
  got = jax.jit(pt_matmul)(p, x)
  want = np.einsum("...qk,...qd->...kd", p.astype(np.float64), x.astype(np.float64))
  assert got.shape == (2, 3, 5, 4) and got.dtype == jnp.float32
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("with_dropout", [False, True])
def test_causal_row_blocks_match_float64(with_dropout):
  """``causal_blocks``: one custom VJP over row blocks, each against its key
  prefix, equals causal attention in float64 (values and all gradients), with
  more keys than queries (keys 7 and 8 are seen by no query: zero gradient)."""
  rng = np.random.default_rng(5)
  b, h, t, s, d = 2, 2, 7, 9, 4
  q, k, v, dout = _qkv_dout(rng, b, h, t, s, d)
  bias = rng.normal(size=(1, h, t, s)).astype(np.float32)
  mask = rng.random((b, 1, t, s)) < 0.8
  mask[0, 0, 4, :5] = False  # query 4 of example 0 keeps no key of its causal prefix
  keep = rng.random((1, 1, t, s)) < 0.8 if with_dropout else None
  blocks = ((0, 3, 3), (3, 6, 6), (6, 7, 7))

  def loss(q, k, v, bias):
    out = softmax_attention(q, k, v, bias, mask, keep, 1.25, None, blocks)
    return jnp.sum(out * dout), out

  (_, out), (dq, dk, dv, dbias) = jax.value_and_grad(
      loss, argnums=(0, 1, 2, 3), has_aux=True)(q, k, v, bias)
  causal = np.tril(np.ones((t, s), bool))
  r_out, r_dq, r_dk, r_dv, r_ds = _reference(q, k, v, bias, mask & causal, keep, 1.25, dout)
  np.testing.assert_allclose(out, r_out, atol=2e-5, rtol=2e-5)
  for got, want in ((dq, r_dq), (dk, r_dk), (dv, r_dv), (dbias, _sum_to(r_ds, bias.shape))):
    np.testing.assert_allclose(got, want, atol=5e-5, rtol=5e-5)
  assert np.all(np.asarray(dk)[..., 7:, :] == 0) and np.all(np.asarray(dv)[..., 7:, :] == 0)
  assert np.all(np.asarray(out)[0, :, 4] == 0)


@pytest.mark.parametrize("backend", ["cpu", "gpu"])
def test_pt_matmul_sum_adds_key_prefix_products(monkeypatch, backend):
  """Σᵢ pᵢᵀ xᵢ with each pᵢ over a prefix of the keys, zero-padded to the length."""
  monkeypatch.setattr(transposed_matmul.jax, "default_backend", lambda: backend)
  rng = np.random.default_rng(6)
  ps = [rng.normal(size=(2, 3, 4, n)).astype(np.float32) for n in (2, 5, 7)]
  xs = [rng.normal(size=(2, 3, 4, 6)).astype(np.float32) for _ in ps]
  got = jax.jit(lambda ps, xs: transposed_matmul.pt_matmul_sum(ps, xs, 8))(ps, xs)
  want = np.zeros((2, 3, 8, 6))
  for p, x in zip(ps, xs):
    want[..., :p.shape[-1], :] += np.einsum("...qk,...qd->...kd", p.astype(np.float64), x)
  assert got.shape == (2, 3, 8, 6) and got.dtype == jnp.float32
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_by_mask_branches_share_q_k_v_out_residuals(without_cpu_flash):
  """implementation=None with a mask array switches between "xla", "xla" with
  causal row blocks and the tiled backend. Under jax.grad each branch writes
  zeros for the residuals only the others save; q, k, v and out (trailing
  dim D) have one shape in every branch, so none of them is zero-filled."""
  b, t, h, d = 2, 512, 2, 32
  q = jnp.ones((b, t, h, d))
  mask = jnp.ones((b, 1, t, t), bool)
  loss = lambda q, k, v: jnp.sum(dot_product_attention(q, k, v, mask=mask))  # noqa: E731
  jaxpr = jax.make_jaxpr(jax.value_and_grad(loss, argnums=(0, 1, 2)))(q, q, q).jaxpr
  conds = [e for e in jaxpr.eqns if e.primitive.name == "cond"]
  forward = max(conds, key=lambda e: len(e.outvars))  # the one that returns residuals
  assert len(forward.params["branches"]) == 3
  for branch in forward.params["branches"]:
    eqns = branch.jaxpr.eqns
    empty = {id(e.outvars[0]) for e in eqns if e.primitive.name.startswith("empty")}
    zeros = {id(e.outvars[0]) for e in eqns
             if e.primitive.name == "broadcast_in_dim" and id(e.invars[0]) in empty}
    zero_filled = [v.aval.shape for v in branch.jaxpr.outvars if id(v) in zeros]
    assert zero_filled, "every branch lacks some residual of another"
    assert not [s for s in zero_filled if s[-1] == d], zero_filled
