"""Bad arguments fail with a one-line error naming the argument; valid ones keep their values."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention import MultiHeadAttention, dot_product_attention, dot_product_attention_weights
from attention import chunked as _chunked
from attention.dropout import Dropout, dropout, keep_mask
from tests import reference

BACKENDS = ["xla", "chunked", None]
B, T, H, D = 4, 8, 2, 8  # batch == q_len, so a [B, T] mask is misread as [q_len, kv_len]


def qkv(seed=0):
  rng = np.random.default_rng(seed)
  return tuple(rng.normal(size=(B, T, H, D)).astype(np.float32) for _ in range(3))


def padding():
  valid = np.ones((B, T), bool)
  valid[:, 5:] = False
  valid[0, 3:] = False
  return valid


@pytest.mark.parametrize("impl", BACKENDS)
@pytest.mark.parametrize("name,shape", [
    ("mask", (B, T)),           # padding mask without its head/query axes
    ("mask", (5, 5)),
    ("mask", (2, B, 1, 1, T)),  # more dims than query: "xla" returned a rank-5 output
    ("bias", (5, 5)),
    ("bias", (B, 3, T, T)),     # head axis neither 1 nor heads
])
def test_mask_and_bias_shapes_checked_for_every_backend(impl, name, shape):
  q, k, v = qkv()
  x = np.ones(shape, bool if name == "mask" else np.float32)
  with pytest.raises(ValueError, match=rf"^{name} of shape \({shape[0]}, .*\[batch, "):
    dot_product_attention(q, k, v, implementation=impl, **{name: x})


def test_direct_entries_check_mask_shape():
  q, k, v = qkv()
  with pytest.raises(ValueError, match=r"mask of shape \(4, 8\) does not broadcast .*make_attention_mask"):
    _chunked.attention(q, k, v, mask=jnp.asarray(padding()))
  with pytest.raises(ValueError, match=r"bias of shape \(5, 5\)"):
    dot_product_attention_weights(jnp.asarray(q), jnp.asarray(k), bias=jnp.ones((5, 5)))


@pytest.mark.parametrize("impl", BACKENDS)
def test_valid_masks_in_every_form_give_the_padding_result(impl):
  """[B, 1, 1, T] as bool, flax float 0/1, numpy and nested list: all the same values."""
  q, k, v = qkv(1)
  valid = padding()
  ref, _ = reference.attention_forward(q, k, v, valid[:, None, None, :])
  forms = [jnp.asarray(valid)[:, None, None, :], valid[:, None, None, :],
           valid[:, None, None, :].tolist(), nn.make_attention_mask(np.ones((B, T)), valid)]
  for mask in forms:
    out = dot_product_attention(q, k, v, mask=mask, implementation=impl, block_q=4, block_kv=4)
    np.testing.assert_allclose(np.asarray(out), ref, atol=2e-5, err_msg=type(mask).__name__)
  out = _chunked.attention(q, k, v, mask=valid[:, None, None, :].tolist(), block_q=4, block_kv=4)
  np.testing.assert_allclose(np.asarray(out), ref, atol=2e-5)


@pytest.mark.parametrize("rate", [1.5, 1.0, -0.1, float("nan")])
def test_attention_dropout_rate_range(rate):
  q, k, v = qkv()
  with pytest.raises(ValueError, match=r"^dropout_rate=.* must be in \[0, 1\)"):
    dot_product_attention(q, k, v, dropout_rate=rate, dropout_rng=jax.random.key(0))
  with pytest.raises(ValueError, match=r"^dropout_rate=.* must be in \[0, 1\)"):
    MultiHeadAttention(num_heads=2, dropout_rate=rate).init(jax.random.key(0), jnp.ones((1, 4, 8)))


def test_dropout_module_and_functions_rate_range():
  x = jnp.ones((2, 8))
  with pytest.raises(ValueError, match=r"^rate=1.5 must be in \[0, 1\]"):
    dropout(x, 1.5, jax.random.key(0))
  with pytest.raises(ValueError, match=r"^rate=-0.1 must be in \[0, 1\]"):
    keep_mask(jax.random.key(0), -0.1, (2, 8))
  with pytest.raises(ValueError, match=r"^rate=-0.1"):  # even when deterministic
    Dropout(-0.1).apply({}, x, deterministic=True)
  # The valid edges keep their meaning: 1 drops everything, 0 nothing.
  np.testing.assert_array_equal(dropout(x, 1.0, jax.random.key(0)), jnp.zeros_like(x))
  np.testing.assert_array_equal(Dropout(0.0).apply({}, x, deterministic=False), x)


@pytest.mark.parametrize("impl", BACKENDS)
@pytest.mark.parametrize("field", ["block_q", "block_kv"])
def test_block_sizes_checked_for_every_backend(impl, field):
  q, k, v = qkv()
  for bad in (0, -2):
    with pytest.raises(ValueError, match=rf"^{field}={bad} must be >= 1"):
      dot_product_attention(q, k, v, implementation=impl, **{field: bad})
  with pytest.raises(TypeError, match=rf"^{field} must be an int"):
    dot_product_attention(q, k, v, implementation=impl, **{field: 2.5})
  with pytest.raises(ValueError, match=rf"^{field}=0"):
    _chunked.attention(q, k, v, **{field: 0})
  out = dot_product_attention(q, k, v, implementation=impl, **{field: np.int64(3)})
  np.testing.assert_allclose(np.asarray(out), reference.attention_forward(q, k, v)[0], atol=2e-5)


@pytest.mark.parametrize("impl", BACKENDS)
def test_is_causal_must_be_a_bool(impl):
  q, k, v = qkv()
  for bad in ("yes", 1, jnp.asarray(True)):
    with pytest.raises(TypeError, match="^is_causal must be a Python bool"):
      dot_product_attention(q, k, v, is_causal=bad, implementation=impl)
  with pytest.raises(TypeError, match="^is_causal"):
    _chunked.attention(q, k, v, is_causal="yes")
  out = dot_product_attention(q, k, v, is_causal=np.bool_(True), implementation=impl)
  ref, _ = reference.attention_forward(q, k, v, causal=True)
  np.testing.assert_allclose(np.asarray(out), ref, atol=2e-5)


@pytest.mark.parametrize("fields,match", [
    (dict(num_heads=0), "^num_heads=0 must be a positive int"),
    (dict(num_heads=-2), "^num_heads=-2 must be a positive int"),
    (dict(num_heads=2, num_kv_heads=0), "^num_kv_heads=0 must be a positive int"),
])
def test_multi_head_counts_checked(fields, match):
  with pytest.raises(ValueError, match=match):
    MultiHeadAttention(**fields).init(jax.random.key(0), jnp.ones((1, 4, 8)))


def _decode_steps(step, variables, x, n):
  cache = variables["cache"]
  for i in range(n):
    _, mut = step({"params": variables["params"], "cache": cache}, x[:, i:i + 1])
    cache = mut["cache"]
  return cache


def test_decode_past_the_cache_length_raises_when_eager():
  mod = MultiHeadAttention(num_heads=2, decode=True)
  x = jax.random.normal(jax.random.key(0), (1, 6, 8))
  variables = mod.init(jax.random.key(1), x[:, :4])  # cache of length 4
  step = lambda v, xi: mod.apply(v, xi, mutable=["cache"])
  cache = _decode_steps(step, variables, x, 4)  # filling it exactly is fine
  assert int(cache["cache_index"]) == 4
  with pytest.raises(ValueError, match=r"^decode cache is full: cache_index=4 \+ 1 new tokens > max length 4"):
    step({"params": variables["params"], "cache": cache}, x[:, 4:5])


def test_decode_under_jit_gives_nan_past_the_cache_length():
  """Under jit the index is traced (no error can be raised): an overflowing call gives NaN."""
  mod = MultiHeadAttention(num_heads=2, decode=True)
  x = jax.random.normal(jax.random.key(0), (1, 6, 8))
  variables = mod.init(jax.random.key(1), x[:, :4])
  params = variables["params"]
  step = jax.jit(lambda v, xi: mod.apply(v, xi, mutable=["cache"]))
  full = MultiHeadAttention(num_heads=2).apply({"params": params}, x[:, :4], is_causal=True)
  cache = variables["cache"]
  for i in range(6):
    y, mut = step({"params": params, "cache": cache}, x[:, i:i + 1])
    cache = mut["cache"]
    if i < 4:  # inside the cache: the full causal pass, one token at a time
      np.testing.assert_allclose(y[:, 0], full[:, i], rtol=1e-5, atol=1e-6)
    else:
      assert np.isnan(np.asarray(y)).all(), i
  assert int(cache["cache_index"]) == 6
  # A chunk that ends exactly at the end fits; one that straddles it is NaN throughout
  # (its clamped write overwrote keys that its in-range query reads too).
  y, _ = step({"params": params, "cache": _decode_steps(step, variables, x, 2)}, x[:, 2:4])
  np.testing.assert_allclose(y, full[:, 2:4], rtol=1e-5, atol=1e-6)
  y, _ = step({"params": params, "cache": _decode_steps(step, variables, x, 3)}, x[:, 3:5])
  assert np.isnan(np.asarray(y)).all()
