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

from attention.masks import masked_softmax
from attention.transposed_matmul import pt_matmul

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


def _forward(q, k, v, bias, mask, keep, keep_scale, precision):
  probs = attention_probs(q, k, bias, mask, precision)
  out = jnp.einsum("...qk,...kd->...qd", _dropped(probs, keep, keep_scale).astype(v.dtype),
                   v, precision=precision, preferred_element_type=jnp.float32)
  return out, probs


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def softmax_attention(q: Array, k: Array, v: Array, bias: Array | None,
                      mask: Array | None, keep: Array | None,
                      keep_scale: float = 1.0, precision: Any = None) -> Array:
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

  Returns:
    ``[..., heads, q_len, v_head_dim]`` float32.
  """
  return _forward(q, k, v, bias, mask, keep, keep_scale, precision)[0]


def _fwd(q, k, v, bias, mask, keep, keep_scale, precision):
  out, probs = _forward(q, k, v, bias, mask, keep, keep_scale, precision)
  # The mask is not needed backwards: it is already in the zeros of probs.
  return out, (q, k, v, bias, keep, probs, out)


def _sum_to_shape(x: Array, shape: tuple[int, ...]) -> Array:
  """Sums ``x`` over the axes that ``shape`` broadcasts (its gradient)."""
  lead = x.ndim - len(shape)
  axes = tuple(range(lead)) + tuple(
      lead + a for a, n in enumerate(shape) if n == 1 and x.shape[lead + a] != 1)
  return jnp.sum(x, axis=axes, keepdims=True).reshape(shape)


def _bwd(keep_scale, precision, residuals, dout):
  q, k, v, bias, keep, probs, out = residuals
  einsum = functools.partial(jnp.einsum, precision=precision,
                             preferred_element_type=jnp.float32)
  dout_v = dout.astype(v.dtype)
  dv = pt_matmul(_dropped(probs, keep, keep_scale).astype(v.dtype), dout_v, precision)
  dprobs = _dropped(einsum("...qd,...kd->...qk", dout_v, v), keep, keep_scale)
  delta = jnp.sum(dout.astype(jnp.float32) * out, axis=-1, keepdims=True)
  dlogits = probs * (dprobs - delta)
  dq = einsum("...qk,...kd->...qd", dlogits.astype(k.dtype), k)
  dk = pt_matmul(dlogits.astype(q.dtype), q, precision)
  dbias = None if bias is None else _sum_to_shape(dlogits, bias.shape).astype(bias.dtype)
  # Batch axes that q and k/v share by broadcasting get their gradients summed.
  return (_sum_to_shape(dq, q.shape).astype(q.dtype),
          _sum_to_shape(dk, k.shape).astype(k.dtype),
          _sum_to_shape(dv, v.shape).astype(v.dtype), dbias, None, None)


softmax_attention.defvjp(_fwd, _bwd)
