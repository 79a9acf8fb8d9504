"""``softmax(q kᵀ + bias) v`` with a hand-written backward pass (the ``"xla"`` backend).

Autodiff of the textbook formula is correct but slow on CPU, for three reasons:

* ``jax.nn.softmax`` differentiates through ``exp(x) / sum(exp(x))``, so the
  backward pass materialises broadcasts of the ``[q, k]`` normaliser;
* the softmax backward needs ``rowsum(dP ∘ P)``, a reduction over ``[q, k]``
  inside the ``dP = dO vᵀ`` fusion;
* ``dV = Pᵀ dO`` and ``dK = dSᵀ q`` contract the query axis, a form XLA:CPU
  runs at a third of the plain matmul's speed (:mod:`attention.transposed_matmul`).

:func:`softmax_attention` keeps the forward pass as it was and saves the
probabilities ``P`` and the output ``O``. Its backward pass is the one
FlashAttention uses, without tiling:

    dV = Pᵀ dO,   dP = dO vᵀ,   δ = rowsum(dO ∘ O),   dS = P ∘ (dP − δ),
    dq = dS k,    dk = dSᵀ q,   dbias = dS (summed to the bias's shape).

``rowsum(dO ∘ O)`` equals ``rowsum(dP ∘ P)`` and costs ``[q, d]`` instead of
``[q, k]``. With attention dropout (a boolean ``keep`` and its scale ``1/(1-rate)``),
``O = (P ∘ keep·s) v``, ``dP`` is multiplied by ``keep·s``, and δ is unchanged.

With ``causal_blocks`` (CPU, :func:`attention.dispatch.causal_row_blocks`) the
same computation runs per row block against the key prefix its queries may
see, skipping the future keys' matmuls, inside this one custom VJP. The key
gradients of the blocks are summed in the ``[d, k]`` layout and transposed
once (:func:`attention.transposed_matmul.pt_matmul_sum`).

Masked positions have ``P = 0``, so their ``dS`` is exactly 0, and a row with no
key has zero output and zero gradients. As with every backend here that has
a custom gradient (``"chunked"``, cuDNN), forward-mode differentiation
(``jax.jvp``) is not defined; reverse mode, ``vmap`` and ``jax.checkpoint``
are.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from attention.masks import and_masks, causal_mask, masked_softmax
from attention.transposed_matmul import pt_matmul_sum

Array = jax.Array


def attention_probs(q: Array, k: Array, bias: Array | None, mask: Array | None,
                    precision: Any = None) -> Array:
  """float32 softmax weights ``[..., heads, q_len, kv_len]`` of heads-first, pre-scaled q.

  Fully masked rows are all zeros (:func:`attention.masks.masked_softmax`).
  """
  logits = jnp.einsum("...qd,...kd->...qk", q, k,
                      precision=precision, preferred_element_type=jnp.float32)
  if bias is not None:
    logits = logits + bias.astype(jnp.float32)
  return masked_softmax(logits, mask)


def _dropped(x: Array, keep: Array | None, keep_scale: float) -> Array:
  """``x`` with dropout's pattern applied: kept entries scaled, the rest 0."""
  return x if keep is None else jnp.where(keep, x * keep_scale, 0.0)


Blocks = tuple[tuple[int, int, int], ...]


def _rows(x: Array | None, start: int, stop: int, kv_end: int) -> Array | None:
  """Rows ``[start, stop)`` and keys ``[0, kv_end)`` of a broadcastable ``[..., q, k]`` array."""
  if x is None:
    return None
  if x.ndim >= 2 and x.shape[-2] != 1:
    x = x[..., start:stop, :]
  return x if x.shape[-1] == 1 else x[..., :kv_end]


def _block_mask(mask, start, stop, kv_end, causal):
  """The mask of one row block, with the causal rule when ``causal``."""
  mask = _rows(mask, start, stop, kv_end)
  return and_masks(mask, causal_mask(stop - start, kv_end, q_offset=start)) if causal else mask


