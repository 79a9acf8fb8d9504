"""Scaled dot-product attention (Vaswani et al. 2017) with interchangeable backends.

``dot_product_attention`` is the one entry point. It keeps the argument names of
``flax.linen.dot_product_attention`` (so it can be passed as ``attention_fn``) and
adds grouped-query attention, ``is_causal`` and a choice of backend:

* ``"xla"``: the textbook formula in plain XLA; supports attention dropout.
  On CPU, ``is_causal`` attention is split into row blocks that skip the
  future keys' matmuls (:func:`causal_row_blocks`).
* ``"chunked"``: online softmax over ``[block_q, block_kv]`` tiles with a
  hand-written backward pass (:mod:`attention.chunked`). Memory is O(T * block)
  in both passes, and tiles that the mask or causality rule out are skipped.
* ``"cudnn"``: ``jax.nn.dot_product_attention(implementation="cudnn")`` (GPU,
  fp16/bf16).
* ``None``: the fastest correct backend for the platform and the inputs
  (:func:`default_implementation`). On CPU a mask array's contents can decide:
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
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax.linen.dtypes import promote_dtype

from attention import chunked as _chunked
from attention import dropout as _dropout
from attention import huge_pages as _huge_pages
from attention.masks import as_bool_mask, causal_mask, masked_softmax

Array = jax.Array

IMPLEMENTATIONS = ("xla", "chunked", "cudnn")

# Key and query lengths at or above which ``implementation=None`` prefers the
# tiled backend on CPU; below it the per-tile bookkeeping costs more than the
# single fused softmax saves (see benchmarks/attention_core.py).
_CHUNKED_MIN_LEN = 512

# Query rows per block when the "xla" backend splits causal attention on CPU
# (causal_row_blocks). Measured fwd+bwd against one [T, T] product (B*T = 1024,
# H = 8, D = 64): 64-row blocks 1.29x at T = 128, 1.4-1.6x at T = 256; 128-row
# blocks about the same from T = 256 up. At most _MAX_ROW_BLOCKS blocks, so a
# long sequence does not unroll into hundreds of small matmuls.
_CAUSAL_ROW_BLOCK = 64
_MAX_ROW_BLOCKS = 8

# Largest float32 [batch, heads, q, k] array for which implementation=None
# still considers "xla" on CPU (its backward pass holds a few of these):
# B=4, H=8, T=2048 or B=1, H=8, T=4096. Beyond it, the tiled backend.
_XLA_MAX_BYTES = 512 * 2**20

# fwd+bwd time of one computed tile in the tiled backend over the same work in
# "xla", on CPU with no tile to skip (B=4 H=8 padding mask, default 512x256
# tiles, throw-away script). With a mask array, implementation=None runs the
# tiled backend when its occupied tiles times this undercut the share of the
# logits "xla" computes. Huge pages (attention/huge_pages.py) speed "xla"'s
# large arrays up more than the tiled backend's tiles: 4 KiB pages T=1024/2048:
# 0.85/0.88; huge pages: 1.03/1.29.
_CHUNKED_TILE_COST = 0.9
_CHUNKED_TILE_COST_HUGE_PAGES = 1.2

# What default_implementation returns when the mask's contents decide.
BY_MASK = "by mask"


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


def _and(a: Array | None, b: Array | None) -> Array | None:
  if a is None:
    return b
  if b is None:
    return a
  return jnp.logical_and(a, b)


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
  _, groups = _split_heads(query, key)
  key = jnp.repeat(key, groups, axis=-2) if groups > 1 else key
  mask = as_bool_mask(mask)
  if is_causal:
    mask = _and(mask, causal_mask(query.shape[-3], key.shape[-3]))
  return _probs(_heads_first(query), _heads_first(key), bias, mask, scale, precision)


def _heads_first(x: Array) -> Array:
  """``[..., length, heads, dim]`` -> ``[..., heads, length, dim]``."""
  return jnp.swapaxes(x, -2, -3)


def _probs(qh, kh, bias, mask, scale, precision):
  """float32 softmax weights ``[..., heads, q, k]`` from heads-first q and k.

  Heads-first operands: one transpose per input up front instead of the
  per-matmul relayouts XLA inserts for ``...qhd,...khd`` einsums, which made
  fwd+bwd ~1.3x slower on CPU (benchmarks/attention_core.py).
  """
  scale = 1.0 / math.sqrt(qh.shape[-1]) if scale is None else scale
  logits = jnp.einsum(
      "...hqd,...hkd->...hqk", qh * jnp.asarray(scale, qh.dtype), kh,
      precision=precision, preferred_element_type=jnp.float32,
  )
  if bias is not None:
    logits = logits + bias.astype(jnp.float32)
  return masked_softmax(logits, mask)


def causal_row_blocks(q_len: int, kv_len: int) -> list[tuple[int, int, int]]:
  """``(q_start, q_end, kv_end)`` row blocks for causal attention on CPU.

  Rows ``[q_start, q_end)`` of a top-left aligned causal pattern see only keys
  ``[0, kv_end)``, so computing each block against that key prefix skips the
  future keys' matmul work: with b blocks, (b + 1) / 2b of the full FLOPs.
  One block (the whole product) elsewhere: the split was measured on CPU only.
  """
  block = max(_CAUSAL_ROW_BLOCK, -(-q_len // _MAX_ROW_BLOCKS))
  if jax.default_backend() != "cpu" or q_len < 2 * block:
    return [(0, q_len, kv_len)]
  return [(a, min(a + block, q_len), min(a + block, kv_len))
          for a in range(0, q_len, block)]


def _rows(x: Array | None, start: int, stop: int, kv_end: int) -> Array | None:
  """Rows ``[start, stop)`` and keys ``[0, kv_end)`` of a broadcastable mask/bias."""
  if x is None:
    return None
  if x.ndim >= 2 and x.shape[-2] != 1:
    x = x[..., start:stop, :]
  return x if x.shape[-1] == 1 else x[..., :kv_end]


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
  keep = None
  if not deterministic and dropout_rate > 0.0:
    if dropout_rng is None:
      raise ValueError("dropout_rate > 0 with deterministic=False needs a dropout_rng.")
    shape = jnp.broadcast_shapes(query.shape[:-3], key.shape[:-3]) + (
        query.shape[-2], q_len, kv_len)
    if broadcast_dropout:  # one pattern shared by the batch and head dims
      shape = (1,) * (len(shape) - 2) + shape[-2:]
    # 16 random bits per weight, four weights per Threefry evaluation
    # (attention.dropout): a quarter of jax.random.bernoulli's RNG work.
    # Drawn whole and then cut per row block, so the pattern does not
    # depend on the blocking.
    keep = _dropout.keep_mask(dropout_rng, dropout_rate, shape)
  blocks = causal_row_blocks(q_len, kv_len) if is_causal else [(0, q_len, kv_len)]
  outs = []
  for start, stop, kv_end in blocks:
    block_mask = _rows(mask, start, stop, kv_end)
    if is_causal:
      block_mask = _and(block_mask, causal_mask(stop - start, kv_end, q_offset=start))
    probs = _probs(qh[..., start:stop, :], kh[..., :kv_end, :],
                   _rows(bias, start, stop, kv_end), block_mask, scale, precision)
    if keep is not None:
      probs = jnp.where(_rows(keep, start, stop, kv_end),
                        probs * _dropout.keep_scale(dropout_rate), 0.0)
    outs.append(jnp.einsum(
        "...hqk,...hkd->...hqd", probs.astype(value.dtype), vh[..., :kv_end, :],
        precision=precision, preferred_element_type=jnp.float32,
    ))
  out = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=-2)
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
    allowed = _and(m4, causal_mask(q.shape[1], k.shape[1]) if is_causal else None)
    valid = jnp.any(allowed, axis=-1)  # [b|1, h|1, q]
    valid = jnp.broadcast_to(valid, (q.shape[0], heads, q.shape[1]))
    out = jnp.where(jnp.swapaxes(valid, 1, 2)[..., None], out, 0)
  return out.reshape(batch + out.shape[1:])


def default_implementation(
    query: Array, key: Array, *, dropout: bool = False, is_causal: bool = False,
    mask: Array | None = None,
) -> str:
  """The backend ``implementation=None`` resolves to for these inputs.

  Returns one of :data:`IMPLEMENTATIONS`, or :data:`BY_MASK` when a mask array
  decides at run time on CPU (logits up to 512 MiB):

  * at least 512 tokens: the tiled backend if the tiles it would compute
    (:func:`attention.chunked.occupied_tile_fraction`) cost less than the
    logits ``"xla"`` computes;
  * otherwise ``"xla"``; when the mask has a query axis, allows no key after
    its query (:func:`mask_within_causal`, e.g. ``make_causal_mask``) and the
    sequence is long enough for :func:`causal_row_blocks`, with the row blocks
    of ``is_causal``, since then ``mask`` and ``mask & causal`` are the same.
  """
  if dropout:
    return "xla"
  platform = jax.default_backend()
  if (
      platform == "gpu"
      and query.dtype in (jnp.bfloat16, jnp.float16)
      and query.shape[-1] <= 128
      and query.shape[-1] % 8 == 0
  ):
    return "cudnn"
  # The tiled backend is a CPU backend (cache-sized tiles, skipped tiles); on
  # accelerators its sequential loops lose to one fused XLA kernel.
  if platform != "cpu":
    return "xla"
  if min(query.shape[-3], key.shape[-3]) < _CHUNKED_MIN_LEN:
    return BY_MASK if _may_split_mask(query, key, mask, is_causal) else "xla"
  # On CPU the tiled backend wins only by skipping tiles, and "xla" only while
  # its [batch, heads, q, k] float32 arrays stay moderate. Without a mask array
  # "xla" does no more work (is_causal: row blocks, fwd+bwd 1.3-1.45x the tiled
  # backend at T = 1024-2048); with one, which tiles are empty is data.
  batch = math.prod(jnp.broadcast_shapes(query.shape[:-3], key.shape[:-3]))
  logits_bytes = 4 * batch * query.shape[-2] * query.shape[-3] * key.shape[-3]
  if logits_bytes > _XLA_MAX_BYTES:
    return "chunked"
  return "xla" if mask is None else BY_MASK


def _may_split_mask(query, key, mask, is_causal) -> bool:
  """Could a mask array turn out causal, so that "xla" may use row blocks?

  Only a mask with a query axis can be (a key-padding ``[B, 1, 1, S]`` mask
  cannot), and only where :func:`causal_row_blocks` splits at all.
  """
  return (mask is not None and not is_causal and mask.ndim >= 2
          and mask.shape[-2] != 1
          and len(causal_row_blocks(query.shape[-3], key.shape[-3])) > 1)


def mask_within_causal(mask: Array, q_len: int, kv_len: int) -> Array:
  """Boolean scalar: does ``mask`` allow no key after its query?

  True for ``flax.linen.make_causal_mask`` and for its combination with a
  padding mask. Then attention under ``mask`` equals attention under ``mask``
  with ``is_causal=True``, which skips the future keys' work.

  Args:
    mask: boolean, broadcastable to ``[batch..., heads, q_len, kv_len]``.
    q_len: query length.
    kv_len: key length.
  """
  return ~jnp.any(mask & ~causal_mask(q_len, kv_len))


def _prefers_chunked(query, key, mask, *, is_causal=False, block_q=None,
                     block_kv=None, xla_share=None) -> Array:
  """Boolean scalar: is the tiled backend cheaper than "xla" for this mask (CPU)?

  ``xla_share`` (default: from ``is_causal``) is the share of the logits "xla"
  would compute; it may be traced.
  """
  occupied = _chunked.occupied_tile_fraction(
      query, key, mask, is_causal=is_causal, block_q=block_q, block_kv=block_kv)
  if xla_share is None:
    xla_share = _xla_work_fraction(query.shape[-3], key.shape[-3], is_causal)
  cost = _CHUNKED_TILE_COST_HUGE_PAGES if _huge_pages.active() else _CHUNKED_TILE_COST
  return occupied * cost < xla_share


def _by_mask(query, key, value, bias, mask, *, is_causal, **options) -> Array:
  """Runs the backend the mask's contents pick (CPU; see default_implementation).

  Every candidate is compiled and ``lax.switch`` runs one. Under ``jax.grad``
  the branches not taken still hand back their residuals, as zeros: "xla"'s are
  ``[batch, heads, q, k]`` arrays, so the "xla" branches are rematerialised and
  save only their inputs. Measured fwd+bwd on CPU: B=1 H=8 T=2048 half-padded,
  tiled 194 ms, cond 276 ms, cond with remat 209 ms; B=4 T=1024 padded, "xla"
  451 ms, cond with remat 447 ms (the recompute costs no more than the
  residuals it avoids writing). A causal mask array, B=4 H=8 T=1024 (T=256):
  "xla" 349 (24.2) ms, causal branch without remat 224 (25.4) ms, with remat
  220 (17.8) ms. Under jax.vmap with a batched mask the switch becomes a
  select and every branch runs: pass ``implementation`` there.
  """
  q_len, kv_len = query.shape[-3], key.shape[-3]

  def run(impl, causal, remat):
    fn = lambda *a: dot_product_attention(
        *a, implementation=impl, is_causal=causal, **options)
    return jax.checkpoint(fn) if remat else fn

  branches = [run("xla", is_causal, True)]
  index = jnp.int32(0)
  xla_share = _xla_work_fraction(q_len, kv_len, is_causal)
  if _may_split_mask(query, key, mask, is_causal):
    within = mask_within_causal(mask, q_len, kv_len)
    branches.append(run("xla", True, True))
    index = jnp.where(within, len(branches) - 1, index)
    xla_share = jnp.where(within, _xla_work_fraction(q_len, kv_len, True), xla_share)
  if min(q_len, kv_len) >= _CHUNKED_MIN_LEN:
    branches.append(run("chunked", is_causal, False))
    chunked = _prefers_chunked(query, key, mask, is_causal=is_causal,
                               block_q=options["block_q"],
                               block_kv=options["block_kv"], xla_share=xla_share)
    index = jnp.where(chunked, len(branches) - 1, index)
  return jax.lax.switch(index, branches, query, key, value, bias, mask)


def _xla_work_fraction(q_len: int, kv_len: int, is_causal: bool) -> float:
  """Share of the ``[q_len, kv_len]`` logits the "xla" backend computes."""
  if not is_causal:
    return 1.0
  blocks = causal_row_blocks(q_len, kv_len)
  return sum((stop - start) * end for start, stop, end in blocks) / (q_len * kv_len)


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
      kv_len]``; True = attend.
    broadcast_dropout: share the dropout pattern over batch and heads.
    dropout_rng: PRNG key for attention dropout.
    dropout_rate: attention dropout probability (``"xla"`` backend only); masks
      come from :func:`attention.dropout.keep_mask` (16 random bits per weight,
      the rate honoured to within ``2**-17``, kept weights rescaled exactly).
    deterministic: disables dropout.
    dtype: computation dtype (default: promoted from the inputs).
    precision: matmul precision.
    module: if given, the attention weights are sown into its
      ``intermediates`` collection (flax's ``attention_fn`` protocol).
    force_fp32_for_softmax: kept for flax compatibility; the softmax always
      runs in float32.
    is_causal: causal attention without a mask array; query i attends keys
      ``j <= i``. Tiled backends skip key blocks wholly in the future, and so
      does ``"xla"`` on CPU (row blocks); prefer it to a causal mask array.
    implementation: ``"xla"``, ``"chunked"``, ``"cudnn"`` or None (auto).
    scale: logit scale, default ``1/sqrt(head_dim)``.
    block_q: query tile size for ``"chunked"``.
    block_kv: key tile size for ``"chunked"``.

  Returns:
    ``[batch..., q_len, heads, v_head_dim]`` in the computation dtype.
  """
  del force_fp32_for_softmax  # always on: see the module docstring
  query, key, value = promote_dtype(query, key, value, dtype=dtype)
  _check_shapes(query, key, value)
  _split_heads(query, key)
  mask = as_bool_mask(mask)
  dropout = (not deterministic) and dropout_rate > 0.0
  if implementation is not None and implementation not in IMPLEMENTATIONS:
    raise ValueError(
        f"implementation={implementation!r} is unknown; use one of {IMPLEMENTATIONS}"
        " or None."
    )
  impl = implementation or default_implementation(
      query, key, dropout=dropout, is_causal=is_causal, mask=mask)
  if impl == "cudnn" and jax.default_backend() != "gpu":
    raise ValueError(
        f"implementation='cudnn' needs a GPU (this backend is {jax.default_backend()!r});"
        " use 'xla', 'chunked' or None."
    )
  if dropout and impl != "xla":
    raise ValueError(
        f"attention dropout is only supported by implementation='xla', not {impl!r};"
        " set dropout_rate=0 or deterministic=True, or use 'xla'."
    )
  if module is not None:
    module.sow("intermediates", "attention_weights", dot_product_attention_weights(
        query, key, bias, mask, is_causal=is_causal, scale=scale, precision=precision))
  if impl == BY_MASK:
    return _by_mask(query, key, value, bias, mask, is_causal=is_causal, scale=scale,
                    precision=precision, block_q=block_q, block_kv=block_kv)
  if impl == "xla":
    out = _xla(query, key, value, bias, mask, is_causal, scale, precision,
               dropout_rng, dropout_rate, broadcast_dropout, deterministic)
  elif impl == "cudnn":
    out = _cudnn(query, key, value, bias, mask, is_causal, scale)
  else:
    out = _chunked.attention(query, key, value, bias, mask, is_causal=is_causal,
                             scale=scale, block_q=block_q, block_kv=block_kv,
                             precision=precision)
  return out.astype(query.dtype)
