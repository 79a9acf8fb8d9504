"""Scaled dot-product attention (Vaswani et al. 2017) with interchangeable backends.

``dot_product_attention`` is the one entry point. It keeps the argument names of
``flax.linen.dot_product_attention`` (so it can be passed as ``attention_fn``) and
adds grouped-query attention, ``is_causal`` and a choice of backend:

* ``"xla"``: the textbook formula in plain XLA, with a FlashAttention-style
  backward pass that saves the probabilities (:mod:`attention.softmax_attention`);
  supports attention dropout. On CPU, ``is_causal`` attention is split into row
  blocks that skip the future keys' matmuls (:func:`causal_row_blocks`).
* ``"chunked"``: online softmax over ``[block_q, block_kv]`` tiles with a
  hand-written backward pass (:mod:`attention.chunked`). Memory is O(T * block)
  in both passes, and tiles that the mask or causality rule out are skipped.
* ``"cudnn"``: ``jax.nn.dot_product_attention(implementation="cudnn")`` (GPU,
  fp16/bf16).
* ``"cpu_flash"``: FlashAttention as a C++ kernel behind XLA's FFI
  (:mod:`attention.cpu_flash`; CPU, compiled at first use). No ``[q, k]``
  array in either pass, fully masked tiles skipped; attention dropout with
  the same pattern as ``"xla"``; no bias.
* ``None``: the fastest correct backend for the platform and the inputs
  (:mod:`attention.dispatch`, :func:`default_implementation`): on CPU
  ``"cpu_flash"`` where it applies. Otherwise a mask array's contents can decide:
  the tiled backend when enough of its tiles are empty, else ``"xla"``, with
  causal row blocks when the mask allows no future key (a causal mask array).

Conventions shared by every backend:

* query ``[batch..., q_len, heads, head_dim]``; key/value
  ``[batch..., kv_len, kv_heads, head_dim]`` with ``heads % kv_heads == 0``.
* ``mask`` is boolean and broadcastable to ``[batch..., heads, q_len, kv_len]``;
  ``True`` means attend. ``bias`` is added to the logits before masking.
* A query row with no key to attend to returns zeros, with zero (finite)
  gradients; ``softmax(all -inf)`` never appears.
* The softmax runs in float32 whatever the input dtype.
* Gradients are reverse mode (``jax.grad``, ``jax.vjp``): every backend has a
  hand-written backward pass, so ``jax.jvp`` through attention is not defined.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax.linen.dtypes import promote_dtype

from attention import chunked as _chunked
from attention import cpu_flash as _cpu_flash
from attention import dropout as _dropout
from attention.dispatch import (  # noqa: F401  (re-exported)
    BY_MASK, IMPLEMENTATIONS, by_mask, causal_row_blocks, default_implementation,
    mask_within_causal)
from attention.masks import and_masks, as_bool_mask, causal_mask
from attention.softmax_attention import attention_probs, softmax_attention

Array = jax.Array


def _split_heads(query: Array, key: Array) -> tuple[int, int]:
  heads, kv_heads = query.shape[-2], key.shape[-2]
  if heads % kv_heads:
    raise ValueError(
        f"query has {heads} heads but key/value have {kv_heads}; the number of"
        " query heads must be a multiple of kv heads (GQA/MQA)."
    )
  return kv_heads, heads // kv_heads


def _check_shapes(query: Array, key: Array, value: Array) -> None:
  if not query.ndim == key.ndim == value.ndim or query.ndim < 3:
    raise ValueError(
        "query, key and value must have the same rank >= 3, got shapes"
        f" {query.shape}, {key.shape}, {value.shape}."
    )
  if key.shape[:-1] != value.shape[:-1]:
    raise ValueError(
        f"key {key.shape} and value {value.shape} must agree on"
        " [batch..., kv_len, kv_heads]."
    )
  if query.shape[-1] != key.shape[-1]:
    raise ValueError(
        f"query head_dim {query.shape[-1]} != key head_dim {key.shape[-1]}."
    )
  try:
    jnp.broadcast_shapes(query.shape[:-3], key.shape[:-3])
  except ValueError:
    raise ValueError(
        f"batch dims of query {query.shape[:-3]} and key {key.shape[:-3]} do"
        " not broadcast."
    ) from None


_SHAPE_HINTS = {
    "mask": "a padding mask is [batch, 1, 1, kv_len] (flax.linen.make_attention_mask)",
    "bias": "a per-head bias is [heads, q_len, kv_len] or [batch, heads, q_len, kv_len]",
}


def checked_mask_bias(mask: Any, bias: Any, query: Array, key: Array
                      ) -> tuple[Array | None, Array | None]:
  """``(mask, bias)`` as arrays (the mask boolean), each checked by :func:`check_mask_shape`."""
  mask = as_bool_mask(mask)
  bias = None if bias is None else jnp.asarray(bias)
  check_mask_shape("mask", mask, query, key)
  check_mask_shape("bias", bias, query, key)
  return mask, bias


def check_mask_shape(name: str, x: Array | None, query: Array, key: Array) -> None:
  """Raises unless ``x`` broadcasts to ``[batch..., heads, q_len, kv_len]``.

  Checked up front for every backend: the tiled backend slices and pads a
  mask/bias by its trailing dims, so a ``[batch, kv_len]`` padding mask with
  ``batch == q_len`` would otherwise be taken as ``[q_len, kv_len]`` and give
  wrong values silently, and "xla" would broadcast a higher-rank mask into a
  higher-rank output.

  Args:
    name: ``"mask"`` or ``"bias"``, for the message.
    x: the mask or bias, or None.
    query: ``[batch..., q_len, heads, head_dim]``.
    key: ``[batch..., kv_len, kv_heads, head_dim]``.

  Raises:
    ValueError: if ``x`` has more dims than ``query`` or a dim that is neither
      1 nor the matching target dim.
  """
  if x is None:
    return
  batch = jnp.broadcast_shapes(query.shape[:-3], key.shape[:-3])
  target = tuple(batch) + (query.shape[-2], query.shape[-3], key.shape[-3])
  shape = tuple(x.shape)
  if len(shape) > len(target) or any(
      d not in (1, t) for d, t in zip(reversed(shape), reversed(target))):
    raise ValueError(
        f"{name} of shape {shape} does not broadcast to [batch..., heads, q_len,"
        f" kv_len] = {target}; {_SHAPE_HINTS.get(name, 'each dim must be 1 or equal')}."
    )


def check_is_causal(is_causal: Any) -> None:
  """``is_causal`` picks a static code path, so it must be a concrete bool."""
  if not isinstance(is_causal, (bool, np.bool_)):
    raise TypeError(
        f"is_causal must be a Python bool, got {is_causal!r} ({type(is_causal).__name__});"
        " pass True or False (for a per-example rule pass a mask array)."
    )


def grouped(x: Array | None, ndim_batch: int, heads: int, groups: int):
  """Reshapes a mask/bias ``[batch..., heads|1, q|1, k|1]`` to ``[batch..., kv_heads|1, groups|1, q|1, k|1]``."""
  if x is None:
    return None
  want = ndim_batch + 3
  if x.ndim > want:
    raise ValueError(
        f"mask/bias of shape {x.shape} has more dims than [batch..., heads,"
        f" q_len, kv_len] ({want})."
    )
  x = x.reshape((1,) * (want - x.ndim) + x.shape)
  h = x.shape[-3]
  if h == heads:
    x = x.reshape(x.shape[:-3] + (heads // groups, groups) + x.shape[-2:])
  elif h == 1:
    x = x.reshape(x.shape[:-3] + (1, 1) + x.shape[-2:])
  else:
    raise ValueError(
        f"mask/bias head axis has size {h}; it must be 1 or the number of"
        f" query heads ({heads})."
    )
  return x


def dot_product_attention_weights(
    query: Array,
    key: Array,
    bias: Array | None = None,
    mask: Array | None = None,
    *,
    is_causal: bool = False,
    scale: float | None = None,
    precision: Any = None,
) -> Array:
  """Attention probabilities ``[batch..., heads, q_len, kv_len]`` (float32).

  Used for ``sow_weights`` and alignment plots: it recomputes the weights on
  demand, whichever backend produced the attention output. Fully masked rows
  are all zeros.

  Args:
    query: ``[batch..., q_len, heads, head_dim]``.
    key: ``[batch..., kv_len, kv_heads, head_dim]``.
    bias: optional, broadcastable to ``[batch..., heads, q_len, kv_len]``.
    mask: optional boolean, broadcastable like ``bias``; True = attend.
    is_causal: apply a top-left aligned causal mask.
    scale: logit scale; defaults to ``1/sqrt(head_dim)``.
    precision: matmul precision.
  """
  check_is_causal(is_causal)
  _, groups = _split_heads(query, key)
  mask, bias = checked_mask_bias(mask, bias, query, key)
  key = jnp.repeat(key, groups, axis=-2) if groups > 1 else key
  if is_causal:
    mask = and_masks(mask, causal_mask(query.shape[-3], key.shape[-3]))
  return attention_probs(_scaled(_heads_first(query), scale), _heads_first(key), bias,
                         mask, precision)


def _heads_first(x: Array) -> Array:
  """``[..., length, heads, dim]`` -> ``[..., heads, length, dim]``.

  One transpose per input up front instead of the per-matmul relayouts XLA
  inserts for ``...qhd,...khd`` einsums, which made fwd+bwd ~1.3x slower on
  CPU (benchmarks/attention_core.py).
  """
  return jnp.swapaxes(x, -2, -3)


def _scaled(qh: Array, scale: float | None) -> Array:
  """Heads-first queries times the logit scale (default ``1/sqrt(head_dim)``)."""
  scale = 1.0 / math.sqrt(qh.shape[-1]) if scale is None else scale
  return qh * jnp.asarray(scale, qh.dtype)


def _dropout_keep(query, key, dropout_rng, dropout_rate, broadcast_dropout,
                  deterministic) -> tuple[Array | None, float]:
  """Attention dropout's ``(keep, keep_scale)``: the boolean pattern
  ``[batch..., heads, q_len, kv_len]`` (batch and heads 1 with
  ``broadcast_dropout``) and the factor of kept weights; ``(None, 1.0)``
  without dropout.

  One pattern for every backend that supports dropout ("xla", "cpu_flash"):
  drawn whole from the key, so it depends on neither the backend nor the
  blocking, and switching backends keeps the same dropped weights.
  """
  if deterministic or dropout_rate <= 0.0:
    return None, 1.0
  if dropout_rng is None:
    raise ValueError("dropout_rate > 0 with deterministic=False needs a dropout_rng.")
  shape = jnp.broadcast_shapes(query.shape[:-3], key.shape[:-3]) + (
      query.shape[-2], query.shape[-3], key.shape[-3])
  if broadcast_dropout:  # one pattern shared by the batch and head dims
    shape = (1,) * (len(shape) - 2) + shape[-2:]
  # 16 random bits per weight, four weights per Threefry evaluation
  # (attention.dropout): a quarter of jax.random.bernoulli's RNG work.
  return (_dropout.keep_mask(dropout_rng, dropout_rate, shape),
          _dropout.keep_scale(dropout_rate))


def _xla(query, key, value, bias, mask, is_causal, scale, precision,
         dropout_rng, dropout_rate, broadcast_dropout, deterministic):
  # GQA by repeating kv heads: the [q, k] logits dominate memory anyway, and
  # plain 4-D einsums compile to faster CPU code than a grouped 5-D layout.
  _, groups = _split_heads(query, key)
  if groups > 1:
    key = jnp.repeat(key, groups, axis=-2)
    value = jnp.repeat(value, groups, axis=-2)
  q_len, kv_len = query.shape[-3], key.shape[-3]
  qh, kh, vh = _heads_first(query), _heads_first(key), _heads_first(value)
  keep, keep_scale = _dropout_keep(query, key, dropout_rng, dropout_rate,
                                   broadcast_dropout, deterministic)
  qh = _scaled(qh, scale)
  blocks = tuple(causal_row_blocks(q_len, kv_len)) if is_causal else None
  out = softmax_attention(qh, kh, vh, bias, mask, keep, keep_scale, precision, blocks)
  return jnp.swapaxes(out, -2, -3)


def _cudnn(query, key, value, bias, mask, is_causal, scale):
  batch = jnp.broadcast_shapes(query.shape[:-3], key.shape[:-3])
  flat = lambda x: jnp.broadcast_to(x, batch + x.shape[-3:]).reshape((-1,) + x.shape[-3:])
  q, k, v = flat(query), flat(key), flat(value)
  heads = query.shape[-2]

  def four_d(x):
    if x is None:
      return None
    x = x.reshape((1,) * (len(batch) + 3 - x.ndim) + x.shape)
    lead = x.shape[:-3]
    if all(d == 1 for d in lead):
      return x.reshape((1,) + x.shape[-3:])
    return jnp.broadcast_to(x, batch + x.shape[-3:]).reshape((-1,) + x.shape[-3:])

  # cuDNN wants full [q_len, kv_len] bias/mask planes (a padding mask is
  # usually [B, 1, 1, S]); batch and head axes may stay broadcast.
  plane = lambda x: None if x is None else jnp.broadcast_to(
      x, x.shape[:2] + (q.shape[1], k.shape[1]))
  b4, m4 = plane(four_d(bias)), plane(four_d(mask))
  out = jax.nn.dot_product_attention(
      q, k, v, bias=None if b4 is None else b4.astype(q.dtype), mask=m4,
      scale=scale, is_causal=is_causal, implementation="cudnn",
  )
  if m4 is not None:
    # cuDNN spreads a fully masked row uniformly over its keys; the library-wide
    # contract is zeros, so rows with nothing to attend to are zeroed here.
    allowed = and_masks(m4, causal_mask(q.shape[1], k.shape[1]) if is_causal else None)
    valid = jnp.any(allowed, axis=-1)  # [b|1, h|1, q]
    valid = jnp.broadcast_to(valid, (q.shape[0], heads, q.shape[1]))
    out = jnp.where(jnp.swapaxes(valid, 1, 2)[..., None], out, 0)
  return out.reshape(batch + out.shape[1:])


def _check_cpu_flash(query: Array, bias: Array | None) -> None:
  """One-line errors for what ``implementation="cpu_flash"`` cannot run."""
  if jax.default_backend() != "cpu":
    raise ValueError(f"implementation='cpu_flash' is a CPU kernel (this backend is"
                     f" {jax.default_backend()!r}); use None, 'xla' or 'cudnn'.")
  if bias is not None:
    raise ValueError("implementation='cpu_flash' takes no bias; use 'xla' or 'chunked'"
                     " (or None, which picks one).")
  if query.dtype == jnp.float64:
    raise ValueError("implementation='cpu_flash' computes in float32; use 'xla' for"
                     " float64 inputs.")
  if not _cpu_flash.available():
    raise ValueError(f"implementation='cpu_flash' is unavailable here"
                     f" ({_cpu_flash.unavailable_reason()}); use None or 'xla'.")


def dot_product_attention(
    query: Array,
    key: Array,
    value: Array,
    bias: Array | None = None,
    mask: Array | None = None,
    broadcast_dropout: bool = True,
    dropout_rng: Array | None = None,
    dropout_rate: float = 0.0,
    deterministic: bool = False,
    dtype: Any = None,
    precision: Any = None,
    module: Any = None,
    force_fp32_for_softmax: bool = True,
    *,
    is_causal: bool = False,
    implementation: str | None = None,
    scale: float | None = None,
    block_q: int | None = None,
    block_kv: int | None = None,
) -> Array:
  """Computes ``softmax(q k^T * scale + bias, where=mask) v``.

  Args:
    query: ``[batch..., q_len, heads, head_dim]``.
    key: ``[batch..., kv_len, kv_heads, head_dim]``; ``heads % kv_heads == 0``.
    value: ``[batch..., kv_len, kv_heads, v_head_dim]``.
    bias: optional logit bias broadcastable to ``[batch..., heads, q_len, kv_len]``.
    mask: optional boolean mask broadcastable to ``[batch..., heads, q_len,
      kv_len]``; True = attend. Flax's float 0/1 masks (nonzero = attend) and
      array-likes (numpy arrays, nested lists) are accepted too.
    broadcast_dropout: share the dropout pattern over batch and heads.
    dropout_rng: PRNG key for attention dropout.
    dropout_rate: attention dropout probability in ``[0, 1)`` (``"xla"`` and
      ``"cpu_flash"``, which drop the same weights); masks come from
      :func:`attention.dropout.keep_mask` (16 random bits per weight, the rate
      honoured to within ``2**-17``, kept weights rescaled exactly).
    deterministic: disables dropout.
    dtype: computation dtype (default: promoted from the inputs).
    precision: matmul precision.
    module: if given, the attention weights are sown into its
      ``intermediates`` collection (flax's ``attention_fn`` protocol).
    force_fp32_for_softmax: kept for flax compatibility; the softmax always
      runs in float32.
    is_causal: causal attention without a mask array (a Python bool: it
      selects the code path at trace time); query i attends keys
      ``j <= i``. Tiled backends skip key blocks wholly in the future, and so
      does ``"xla"`` on CPU (row blocks); prefer it to a causal mask array.
    implementation: ``"xla"``, ``"chunked"``, ``"cudnn"``, ``"cpu_flash"`` or
      None (auto).
    scale: logit scale, default ``1/sqrt(head_dim)``.
    block_q: query tile size (>= 1) for ``"chunked"``.
    block_kv: key tile size (>= 1) for ``"chunked"``.

  Returns:
    ``[batch..., q_len, heads, v_head_dim]`` in the computation dtype.

  Raises:
    ValueError: a mask/bias that does not broadcast to ``[batch..., heads,
      q_len, kv_len]``, ``dropout_rate`` outside ``[0, 1)``, a block size
      below 1, and incompatible query/key/value shapes.
    TypeError: a non-bool ``is_causal`` or a non-int block size.
  """
  del force_fp32_for_softmax  # always on: see the module docstring
  query, key, value = promote_dtype(query, key, value, dtype=dtype)
  _check_shapes(query, key, value)
  _split_heads(query, key)
  # Every argument is checked here, before dispatch, so that all backends
  # reject the same inputs (each used to ignore or misread a different subset).
  mask, bias = checked_mask_bias(mask, bias, query, key)
  check_is_causal(is_causal)
  # 1 is refused too: every weight dropped is an all-zero output, never intended.
  _dropout.check_rate(dropout_rate, "dropout_rate", allow_one=False)
  _chunked.check_block("block_q", block_q)
  _chunked.check_block("block_kv", block_kv)
  dropout = (not deterministic) and dropout_rate > 0.0
  if implementation is not None and implementation not in IMPLEMENTATIONS:
    raise ValueError(
        f"implementation={implementation!r} is unknown; use one of {IMPLEMENTATIONS}"
        " or None."
    )
  impl = implementation or default_implementation(
      query, key, dropout=dropout, is_causal=is_causal, mask=mask, bias=bias)
  if impl == "cudnn" and jax.default_backend() != "gpu":
    raise ValueError(
        f"implementation='cudnn' needs a GPU (this backend is {jax.default_backend()!r});"
        " use 'xla', 'chunked' or None."
    )
  if impl == "cpu_flash":
    _check_cpu_flash(query, bias)
  if dropout and impl not in ("xla", "cpu_flash"):
    raise ValueError(
        f"attention dropout is supported by implementation='xla' and 'cpu_flash', not"
        f" {impl!r}; set dropout_rate=0 or deterministic=True, or use 'xla'."
    )
  if module is not None:
    module.sow("intermediates", "attention_weights", dot_product_attention_weights(
        query, key, bias, mask, is_causal=is_causal, scale=scale, precision=precision))
  if impl == BY_MASK:
    return by_mask(dot_product_attention, query, key, value, bias, mask,
                   is_causal=is_causal, scale=scale, precision=precision,
                   block_q=block_q, block_kv=block_kv)
  if impl == "xla":
    out = _xla(query, key, value, bias, mask, is_causal, scale, precision,
               dropout_rng, dropout_rate, broadcast_dropout, deterministic)
  elif impl == "cudnn":
    out = _cudnn(query, key, value, bias, mask, is_causal, scale)
  elif impl == "cpu_flash":
    keep, keep_scale = _dropout_keep(query, key, dropout_rng, dropout_rate,
                                     broadcast_dropout, deterministic)
    out = _cpu_flash.attention(query, key, value, mask, is_causal=is_causal, scale=scale,
                               keep=keep, keep_scale=keep_scale)
  else:
    out = _chunked.attention(query, key, value, bias, mask, is_causal=is_causal,
                             scale=scale, block_q=block_q, block_kv=block_kv,
                             precision=precision)
  return out.astype(query.dtype)
