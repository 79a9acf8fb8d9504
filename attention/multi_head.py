"""``MultiHeadAttention``: a drop-in for ``flax.linen.MultiHeadDotProductAttention``.

Same fields, same call signature and the same parameter tree for the same
fields, so checkpoints move both ways. On top of flax's module it adds:

* ``num_kv_heads`` for grouped-query / multi-query attention;
* ``implementation``, passed to :func:`attention.dot_product_attention`;
* ``rotary`` position embeddings, with positions that follow the KV cache;
* ``sow_weights`` with every backend: the weights are recomputed on demand
  only when asked, so fused/tiled backends stay fused otherwise;
* a KV cache that takes a prefill of any length, then one or more tokens per
  call; each query attends the cache up to and including its own position;
* ``is_causal`` as a call argument (no mask array);
* fused projections: self-attention computes query/key/value with one matmul
  and cross-attention key/value with one (the parameters stay three separate
  ``DenseGeneral`` trees, concatenated at call time), unless a custom
  ``qkv_dot_general`` is given;
* projections without a custom ``dot_general`` use
  :func:`attention.projection.projection_dot_general`, whose weight gradient
  runs on XLA:CPU's fast matmul path (same values; plain ``lax.dot_general``
  on other backends).
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.linen import initializers
from flax.linen.dtypes import promote_dtype
from flax.linen.module import merge_param

from attention import dropout as _dropout
from attention.core import dot_product_attention, dot_product_attention_weights
from attention.masks import as_bool_mask
from attention.positional import apply_rotary
from attention.projection import projection_dot_general

Array = jax.Array


class _ProjectionParams(nn.Module):
  """The ``kernel``/``bias`` of ``nn.DenseGeneral(features, axis=-1)``, created but not applied.

  Mirrors flax's parameter creation exactly (initialisers called on the
  flattened ``[in, prod(features)]`` shape, then reshaped), so a fused
  projection has the parameters and initial values of separate layers.
  """

  features: tuple[int, ...]
  kernel_init: Callable
  bias_init: Callable
  use_bias: bool
  param_dtype: Any

  @nn.compact
  def __call__(self, in_features: int) -> tuple[Array, Array | None]:
    out = int(np.prod(self.features))
    kernel = self.param(
        "kernel", lambda rng, shape, dtype: jnp.reshape(
            self.kernel_init(rng, (in_features, out), dtype), shape),
        (in_features,) + tuple(self.features), self.param_dtype)
    bias = None
    if self.use_bias:
      bias = self.param(
          "bias", lambda rng, shape, dtype: jnp.reshape(self.bias_init(rng, (out,), dtype), shape),
          tuple(self.features), self.param_dtype)
    return kernel, bias


class MultiHeadAttention(nn.Module):
  """Multi-head dot-product attention (Vaswani et al. 2017).

  Attributes:
    num_heads: number of query heads (>= 1).
    dtype: computation dtype (default: inferred from inputs and params).
    param_dtype: parameter dtype.
    qkv_features: total q/k/v width (default: input features); divisible by
      ``num_heads``.
    out_features: output width (default: ``inputs_q`` features).
    broadcast_dropout: share the attention dropout pattern over batch and heads.
    dropout_rate: attention dropout, in ``[0, 1)``.
    deterministic: default for the call's ``deterministic``.
    precision: matmul precision.
    kernel_init: initialiser of the q/k/v kernels.
    out_kernel_init: initialiser of the output kernel (default ``kernel_init``).
    bias_init: initialiser of the q/k/v biases.
    out_bias_init: initialiser of the output bias (default ``bias_init``).
    use_bias: whether the projections have biases.
    attention_fn: the attention core; defaults to this library's
      :func:`attention.dot_product_attention` (any flax-style function works).
    decode: autoregressive decoding with a KV cache in the ``cache``
      collection, its length fixed by the init input. Writing past that length
      raises in eager ``apply`` only; under ``jax.jit`` the last slots are
      silently overwritten, so check ``cache_index`` between jitted steps.
    normalize_qk: LayerNorm on queries and keys (ViT-22B).
    force_fp32_for_softmax: kept for compatibility; the default core always
      runs its softmax in float32.
    qkv_dot_general, out_dot_general, qkv_dot_general_cls, out_dot_general_cls,
      qk_attn_weights_einsum_cls, attn_weights_value_einsum_cls: as in flax.
    num_kv_heads: key/value heads (default ``num_heads``); must divide it.
    implementation: backend of the default core (``"xla"``, ``"chunked"``,
      ``"cudnn"``, ``"cpu_flash"``, or None for automatic).
    rotary: apply rotary position embeddings to queries and keys.
    rotary_max_timescale: RoPE frequency base.
  """

  num_heads: int
  dtype: Any = None
  param_dtype: Any = jnp.float32
  qkv_features: int | None = None
  out_features: int | None = None
  broadcast_dropout: bool = True
  dropout_rate: float = 0.0
  deterministic: bool | None = None
  precision: Any = None
  kernel_init: Callable = nn.linear.default_kernel_init
  out_kernel_init: Callable | None = None
  bias_init: Callable = initializers.zeros_init()
  out_bias_init: Callable | None = None
  use_bias: bool = True
  attention_fn: Callable[..., Array] = dot_product_attention
  decode: bool = False
  normalize_qk: bool = False
  force_fp32_for_softmax: bool = False
  qkv_dot_general: Any = None
  out_dot_general: Any = None
  qkv_dot_general_cls: Any = None
  out_dot_general_cls: Any = None
  qk_attn_weights_einsum_cls: Any = None
  attn_weights_value_einsum_cls: Any = None
  # Extras beyond flax.
  num_kv_heads: int | None = None
  implementation: str | None = None
  rotary: bool = False
  rotary_max_timescale: float = 10000.0

  @nn.compact
  def __call__(
      self,
      inputs_q: Array,
      inputs_k: Array | None = None,
      inputs_v: Array | None = None,
      *,
      inputs_kv: Array | None = None,
      mask: Array | None = None,
      deterministic: bool | None = None,
      dropout_rng: Array | None = None,
      sow_weights: bool = False,
      is_causal: bool = False,
      positions: Array | None = None,
      kv_positions: Array | None = None,
  ) -> Array:
    """Applies multi-head attention.

    Args:
      inputs_q: ``[batch..., q_len, features]``.
      inputs_k: ``[batch..., kv_len, features]``; defaults to ``inputs_q``.
      inputs_v: ``[batch..., kv_len, features]``; defaults to ``inputs_k``.
      inputs_kv: deprecated flax spelling of ``inputs_k = inputs_v``.
      mask: boolean (or flax's float 0/1) mask broadcastable to
        ``[batch..., num_heads, q_len, kv_len]``; True = attend. With
        ``decode`` the key axis is the cache length.
      deterministic: disables dropout.
      dropout_rng: explicit dropout key (else ``make_rng('dropout')``).
      sow_weights: store the ``[batch..., heads, q_len, kv_len]`` weights
        in ``intermediates/attention_weights``.
      is_causal: causal self-attention without a mask array.
      positions: ``[batch..., q_len]`` absolute query positions for
        ``rotary`` (default ``0..q_len-1``, shifted by the cache index when
        decoding).
      kv_positions: key positions for ``rotary`` (default: ``positions`` for
        self-attention, else ``0..kv_len-1``).

    Returns:
      ``[batch..., q_len, out_features]``.
    """
    if inputs_kv is not None:
      if inputs_k is not None or inputs_v is not None:
        raise ValueError("pass either inputs_kv or inputs_k/inputs_v, not both.")
      inputs_k = inputs_v = inputs_kv
    self_attention = inputs_k is None
    if inputs_k is None:
      if inputs_v is not None:
        raise ValueError("inputs_k cannot be None when inputs_v is given.")
      inputs_k = inputs_q
    if inputs_v is None:
      inputs_v = inputs_k

    self._check_fields()
    features = self.out_features or inputs_q.shape[-1]
    qkv_features = self.qkv_features or inputs_q.shape[-1]
    if qkv_features % self.num_heads:
      raise ValueError(
          f"qkv_features={qkv_features} is not divisible by num_heads="
          f"{self.num_heads}; pick num_heads that divides it."
      )
    kv_heads = self.num_kv_heads or self.num_heads
    if self.num_heads % kv_heads:
      raise ValueError(
          f"num_kv_heads={kv_heads} must divide num_heads={self.num_heads}."
      )
    head_dim = qkv_features // self.num_heads

    q_feats, kv_feats = (self.num_heads, head_dim), (kv_heads, head_dim)
    fuse = self.qkv_dot_general is None and self.qkv_dot_general_cls is None
    if fuse and inputs_k is inputs_q and inputs_v is inputs_q:
      # Self-attention: one [in, q + 2 kv] matmul instead of three (same params).
      query, key, value = self._fused_projection(
          inputs_q, (("query", q_feats), ("key", kv_feats), ("value", kv_feats)))
    else:
      dense = functools.partial(
          nn.DenseGeneral, axis=-1, dtype=self.dtype, param_dtype=self.param_dtype,
          kernel_init=self.kernel_init, bias_init=self.bias_init,
          use_bias=self.use_bias, precision=self.precision,
          dot_general=self.qkv_dot_general or projection_dot_general,
          dot_general_cls=self.qkv_dot_general_cls,
      )
      query = dense(features=q_feats, name="query")(inputs_q)
      if fuse and inputs_v is inputs_k:
        # Cross-attention over one memory: keys and values in one matmul.
        key, value = self._fused_projection(
            inputs_k, (("key", kv_feats), ("value", kv_feats)))
      else:
        key = dense(features=kv_feats, name="key")(inputs_k)
        value = dense(features=kv_feats, name="value")(inputs_v)

    if self.normalize_qk:
      ln = functools.partial(nn.LayerNorm, use_bias=False, dtype=self.dtype,
                             param_dtype=self.param_dtype)
      query = ln(name="query_ln")(query)
      key = ln(name="key_ln")(key)

    offset = jnp.zeros((), jnp.int32)
    if self.decode and self.has_variable("cache", "cache_index"):
      offset = self.get_variable("cache", "cache_index")
    if self.rotary:
      if positions is None:
        positions = offset + jnp.arange(query.shape[-3], dtype=jnp.int32)
      if kv_positions is None:
        kv_positions = (positions if self_attention or self.decode
                        else jnp.arange(key.shape[-3], dtype=jnp.int32))
      # Keys are rotated before they enter the cache, so each is rotated once.
      query = apply_rotary(query, positions, max_timescale=self.rotary_max_timescale)
      key = apply_rotary(key, kv_positions, max_timescale=self.rotary_max_timescale)
    overflow = None
    if self.decode:
      key, value, mask, overflow = self._update_cache(key, value, mask)
      is_causal = False  # the cache mask already encodes causality

    if self.dropout_rate > 0.0:
      m_deterministic = merge_param("deterministic", self.deterministic, deterministic)
      if not m_deterministic and dropout_rng is None:
        dropout_rng = self.make_rng("dropout")
    else:
      m_deterministic = True

    attn_kwargs = dict(
        mask=mask, dropout_rng=dropout_rng, dropout_rate=self.dropout_rate,
        broadcast_dropout=self.broadcast_dropout, deterministic=m_deterministic,
        dtype=self.dtype, precision=self.precision,
        force_fp32_for_softmax=self.force_fp32_for_softmax,
        implementation=self.implementation, is_causal=is_causal,
        qk_attn_weights_einsum=(self.qk_attn_weights_einsum_cls()
                                if self.qk_attn_weights_einsum_cls else None),
        attn_weights_value_einsum=(self.attn_weights_value_einsum_cls()
                                   if self.attn_weights_value_einsum_cls else None),
    )
    params = inspect.signature(self.attention_fn).parameters
    if is_causal and "is_causal" not in params:
      raise ValueError(
          "is_causal=True needs an attention_fn with an is_causal argument; pass"
          " mask=flax.linen.make_causal_mask(...) instead."
      )
    attn_kwargs = {k: v for k, v in attn_kwargs.items()
                   if k in params and (v is not None or k == "mask")}
    if sow_weights:
      self.sow("intermediates", "attention_weights", dot_product_attention_weights(
          query, key, None, mask, is_causal=is_causal, precision=self.precision))
    x = self.attention_fn(query, key, value, **attn_kwargs)
    if overflow is not None:  # tokens past the cache: NaN, not silently wrong outputs
      x = jnp.where(overflow, jnp.asarray(jnp.nan, x.dtype), x)

    return nn.DenseGeneral(
        features=features, axis=(-2, -1),
        kernel_init=self.out_kernel_init or self.kernel_init,
        bias_init=self.out_bias_init or self.bias_init,
        use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype,
        precision=self.precision,
        dot_general=self.out_dot_general or projection_dot_general,
        dot_general_cls=self.out_dot_general_cls, name="out",
    )(x)

  def _check_fields(self) -> None:
    """Head counts and the dropout rate, checked before they divide or index anything."""
    for name in ("num_heads", "num_kv_heads"):
      value = getattr(self, name)
      if value is None and name == "num_kv_heads":
        continue
      # An explicit num_kv_heads=0 would otherwise fall back to num_heads
      # through ``or``, and num_heads=0 fails as a ZeroDivisionError.
      if (isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer))
          or value < 1):
        raise ValueError(
            f"{name}={value!r} must be a positive int"
            + ("; leave it None for num_heads (MHA)." if name == "num_kv_heads" else ".")
        )
    # Refused here too, not only in the default core: attention_fn may be
    # flax's, which turns a rate of 1 into NaN.
    _dropout.check_rate(self.dropout_rate, "dropout_rate", allow_one=False)

  def _fused_projection(self, x: Array, heads: tuple[tuple[str, tuple[int, int]], ...]
                        ) -> list[Array]:
    """Projections of one input by several ``DenseGeneral``-shaped layers in one matmul.

    ``heads`` lists ``(name, (num_heads, head_dim))``; each name owns the
    parameters ``nn.DenseGeneral(features=(num_heads, head_dim), name=name)``
    would create (same shapes, initialisers and RNG paths), so the parameter
    tree and the initial values are unchanged. Their kernels are concatenated
    along the output axis for a single ``dot_general``, then the result is
    split back: fewer, larger matmuls, and the input is read once.
    """
    in_features = x.shape[-1]
    params = [_ProjectionParams(features=feats, kernel_init=self.kernel_init,
                                bias_init=self.bias_init, use_bias=self.use_bias,
                                param_dtype=self.param_dtype, name=name)(in_features)
              for name, feats in heads]
    kernel = jnp.concatenate([k.reshape(in_features, -1) for k, _ in params], axis=-1)
    bias = (jnp.concatenate([b.reshape(-1) for _, b in params]) if self.use_bias else None)
    x, kernel, bias = promote_dtype(x, kernel, bias, dtype=self.dtype)
    y = projection_dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())),
                               precision=self.precision)
    if bias is not None:
      y = y + bias
    sizes = np.cumsum([h * d for _, (h, d) in heads])[:-1]
    return [part.reshape(x.shape[:-1] + feats)
            for part, (_, feats) in zip(jnp.split(y, sizes, axis=-1), heads)]

  def _update_cache(self, key: Array, value: Array, mask: Array | None):
    """Writes ``key``/``value`` at the cache index; returns the full cache and its mask.

    On the init pass the cache is created with ``key``'s shape, so initialise
    with an input of the maximum decode length, as in flax.

    Overflow: feeding more tokens in total than that length is an error. With
    a concrete cache index (eager ``apply``) it raises. Under ``jax.jit`` (or
    ``scan``) the index is traced and cannot be raised on without a host sync
    every step (``checkify``, a callback), and ``dynamic_update_slice`` clamps
    the write onto the last slots, overwriting keys that every query of the
    call, even one inside the cache, then reads. So the whole call's output
    is NaN instead (see ``overflow`` below), and the step's logits and loss
    turn NaN rather than silently wrong; so is every later call, as the index
    stays past the end. A jitted loop can also check ``cache["cache_index"] +
    n <= max_len`` on the host between steps.

    Returns:
      ``(key, value, mask, overflow)``: the full cache ``[batch..., max_len,
      heads, head_dim]`` twice, the mask with the cache's causal pattern, and
      ``overflow``, a boolean scalar, True when this call's tokens do not fit
      (None on the init pass).

    Raises:
      ValueError: keys whose batch/head shape differs from the cache's, more
        new tokens than the cache holds, or (concrete index only) a write
        past its end.
    """
    is_initialized = self.has_variable("cache", "cached_key")
    cached_key = self.variable("cache", "cached_key", jnp.zeros, key.shape, key.dtype)
    cached_value = self.variable("cache", "cached_value", jnp.zeros, value.shape, value.dtype)
    cache_index = self.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))
    if not is_initialized:
      return key, value, mask, None
    *batch, max_len, heads, depth = cached_key.value.shape
    new_len = key.shape[-3]
    if tuple(key.shape) != (*batch, new_len, heads, depth) or new_len > max_len:
      raise ValueError(
          f"decode cache holds {cached_key.value.shape}; got keys {key.shape}. Feed"
          f" [batch, n<= {max_len}, features] per call with the batch used at init."
      )
    index = cache_index.value
    # Only a concrete index can be read; under jit this branch is not traced
    # (a NaN output stands in for it, see ``overflow`` and the docstring).
    if not isinstance(index, jax.core.Tracer) and int(index) + new_len > max_len:
      raise ValueError(
          f"decode cache is full: cache_index={int(index)} + {new_len} new tokens >"
          f" max length {max_len}; initialise the cache with a longer input."
      )
    start = (0,) * len(batch) + (index, 0, 0)
    key = jax.lax.dynamic_update_slice(cached_key.value, key.astype(cached_key.value.dtype), start)
    value = jax.lax.dynamic_update_slice(cached_value.value, value.astype(cached_value.value.dtype), start)
    cached_key.value, cached_value.value = key, value
    cache_index.value = index + new_len
    # Query i sits at position index + i and sees every cached key up to it.
    q_pos = index + jax.lax.broadcasted_iota(jnp.int32, (new_len, max_len), 0)
    k_pos = jax.lax.broadcasted_iota(jnp.int32, (new_len, max_len), 1)
    cache_mask = k_pos <= q_pos
    mask = as_bool_mask(mask)
    mask = cache_mask if mask is None else jnp.logical_and(mask, cache_mask)
    overflow = index + new_len > max_len
    return key, value, mask, overflow
