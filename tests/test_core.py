"""dot_product_attention: every backend against float64 numpy, masks, GQA, gradients."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention import dot_product_attention, dot_product_attention_weights
from attention import chunked as _chunked
from attention import core
from attention import dispatch
from attention.core import default_implementation
from tests import reference

BACKENDS = ["xla", "chunked", None]
TILES = dict(block_q=8, block_kv=16)  # small tiles so the tests cross many tile edges


def attend(q, k, v, impl, **kw):
  extra = TILES if impl == "chunked" else {}
  return dot_product_attention(q, k, v, implementation=impl, **extra, **kw)


def rand(rng, *shape):
  return rng.normal(size=shape).astype(np.float32)


@pytest.mark.parametrize("impl", BACKENDS)
@pytest.mark.parametrize(
    "heads,kv_heads", [(4, 4), (4, 2), (4, 1)], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("causal", [False, True])
def test_matches_float64_reference(impl, heads, kv_heads, causal):
  rng = np.random.default_rng(0)
  b, t, s, d = 2, 37, 53, 16
  q, k, v = rand(rng, b, t, heads, d), rand(rng, b, s, kv_heads, d), rand(rng, b, s, kv_heads, d)
  mask = rng.random((b, 1, t, s)) > 0.3
  bias = rand(rng, 1, heads, t, s)
  out = attend(q, k, v, impl, mask=jnp.asarray(mask), bias=jnp.asarray(bias), is_causal=causal)
  ref, _ = reference.attention_forward(q, k, v, mask, bias, causal)
  np.testing.assert_allclose(np.asarray(out), ref, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", BACKENDS)
@pytest.mark.parametrize("causal", [False, True])
def test_gradients_match_float64_reference(impl, causal):
  rng = np.random.default_rng(1)
  b, t, h, d = 2, 29, 3, 8
  q, k, v, dout = (rand(rng, b, t, h, d) for _ in range(4))
  mask = rng.random((b, 1, 1, t)) > 0.2  # key padding
  mask[:, :, :, 0] = True

  def loss(q, k, v):
    return jnp.sum(attend(q, k, v, impl, mask=jnp.asarray(mask), is_causal=causal) * dout)

  grads = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
  refs = reference.attention_backward(q, k, v, dout, mask, causal)
  for g, r in zip(grads, refs):
    np.testing.assert_allclose(np.asarray(g), r, atol=5e-5, rtol=1e-4)


@pytest.mark.parametrize("kv_heads", [2, 1], ids=["gqa", "mqa"])
def test_chunked_grouped_query_gradients_match_float64(kv_heads):
  """The tiled backend folds query groups into the tile rows. GQA/MQA gradients
  with a per-query mask match float64 (kv heads repeated, their gradients summed
  over each group), and a per-head bias gradient matches "xla"."""
  rng = np.random.default_rng(8)
  b, t, s, heads, d = 2, 21, 27, 4, 8
  groups = heads // kv_heads
  q, dout = rand(rng, b, t, heads, d), rand(rng, b, t, heads, d)
  k, v = rand(rng, b, s, kv_heads, d), rand(rng, b, s, kv_heads, d)
  mask = rng.random((b, 1, t, s)) > 0.3

  def loss(q, k, v, bias, impl):
    return jnp.sum(attend(q, k, v, impl, mask=jnp.asarray(mask), bias=bias) * dout)

  dq, dk, dv = jax.grad(loss, argnums=(0, 1, 2))(q, k, v, None, "chunked")
  kr, vr = (np.repeat(x, groups, axis=2) for x in (k, v))
  rq, rk, rv = reference.attention_backward(q, kr, vr, dout, mask)
  fold = lambda x: x.reshape(b, s, kv_heads, groups, d).sum(axis=3)
  for g, r in ((dq, rq), (dk, fold(rk)), (dv, fold(rv))):
    np.testing.assert_allclose(np.asarray(g), r, atol=5e-5, rtol=1e-4)
  bias = jnp.asarray(rand(rng, 1, heads, t, s))
  got, want = (jax.grad(loss, argnums=3)(q, k, v, bias, impl) for impl in ("chunked", "xla"))
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=1e-4)


def test_chunked_bias_gradient_matches_xla():
  rng = np.random.default_rng(2)
  q, k, v = (rand(rng, 2, 20, 2, 8) for _ in range(3))
  for bias_shape in [(1, 2, 20, 20), (2, 1, 1, 20), (20, 20)]:
    bias = jnp.asarray(rand(rng, *bias_shape))
    grads = [
        jax.grad(lambda bb: jnp.sum(attend(q, k, v, impl, bias=bb, is_causal=True) ** 2))(bias)
        for impl in ("xla", "chunked")
    ]
    np.testing.assert_allclose(grads[1], grads[0], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("impl", BACKENDS)
def test_mask_broadcast_shapes(impl):
  rng = np.random.default_rng(3)
  b1, b2, t, h, d = 2, 3, 11, 2, 8
  q, k, v = (rand(rng, b1, b2, t, h, d) for _ in range(3))
  for shape in [(t, t), (1, t), (b2, 1, 1, t), (b1, b2, h, t, t), (b1, 1, 1, 1, t)]:
    mask = rng.random(shape) > 0.3
    out = attend(q, k, v, impl, mask=jnp.asarray(mask))
    ref, _ = reference.attention_forward(q, k, v, mask)
    np.testing.assert_allclose(np.asarray(out), ref, atol=2e-5, rtol=1e-5, err_msg=str(shape))


@pytest.mark.parametrize("impl", BACKENDS)
def test_padding_on_both_sides_and_fully_masked_rows(impl):
  """Left+right padding; padded queries have no valid key: zeros, finite grads."""
  rng = np.random.default_rng(4)
  b, t, h, d = 2, 12, 2, 8
  q, k, v = (rand(rng, b, t, h, d) for _ in range(3))
  valid = np.zeros((b, t), bool)
  valid[0, 2:9] = True     # padding on both sides
  valid[1, :] = False      # an all-padding example
  mask = nn.make_attention_mask(valid, valid, dtype=bool)
  out = attend(q, k, v, impl, mask=mask)
  ref, _ = reference.attention_forward(q, k, v, np.asarray(mask))
  np.testing.assert_allclose(np.asarray(out), ref, atol=2e-5)
  assert np.all(np.asarray(out)[1] == 0) and np.all(np.asarray(out)[0, :2] == 0)
  grads = jax.grad(lambda q, k, v: jnp.sum(attend(q, k, v, impl, mask=mask) ** 2),
                   argnums=(0, 1, 2))(q, k, v)
  for g in grads:
    assert np.all(np.isfinite(np.asarray(g)))
  assert np.all(np.asarray(grads[0])[1] == 0)


@pytest.mark.parametrize("impl", BACKENDS)
def test_float_masks_from_flax_helpers(impl):
  rng = np.random.default_rng(5)
  q, k, v = (rand(rng, 2, 10, 2, 8) for _ in range(3))
  float_mask = nn.make_causal_mask(jnp.ones((2, 10)))  # float32 0/1, as flax returns
  out = attend(q, k, v, impl, mask=float_mask)
  ref, _ = reference.attention_forward(q, k, v, causal=True)
  np.testing.assert_allclose(np.asarray(out), ref, atol=2e-5)


def test_future_blocks_are_skipped():
  """Skipped tiles are never read: NaN values there cannot leak into the output.

  A non-skipping kernel computes 0 * NaN = NaN for masked keys, so finiteness
  of the first query block proves the future key blocks were not touched.
  """
  rng = np.random.default_rng(6)
  t, bq = 64, 16
  q, k, v = (rand(rng, 1, t, 1, 8) for _ in range(3))
  v[:, bq:] = np.nan
  k[:, bq:] = np.nan
  kw = dict(block_q=bq, block_kv=bq)
  causal_out = dot_product_attention(q, k, v, is_causal=True, implementation="chunked", **kw)
  mask_out = dot_product_attention(q, k, v, mask=nn.make_causal_mask(jnp.ones((1, t)), dtype=bool),
                                   implementation="chunked", **kw)
  ref, _ = reference.attention_forward(q[:, :bq], k[:, :bq], v[:, :bq], causal=True)
  for out in (causal_out, mask_out):
    np.testing.assert_allclose(np.asarray(out)[:, :bq], ref, atol=2e-5)


@pytest.mark.parametrize("impl", BACKENDS)
def test_bf16_inputs_softmax_in_fp32(impl):
  rng = np.random.default_rng(7)
  q, k, v = (rand(rng, 2, 24, 2, 16) * 4 for _ in range(3))
  qb, kb, vb = (jnp.asarray(x, jnp.bfloat16) for x in (q, k, v))
  out = attend(qb, kb, vb, impl, is_causal=True)
  assert out.dtype == jnp.bfloat16
  ref, _ = reference.attention_forward(np.asarray(qb.astype(jnp.float32)),
                                       np.asarray(kb.astype(jnp.float32)),
                                       np.asarray(vb.astype(jnp.float32)), causal=True)
  np.testing.assert_allclose(np.asarray(out.astype(jnp.float32)), ref, atol=0.06, rtol=0.02)
  w = dot_product_attention_weights(qb, kb, is_causal=True)
  assert w.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(w).sum(-1), 1.0, atol=1e-6)


def test_chunked_handles_32k_tokens():
  """T=32768 self-attention forward+backward runs; sampled rows match float64."""
  rng = np.random.default_rng(8)
  t, d = 32768, 16
  q, k, v = (jnp.asarray(rand(rng, 1, t, 1, d)) for _ in range(3))
  f = jax.jit(jax.value_and_grad(
      lambda q, k, v: jnp.sum(dot_product_attention(q, k, v, is_causal=True, implementation="chunked",
                                                    block_q=1024, block_kv=1024)[..., 0]),
      argnums=(0, 1, 2)))
  (val, grads) = f(q, k, v)
  out = dot_product_attention(q, k, v, is_causal=True, implementation="chunked", block_q=1024, block_kv=1024)
  assert np.isfinite(float(val)) and all(np.all(np.isfinite(np.asarray(g))) for g in grads)
  qn, kn, vn = (np.asarray(x, np.float64)[0, :, 0] for x in (q, k, v))
  for row in (0, 1000, 20000, t - 1):
    s = kn[: row + 1] @ qn[row] / np.sqrt(d)
    p = np.exp(s - s.max())
    np.testing.assert_allclose(np.asarray(out)[0, row, 0], (p / p.sum()) @ vn[: row + 1], atol=2e-5)


def test_dropout_only_in_xla_and_reproducible():
  rng = np.random.default_rng(9)
  q, k, v = (rand(rng, 2, 8, 2, 4) for _ in range(3))
  key = jax.random.key(0)
  a = dot_product_attention(q, k, v, dropout_rate=0.5, dropout_rng=key)
  b = dot_product_attention(q, k, v, dropout_rate=0.5, dropout_rng=key)
  c = dot_product_attention(q, k, v, dropout_rate=0.5, deterministic=True)
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, c)
  np.testing.assert_allclose(c, reference.attention_forward(q, k, v)[0], atol=2e-5)
  with pytest.raises(ValueError, match="supported by implementation=.xla. and .cpu_flash."):
    dot_product_attention(q, k, v, dropout_rate=0.5, dropout_rng=key, implementation="chunked")


def test_errors_are_clear():
  q = jnp.zeros((1, 4, 3, 8))
  with pytest.raises(ValueError, match="multiple of kv heads"):
    dot_product_attention(q, jnp.zeros((1, 4, 2, 8)), jnp.zeros((1, 4, 2, 8)))
  with pytest.raises(ValueError, match="unknown"):
    dot_product_attention(q, q, q, implementation="flash")
  if jax.default_backend() != "gpu":
    with pytest.raises(ValueError, match="needs a GPU"):
      dot_product_attention(q, q, q, implementation="cudnn")


@pytest.mark.parametrize("huge", [True, False])
def test_auto_picks_by_platform_and_size(monkeypatch, without_cpu_flash, huge):
  monkeypatch.setattr(dispatch._huge_pages, "active", lambda: huge)
  small, big = jnp.zeros((1, 64, 2, 8)), jnp.zeros((1, 4096, 2, 8))
  assert default_implementation(small, small) == "xla"
  assert default_implementation(big, big, dropout=True) == "xla"
  if jax.default_backend() == "cpu":
    # up to _XLA_MAX_BYTES of logits (here 1 * 2 heads * 4096^2 * 4 B = 128 MiB)
    # without a mask: "xla" with huge pages (tile cost 1.2), tiles with 4 KiB
    # pages (0.9); is_causal: "xla"'s row blocks either way
    assert default_implementation(big, big) == ("xla" if huge else "chunked")
    assert default_implementation(big, big, is_causal=True) == "xla"
    pad = jnp.ones((4096,), bool)
    assert default_implementation(big, big, mask=pad) == core.BY_MASK
    assert default_implementation(big, big, is_causal=True, mask=pad) == core.BY_MASK
    huge = jnp.zeros((4, 4096, 8, 8))  # 2 GiB of logits: tiled, for memory
    for kw in ({}, {"is_causal": True}, {"mask": pad}):
      assert default_implementation(huge, huge, **kw) == "chunked"


def _np_tile_fraction(allowed, bq, bk):
  t, s = allowed.shape
  tiles = [[allowed[i:i + bq, j:j + bk].any() for j in range(0, s, bk)]
           for i in range(0, t, bq)]
  return float(np.mean(tiles))


@pytest.mark.parametrize("causal", [False, True])
def test_occupied_tile_fraction_matches_numpy(causal):
  from attention.chunked import occupied_tile_fraction
  rng = np.random.default_rng(3)
  t, s = 40, 56  # ragged last tiles
  q, k = jnp.zeros((3, t, 2, 4)), jnp.zeros((3, s, 2, 4))
  lengths = np.array([9, 17, 30])
  valid_k = np.arange(s)[None] < lengths[:, None]
  valid_q = np.arange(t)[None] < lengths[:, None]
  masks = {
      "key padding [B,1,1,S]": valid_k[:, None, None, :],
      "query+key padding [B,1,T,S]": (valid_q[:, :, None] & valid_k[:, None, :])[:, None],
      "random [B,H,T,S]": rng.random((3, 2, t, s)) > 0.97,
      "1-D [S]": valid_k[0],
  }
  for name, m in masks.items():
    allowed = np.broadcast_to(m, (3, 2, t, s)).any(axis=(0, 1))
    if causal:
      allowed = allowed & np.tril(np.ones((t, s), bool))
    got = float(occupied_tile_fraction(q, k, jnp.asarray(m), is_causal=causal,
                                       block_q=16, block_kv=8))
    assert got == pytest.approx(_np_tile_fraction(allowed, 16, 8)), name


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="CPU dispatch rule")
def test_auto_with_mask_array_picks_backend_from_empty_tiles(monkeypatch, without_cpu_flash):
  """At >= 512 tokens a mask array picks "chunked" or "xla" at run time; both
  paths give the float64 reference, values and gradients."""
  # Huge pages' tile cost (1.2): with 4 KiB pages (0.9) a tile costs less than
  # "xla"'s share even when none is empty, and "chunked" always wins.
  monkeypatch.setattr(dispatch._huge_pages, "active", lambda: True)
  rng = np.random.default_rng(4)
  b, t, h, d = 1, 512, 32, 8  # default tiles 512 x 256: a 1 x 2 grid
  q, k, v, dout = (rand(rng, b, t, h, d) for _ in range(4))
  half = np.arange(t) < t // 2                          # 1 of the 2 tiles empty
  full = np.ones(t, bool)
  full[-3:] = False                                     # no tile empty
  for valid, chunked in ((half, True), (full, False)):
    mask = (valid[:, None] & valid[None, :])[None, None]
    prefers = dispatch._prefers_chunked(jnp.asarray(q), jnp.asarray(k), jnp.asarray(mask))
    assert bool(prefers) is chunked
    assert "cond" in str(jax.make_jaxpr(
        lambda q: dot_product_attention(q, k, v, mask=jnp.asarray(mask)))(q))

    def loss(q, k, v):
      return jnp.sum(dot_product_attention(q, k, v, mask=jnp.asarray(mask)) * dout)

    out = jax.jit(lambda q, k, v: dot_product_attention(q, k, v, mask=jnp.asarray(mask)))(q, k, v)
    ref, _ = reference.attention_forward(q, k, v, mask)  # padded rows: zeros
    np.testing.assert_allclose(np.asarray(out), ref, atol=2e-5, rtol=1e-5)
    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
    for g, r in zip(grads, reference.attention_backward(q, k, v, dout, mask)):
      np.testing.assert_allclose(np.asarray(g), r, atol=5e-5, rtol=1e-4)


@pytest.mark.parametrize("huge", [False, True])
def test_auto_tile_cost_follows_huge_pages(monkeypatch, huge):
  """7 of 8 tiles occupied: 0.875 x 0.9 + 0.35 and 0.875 x 1.2 + 0.1 both exceed 1,
  "xla"; 5 of 8: 0.91 and 0.85, "chunked". The zero-residual term decides the
  first case with 4 KiB pages, and it follows the page mode."""
  monkeypatch.setattr(dispatch._huge_pages, "active", lambda: huge)
  q = k = jnp.zeros((1, 1024, 32, 8))                  # default tiles 512 x 256
  allowed = np.ones((1024, 1024), bool)
  allowed[512:, 768:] = False                           # 1 of the 2 x 4 tiles empty
  mask = jnp.asarray(allowed[None, None])
  assert float(_chunked.occupied_tile_fraction(q, k, mask)) == 0.875
  assert not bool(dispatch._prefers_chunked(q, k, mask))
  monkeypatch.setattr(dispatch, "_SWITCH_ZEROS_COST", 0.0)
  monkeypatch.setattr(dispatch, "_SWITCH_ZEROS_COST_HUGE_PAGES", 0.0)
  assert bool(dispatch._prefers_chunked(q, k, mask)) is (not huge)
  monkeypatch.undo()
  monkeypatch.setattr(dispatch._huge_pages, "active", lambda: huge)
  allowed[:512, 768:] = False
  allowed[512:, 512:] = False                           # 3 of 8 tiles empty
  mask = jnp.asarray(allowed[None, None])
  assert float(_chunked.occupied_tile_fraction(q, k, mask)) == 0.625
  assert bool(dispatch._prefers_chunked(q, k, mask))


def test_usable_as_flax_attention_fn():
  """Works as attention_fn of flax's own module and matches flax's default."""
  x = jax.random.normal(jax.random.key(0), (2, 7, 16))
  mask = nn.make_causal_mask(jnp.ones((2, 7)))
  ours = nn.MultiHeadDotProductAttention(num_heads=2, attention_fn=dot_product_attention)
  theirs = nn.MultiHeadDotProductAttention(num_heads=2)
  params = theirs.init(jax.random.key(1), x)
  np.testing.assert_allclose(ours.apply(params, x, mask=mask), theirs.apply(params, x, mask=mask),
                             atol=1e-6)


@pytest.mark.parametrize("impl", BACKENDS)
def test_under_vmap_jit_and_grad(impl):
  rng = np.random.default_rng(10)
  q, k, v = (rand(rng, 3, 2, 9, 2, 4) for _ in range(3))  # leading axis vmapped
  f = jax.jit(jax.vmap(lambda q, k, v: attend(q, k, v, impl, is_causal=True)))
  ref, _ = reference.attention_forward(q, k, v, causal=True)
  np.testing.assert_allclose(np.asarray(f(q, k, v)), ref, atol=2e-5)
  g = jax.grad(lambda q: jnp.sum(f(q, k, v)))(q)
  assert np.all(np.isfinite(np.asarray(g)))


def test_causal_row_blocks_cover_the_causal_pattern(monkeypatch):
  monkeypatch.setattr(dispatch, "_CAUSAL_ROW_BLOCK", 4)
  assert core.causal_row_blocks(10, 10) == [(0, 4, 4), (4, 8, 8), (8, 10, 10)]
  assert core.causal_row_blocks(9, 6) == [(0, 4, 4), (4, 8, 6), (8, 9, 6)]
  assert core.causal_row_blocks(8, 30) == [(0, 4, 4), (4, 8, 8)]
  assert core.causal_row_blocks(7, 7) == [(0, 7, 7)]  # under two blocks: one product
  assert len(core.causal_row_blocks(100, 100)) == 8  # capped: 13-row blocks
  monkeypatch.undo()
  if jax.default_backend() == "cpu":
    assert len(core.causal_row_blocks(256, 256)) == 4
    assert len(core.causal_row_blocks(4096, 4096)) == 8
  else:
    assert core.causal_row_blocks(256, 256) == [(0, 256, 256)]


@pytest.mark.parametrize("t,s", [(10, 10), (10, 13), (13, 10)])
def test_causal_row_blocks_match_float64_reference(monkeypatch, t, s):
  """The "xla" backend's causal row blocks (block 4 here) against float64 numpy:
  outputs with a mask, a bias and GQA, and gradients with key padding."""
  if jax.default_backend() != "cpu":
    pytest.skip("row blocks are a CPU path")
  monkeypatch.setattr(dispatch, "_CAUSAL_ROW_BLOCK", 4)
  assert len(core.causal_row_blocks(t, s)) > 1
  rng = np.random.default_rng(11)
  b, h, kvh, d = 2, 4, 2, 8
  q, k, v = rand(rng, b, t, h, d), rand(rng, b, s, kvh, d), rand(rng, b, s, kvh, d)
  mask = rng.random((b, 1, t, s)) > 0.3
  bias = rand(rng, 1, h, t, s)
  out = dot_product_attention(q, k, v, mask=jnp.asarray(mask), bias=jnp.asarray(bias),
                              is_causal=True, implementation="xla")
  ref, _ = reference.attention_forward(q, k, v, mask, bias, causal=True)
  np.testing.assert_allclose(np.asarray(out), ref, atol=2e-5, rtol=1e-5)

  k, v = k.repeat(2, axis=2), v.repeat(2, axis=2)
  dout = rand(rng, b, t, h, d)
  pad = rng.random((b, 1, 1, s)) > 0.2
  pad[:, :, :, 0] = True
  grads = jax.grad(lambda q, k, v: jnp.sum(dot_product_attention(
      q, k, v, mask=jnp.asarray(pad), is_causal=True, implementation="xla") * dout),
      argnums=(0, 1, 2))(q, k, v)
  for g, r in zip(grads, reference.attention_backward(q, k, v, dout, pad, causal=True)):
    np.testing.assert_allclose(np.asarray(g), r, atol=5e-5, rtol=1e-4)


@pytest.mark.parametrize("broadcast", [False, True])
def test_causal_row_blocks_keep_the_dropout_pattern(monkeypatch, broadcast):
  rng = np.random.default_rng(12)
  q, k, v = (rand(rng, 2, 11, 2, 4) for _ in range(3))
  kw = dict(is_causal=True, dropout_rate=0.4, dropout_rng=jax.random.key(5),
            broadcast_dropout=broadcast, implementation="xla")
  whole = dot_product_attention(q, k, v, **kw)
  monkeypatch.setattr(dispatch, "_CAUSAL_ROW_BLOCK", 3)
  if jax.default_backend() == "cpu":
    assert len(core.causal_row_blocks(11, 11)) == 4
  np.testing.assert_allclose(np.asarray(dot_product_attention(q, k, v, **kw)), np.asarray(whole),
                             atol=1e-6)
  assert not np.allclose(whole, dot_product_attention(q, k, v, is_causal=True, implementation="xla"))


def test_mask_within_causal_matches_numpy():
  from attention.core import mask_within_causal
  rng = np.random.default_rng(5)
  t, s = 12, 12
  tril = np.tril(np.ones((t, s), bool))
  valid = np.arange(s) < 9
  one_future = tril.copy()
  one_future[3, 7] = True
  masks = {
      "make_causal_mask [B,1,T,T]": (nn.make_causal_mask(jnp.ones((2, t)), dtype=bool), True),
      "causal & padding": (tril[None, None] & valid[None, None, None, :], True),
      "strictly below the diagonal": (np.tril(np.ones((t, s), bool), -1), True),
      "one future key": (one_future[None, None], False),
      "key padding [B,1,1,S]": (valid[None, None, None, :], False),
      "random": (rng.random((2, 3, t, s)) > 0.5, False),
  }
  for name, (m, want) in masks.items():
    got = bool(jax.jit(mask_within_causal, static_argnums=(1, 2))(jnp.asarray(m), t, s))
    assert got == (not np.any(np.broadcast_to(m, (2, 3, t, s)) & ~tril)), name
    assert got is want, name


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="CPU dispatch rule")
@pytest.mark.parametrize("t", [256, 512])
def test_auto_with_causal_mask_array_matches_reference(without_cpu_flash, t):
  """A mask array with a query axis is checked at run time: within the causal
  pattern it runs the causal row blocks, otherwise the full product (and from
  512 tokens possibly the tiled backend). Values and gradients match float64
  either way, including a mask with a single future key allowed."""
  rng = np.random.default_rng(6)
  b, h, d = 1, 2, 8
  q, k, v, dout = (rand(rng, b, t, h, d) for _ in range(4))
  tril = np.tril(np.ones((t, t), bool))
  valid = np.arange(t) < t - 5
  one_future = tril.copy()
  one_future[t // 2, t - 1] = True
  assert default_implementation(q, k, mask=jnp.asarray(tril[None, None])) == core.BY_MASK
  pad = jnp.asarray(valid[None, None, None, :])
  if t < dispatch._CHUNKED_MIN_LEN:  # a key-padding mask can never be causal
    assert default_implementation(q, k, mask=pad) == "xla"
  for m in (tril & valid[None, :] & valid[:, None], one_future):
    mask = jnp.asarray(m[None, None])
    assert "cond" in str(jax.make_jaxpr(
        lambda q: dot_product_attention(q, k, v, mask=mask))(q))
    out = jax.jit(lambda q, k, v: dot_product_attention(q, k, v, mask=mask))(q, k, v)
    ref, _ = reference.attention_forward(q, k, v, m[None, None])
    np.testing.assert_allclose(np.asarray(out), ref, atol=2e-5, rtol=1e-5)

    def loss(q, k, v):
      return jnp.sum(dot_product_attention(q, k, v, mask=mask) * dout)

    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
    for g, r in zip(grads, reference.attention_backward(q, k, v, dout, m[None, None])):
      np.testing.assert_allclose(np.asarray(g), r, atol=5e-5, rtol=1e-4)