def _forward(q, k, v, bias, mask, keep, keep_scale, precision, blocks):
  causal = blocks is not None
  blocks = blocks or ((0, q.shape[-2], k.shape[-2]),)
  outs, probs = [], []
  for start, stop, kv_end in blocks:
    p = attention_probs(q[..., start:stop, :], k[..., :kv_end, :],
                        _rows(bias, start, stop, kv_end),
                        _block_mask(mask, start, stop, kv_end, causal), precision)
    outs.append(jnp.einsum(
        "...qk,...kd->...qd", _dropped(p, _rows(keep, start, stop, kv_end),
                                       keep_scale).astype(v.dtype),
        v[..., :kv_end, :], precision=precision, preferred_element_type=jnp.float32))
    probs.append(p)
  out = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=-2)
  return out, tuple(probs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def softmax_attention(q: Array, k: Array, v: Array, bias: Array | None,
                      mask: Array | None, keep: Array | None,
                      keep_scale: float = 1.0, precision: Any = None,
                      causal_blocks: Blocks | None = None) -> Array:
  """Heads-first dot-product attention with a FlashAttention-style backward.

  The logits are ``q kᵀ`` unscaled: callers fold the ``1/sqrt(head_dim)``
  into ``q``, where autodiff handles it at ``[q_len, head_dim]`` cost.

  Args:
    q: ``[..., heads, q_len, head_dim]``, already scaled.
    k: ``[..., heads, kv_len, head_dim]``.
    v: ``[..., heads, kv_len, v_head_dim]``.
    bias: optional float, broadcastable to ``[..., heads, q_len, kv_len]``.
    mask: optional boolean, broadcastable like ``bias``; True = attend.
    keep: optional boolean dropout pattern, broadcastable like ``bias``;
      True = keep. Kept weights are multiplied by ``keep_scale``.
    keep_scale: ``1 / (1 - dropout_rate)``; ignored without ``keep``.
    precision: matmul precision.
    causal_blocks: top-left aligned causal attention, computed by row blocks
      ``(q_start, q_end, kv_end)`` that cover the queries in order, each
      against the key prefix ``[0, kv_end)`` its rows may see (see
      :func:`attention.dispatch.causal_row_blocks`). None: no causal rule,
      one ``[q_len, kv_len]`` product.

  Returns:
    ``[..., heads, q_len, v_head_dim]`` float32.
  """
  return _forward(q, k, v, bias, mask, keep, keep_scale, precision, causal_blocks)[0]


def _fwd(q, k, v, bias, mask, keep, keep_scale, precision, causal_blocks):
  out, probs = _forward(q, k, v, bias, mask, keep, keep_scale, precision, causal_blocks)
  # The mask is not needed backwards: it is already in the zeros of probs. One
  # custom VJP for all row blocks saves the whole q, k, v and out: under
  # by_mask's lax.switch, residuals that have the same shape in every branch
  # share a slot, and only the rest are written as zeros by the branches that
  # do not make them.
  return out, (q, k, v, bias, keep, probs, out)


def _sum_to_shape(x: Array, shape: tuple[int, ...]) -> Array:
  """Sums ``x`` over the axes that ``shape`` broadcasts (its gradient)."""
  lead = x.ndim - len(shape)
  axes = tuple(range(lead)) + tuple(
      lead + a for a, n in enumerate(shape) if n == 1 and x.shape[lead + a] != 1)
  return jnp.sum(x, axis=axes, keepdims=True).reshape(shape)


def _pad_keys(x: Array, kv_len: int) -> Array:
  """``[..., n, kv_end]`` -> ``[..., n, kv_len]`` with zeros for the keys a block skips."""
  pad = kv_len - x.shape[-1]
  return x if pad == 0 else jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)])


def _bwd(keep_scale, precision, causal_blocks, residuals, dout):
  q, k, v, bias, keep, probs, out = residuals
  einsum = functools.partial(jnp.einsum, precision=precision,
                             preferred_element_type=jnp.float32)
  blocks = causal_blocks or ((0, q.shape[-2], k.shape[-2]),)
  kv_len = k.shape[-2]
  dout_v = dout.astype(v.dtype)
  dqs, dks, dvs, dlogits_rows = [], [], [], []
  for (start, stop, kv_end), p in zip(blocks, probs):
    block_keep = _rows(keep, start, stop, kv_end)
    k_b, v_b, do_b = k[..., :kv_end, :], v[..., :kv_end, :], dout_v[..., start:stop, :]
    dvs.append((_dropped(p, block_keep, keep_scale).astype(v.dtype), do_b))
    dprobs = _dropped(einsum("...qd,...kd->...qk", do_b, v_b), block_keep, keep_scale)
    # Per block, not sliced from one [q, 1] array: XLA:CPU fuses dS into the
    # dP matmul only when δ is an operand of its own (is_causal fwd+bwd at
    # T=256 in a profile: 6.2 ms with the slice, 4.0 ms without).
    delta = jnp.sum(dout[..., start:stop, :].astype(jnp.float32) * out[..., start:stop, :],
                    axis=-1, keepdims=True)
    dlogits = p * (dprobs - delta)
    dqs.append(einsum("...qk,...kd->...qd", dlogits.astype(k.dtype), k_b))
    dks.append((dlogits.astype(q.dtype), q[..., start:stop, :]))
    if bias is not None:
      dlogits_rows.append(_pad_keys(dlogits, kv_len))

  def keys_sum(pairs):  # Σ over blocks of pᵀ x, each block's keys a prefix
    return pt_matmul_sum([p for p, _ in pairs], [x for _, x in pairs], kv_len, precision)

  dq = dqs[0] if len(dqs) == 1 else jnp.concatenate(dqs, axis=-2)
  dk, dv = keys_sum(dks), keys_sum(dvs)
  dbias = None
  if bias is not None:
    dlogits = dlogits_rows[0] if len(blocks) == 1 else jnp.concatenate(dlogits_rows, axis=-2)
    dbias = _sum_to_shape(dlogits, bias.shape).astype(bias.dtype)
  # Batch axes that q and k/v share by broadcasting get their gradients summed.
  return (_sum_to_shape(dq, q.shape).astype(q.dtype),
          _sum_to_shape(dk, k.shape).astype(k.dtype),
          _sum_to_shape(dv, v.shape).astype(v.dtype), dbias, None, None)


softmax_attention.defvjp(_fwd, _bwd)
