"""MultiHeadAttention against flax's module, KV-cache decoding, GQA, RoPE, sow_weights."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attention import MultiHeadAttention

IMPLS = ["xla", "chunked"]


def x_of(*shape, seed=0):
  return jax.random.normal(jax.random.key(seed), shape)


@pytest.mark.parametrize("fields", [
    dict(num_heads=4),
    dict(num_heads=2, qkv_features=24, out_features=10),
    dict(num_heads=4, use_bias=False, normalize_qk=True),
])
def test_param_tree_identical_to_flax(fields):
  x = x_of(2, 5, 16)
  ours = jax.tree.map(jnp.shape, MultiHeadAttention(**fields).init(jax.random.key(0), x))
  theirs = jax.tree.map(jnp.shape, nn.MultiHeadDotProductAttention(**fields).init(jax.random.key(0), x))
  assert ours == theirs


@pytest.mark.parametrize("impl", IMPLS)
def test_outputs_equal_flax_both_checkpoint_directions(impl):
  xq, xkv = x_of(2, 7, 16, seed=1), x_of(2, 11, 16, seed=2)
  valid_q = jnp.array([[1] * 7, [1] * 4 + [0] * 3])
  valid_k = jnp.array([[1] * 11, [0] * 2 + [1] * 9])   # left padding on one example
  cross_mask = nn.make_attention_mask(valid_q, valid_k)
  ours = MultiHeadAttention(num_heads=4, qkv_features=32, implementation=impl)
  theirs = nn.MultiHeadDotProductAttention(num_heads=4, qkv_features=32)
  for init_with in (ours, theirs):   # checkpoints swap both ways
    params = init_with.init(jax.random.key(3), xq, xkv)
    a = ours.apply(params, xq, xkv, mask=cross_mask)
    b = theirs.apply(params, xq, xkv, mask=cross_mask)
    rows = np.asarray(valid_q, bool)   # flax averages fully masked rows; we return zeros
    np.testing.assert_allclose(np.asarray(a)[rows], np.asarray(b)[rows], atol=2e-6)
    np.testing.assert_allclose(np.asarray(a)[~rows], np.broadcast_to(
        params["params"]["out"]["bias"], np.asarray(a)[~rows].shape), atol=1e-7)
    causal = nn.make_causal_mask(jnp.ones_like(valid_q))
    np.testing.assert_allclose(ours.apply(params, xq, mask=causal),
                               theirs.apply(params, xq, mask=causal), atol=2e-6)
    np.testing.assert_allclose(ours.apply(params, xq, is_causal=True),
                               theirs.apply(params, xq, mask=causal), atol=2e-6)


@pytest.mark.parametrize("impl", IMPLS)
def test_sow_weights_with_every_backend_equals_flax(impl):
  x = x_of(2, 6, 16)
  mask = nn.make_causal_mask(jnp.ones((2, 6)))
  params = nn.MultiHeadDotProductAttention(num_heads=2).init(jax.random.key(0), x)
  _, ours = MultiHeadAttention(num_heads=2, implementation=impl).apply(
      params, x, mask=mask, sow_weights=True, mutable=["intermediates"])
  _, theirs = nn.MultiHeadDotProductAttention(num_heads=2).apply(
      params, x, mask=mask, sow_weights=True, mutable=["intermediates"])
  w = ours["intermediates"]["attention_weights"][0]
  np.testing.assert_allclose(w, theirs["intermediates"]["attention_weights"][0], atol=1e-6)
  # Not asked, not computed: nothing is sown.
  _, none = MultiHeadAttention(num_heads=2).apply(params, x, mask=mask, mutable=["intermediates"])
  assert "intermediates" not in none or not none["intermediates"]


def test_gqa_equals_mha_with_repeated_kv_heads():
  x = x_of(2, 9, 16)
  gqa = MultiHeadAttention(num_heads=4, num_kv_heads=2)
  p = gqa.init(jax.random.key(0), x)["params"]
  assert p["key"]["kernel"].shape == (16, 2, 4) and p["query"]["kernel"].shape == (16, 4, 4)
  full = jax.tree.map(lambda a: a, p)
  for name in ("key", "value"):
    full[name] = {k: jnp.repeat(v, 2, axis=-2) for k, v in p[name].items()}
  mha = MultiHeadAttention(num_heads=4)
  np.testing.assert_allclose(gqa.apply({"params": p}, x, is_causal=True),
                             mha.apply({"params": full}, x, is_causal=True), atol=2e-6)
  with pytest.raises(ValueError, match="num_kv_heads=3 must divide num_heads=4"):
    MultiHeadAttention(num_heads=4, num_kv_heads=3).init(jax.random.key(0), x)


def _decode(mod_kwargs, params, x, chunks):
  dec = MultiHeadAttention(decode=True, **mod_kwargs)
  cache = dec.init(jax.random.key(0), x)["cache"]
  outs, at = [], 0
  for n in chunks:
    y, mut = dec.apply({"params": params, "cache": cache}, x[:, at:at + n], mutable=["cache"])
    cache, at = mut["cache"], at + n
    outs.append(y)
  return jnp.concatenate(outs, axis=1), cache


@pytest.mark.parametrize("impl,kw,chunks", [
    ("xla", {}, [1] * 10),
    ("xla", {}, [4, 1, 1, 1, 1, 1, 1]),
    ("xla", dict(num_kv_heads=1, rotary=True), [1] * 10),
    ("xla", dict(num_kv_heads=2, rotary=True), [4, 1, 1, 1, 1, 1, 1]),
    ("xla", dict(rotary=True), [3, 2, 5]),
    ("chunked", dict(num_kv_heads=2, rotary=True), [4, 1, 1, 1, 1, 1, 1]),
    ("chunked", {}, [3, 2, 5]),
], ids=["steps", "prefill", "mqa-rope-steps", "gqa-rope-prefill", "rope-multi-token",
        "chunked-gqa-rope-prefill", "chunked-multi-token"])
def test_kv_cache_decoding_equals_full_causal_pass(impl, kw, chunks):
  x = x_of(2, 10, 16, seed=5)
  mod_kwargs = dict(num_heads=4, implementation=impl, **kw)
  params = MultiHeadAttention(**mod_kwargs).init(jax.random.key(1), x)["params"]
  full = MultiHeadAttention(**mod_kwargs).apply({"params": params}, x, is_causal=True)
  decoded, cache = _decode(mod_kwargs, params, x, chunks)
  np.testing.assert_allclose(decoded, full, atol=3e-6)
  assert int(cache["cache_index"]) == 10


def test_cache_layout_matches_flax_for_swapping():
  x = x_of(2, 6, 16)
  ours = MultiHeadAttention(num_heads=2, decode=True).init(jax.random.key(0), x)["cache"]
  theirs = nn.MultiHeadDotProductAttention(num_heads=2, decode=True).init(jax.random.key(0), x)["cache"]
  assert jax.tree.map(jnp.shape, ours) == jax.tree.map(jnp.shape, theirs)


def test_decode_rejects_wrong_batch_with_clear_error():
  x = x_of(2, 6, 16)
  dec = MultiHeadAttention(num_heads=2, decode=True)
  v = dec.init(jax.random.key(0), x)
  with pytest.raises(ValueError, match="decode cache holds"):
    dec.apply(v, x_of(3, 1, 16), mutable=["cache"])


def test_rotary_depends_only_on_relative_position():
  x = x_of(2, 8, 16)
  mod = MultiHeadAttention(num_heads=2, rotary=True)
  p = mod.init(jax.random.key(0), x)
  pos = jnp.arange(8)
  a = mod.apply(p, x, is_causal=True, positions=pos)
  b = mod.apply(p, x, is_causal=True, positions=pos + 123)
  np.testing.assert_allclose(a, b, atol=2e-5)
  c = MultiHeadAttention(num_heads=2).apply(p, x, is_causal=True)
  assert not np.allclose(a, c, atol=1e-3)   # RoPE really changes the scores


def test_dropout_uses_explicit_rng_and_deterministic_flag():
  x = x_of(2, 8, 16)
  mod = MultiHeadAttention(num_heads=2, dropout_rate=0.5)
  p = mod.init(jax.random.key(0), x, deterministic=True)
  d1 = mod.apply(p, x, deterministic=False, dropout_rng=jax.random.key(7))
  d2 = mod.apply(p, x, deterministic=False, rngs={"dropout": jax.random.key(7)})
  d3 = mod.apply(p, x, deterministic=False, dropout_rng=jax.random.key(8))
  det = mod.apply(p, x, deterministic=True)
  np.testing.assert_allclose(d2, mod.apply(p, x, deterministic=False, rngs={"dropout": jax.random.key(7)}))
  assert not np.allclose(d1, d3) and not np.allclose(d1, det)
  ref = nn.MultiHeadDotProductAttention(num_heads=2).apply(p, x)
  np.testing.assert_allclose(det, ref, atol=2e-6)


def test_bad_head_count_error_names_fields():
  with pytest.raises(ValueError, match="qkv_features=30 is not divisible by num_heads=4"):
    MultiHeadAttention(num_heads=4, qkv_features=30).init(jax.random.key(0), x_of(1, 3, 8))


def test_transforms_jit_grad_vmap_scan_remat():
  x = x_of(3, 2, 6, 16)

  class Layer(nn.Module):
    @nn.compact
    def __call__(self, c, _):
      # remat traces call arguments, so causality goes in as a mask array here.
      mask = nn.make_causal_mask(jnp.ones(c.shape[:-1]), dtype=bool)
      return c + nn.remat(MultiHeadAttention)(num_heads=2)(c, mask=mask), None

  Scanned = nn.scan(Layer, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
  model = Scanned()
  params = model.init(jax.random.key(0), x[0], None)
  (mha_params,) = params["params"].values()     # one (rematted) attention per layer
  assert mha_params["query"]["kernel"].shape == (3, 16, 2, 8)
  f = jax.jit(jax.vmap(lambda xi: model.apply(params, xi, None)[0]))
  eager = jnp.stack([model.apply(params, xi, None)[0] for xi in x])
  np.testing.assert_allclose(f(x), eager, atol=2e-5)
  g = jax.grad(lambda p: jnp.sum(model.apply(p, x[0], None)[0] ** 2))(params)
  assert all(np.all(np.isfinite(l)) for l in jax.tree.leaves(g))


def test_works_inside_nnx_module_through_bridge():
  class Block(nnx.Module):
    def __init__(self, rngs):
      self.attn = nnx.bridge.ToNNX(MultiHeadAttention(num_heads=2), rngs=rngs)
      self.proj = nnx.Linear(16, 4, rngs=rngs)

    def __call__(self, x):
      return self.proj(self.attn(x, is_causal=True))

  x = x_of(2, 5, 16)
  block = Block(nnx.Rngs(0))
  nnx.bridge.lazy_init(block.attn, x, is_causal=True)
  y = block(x)
  assert y.shape == (2, 5, 4)
  params = jax.tree.map(lambda v: v.value if hasattr(v, "value") else v,
                        nnx.to_pure_dict(nnx.state(block.attn, nnx.Param)))
  ref = MultiHeadAttention(num_heads=2).apply({"params": params}, x, is_causal=True)
  np.testing.assert_allclose(block.attn(x, is_causal=True), ref, atol=1e-6)
  grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(block)
  assert all(np.all(np.isfinite(l)) for l in jax.tree.leaves(grads))
