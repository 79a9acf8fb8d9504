"""``pᵀ @ x`` over the last two axes, in the form XLA:CPU runs fast.

The backward pass of attention needs two products that contract the *query*
axis, the leading axis of a ``[q, k]`` matrix: ``dV = Pᵀ dO`` and
``dK = dSᵀ Q``. XLA:CPU runs that transposed-operand form at about a third of
the speed of a plain ``[m, k] @ [k, n]`` matmul. For ``[32, 1024, 1024]ᵀ @
[32, 1024, 64]`` it took 46.1 ms on the 2-core AMD EPYC of
benchmarks/RESULTS.md, against 10.3 ms for the plain product with the same
FLOPs and 14.5 ms for :func:`pt_matmul` (113, 40 and 57 ms on the earlier
machine; ``python -m benchmarks.matmul_forms``, 2026-11-25). Before, these two
products were about half of an attention fwd+bwd.

:func:`pt_matmul` computes the transposed result ``xᵀ p`` (``[d, k]``)
instead. There the big operand ``p`` is in the plain ``[contracted, n]``
layout and only the small ``x`` is transposed. The ``[d, k]`` product is then
transposed back, a copy of ``d·k`` elements. ``optimization_barrier`` keeps XLA's
algebraic simplifier from folding that transpose into the dot, which would
recreate the slow form. :mod:`attention.projection` does the same for the weight
gradient of dense layers.

On other backends the vendor matmul takes transposed operands natively, so
there it is a plain ``einsum``. :func:`pt_matmul_sum` is the same for a sum of
such products over row blocks, as the causal row blocks of
:mod:`attention.softmax_attention` need.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array


def pt_matmul(p: Array, x: Array, precision: Any = None) -> Array:
  """``einsum("...qk,...qd->...kd", p, x)`` with float32 accumulation.

  Args:
    p: ``[..., q, k]``, e.g. attention probabilities ``[batch, heads, q_len, kv_len]``.
    x: ``[..., q, d]``, e.g. the output cotangent ``[batch, heads, q_len, head_dim]``.
    precision: matmul precision, as for ``jnp.einsum``.

  Returns:
    ``[..., k, d]`` float32.
  """
  return pt_matmul_sum([p], [x], p.shape[-1], precision)


def _xt_p(p: Array, x: Array, precision: Any) -> Array:
  """``xᵀ p`` (``[..., d, k]``), the form XLA:CPU runs fast for ``pᵀ x``."""
  return jnp.einsum("...qd,...qk->...dk", x, p, precision=precision,
                    preferred_element_type=jnp.float32)


def pt_matmul_sum(ps: list[Array], xs: list[Array], length: int,
                  precision: Any = None) -> Array:
  """``Σᵢ pᵢᵀ @ xᵢ`` where ``pᵢ`` covers the first ``pᵢ.shape[-1]`` of ``length`` rows.

  The key-gradients of attention computed by row blocks: block ``i`` sees keys
  ``[0, kv_endᵢ)`` only. On CPU the ``xᵢᵀ pᵢ`` products are zero-padded and
  summed in the ``[d, k]`` layout and transposed back once, instead of once per
  block (causal mask, B=4 H=8 T=1024, 8 blocks: the summing fusion took 13.9 ms
  with per-block transposes).

  Args:
    ps: ``[..., q_i, k_i]`` arrays, ``k_i <= length``.
    xs: ``[..., q_i, d]`` arrays, one per ``ps`` entry.
    length: the summed result's row count.
    precision: matmul precision, as for ``jnp.einsum``.

  Returns:
    ``[..., length, d]`` float32.
  """
  cpu = jax.default_backend() == "cpu"
  total = None
  for p, x in zip(ps, xs):
    if cpu:
      part = jax.lax.optimization_barrier(_xt_p(p, x, precision))
      widths = [(0, 0)] * (part.ndim - 1) + [(0, length - part.shape[-1])]
    else:
      part = jnp.einsum("...qk,...qd->...kd", p, x, precision=precision,
                        preferred_element_type=jnp.float32)
      widths = [(0, 0)] * (part.ndim - 2) + [(0, length - part.shape[-2]), (0, 0)]
    part = jnp.pad(part, widths) if any(w for _, w in widths) else part
    total = part if total is None else total + part
  return jnp.swapaxes(total, -1, -2) if cpu else total
