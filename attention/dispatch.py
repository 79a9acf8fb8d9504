"""Which backend ``dot_product_attention(implementation=None)`` runs.

The rule is per platform and per input (:func:`default_implementation`). On
CPU that is the C++ kernel of :mod:`attention.cpu_flash` wherever it applies
(compiled, no bias; attention dropout included). Without it, a mask array's
contents can decide at run time (:func:`by_mask`): a mask
that allows no key after its query runs ``"xla"`` with the causal row blocks
of ``is_causal`` (:func:`causal_row_blocks`), and from 512 tokens the tiled
backend runs when the tiles it would compute cost less than ``"xla"``'s
product. Every threshold below was measured; benchmarks/RESULTS.md has the
figures and commands.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp

from attention import chunked as _chunked
from attention import cpu_flash as _cpu_flash
from attention import huge_pages as _huge_pages
from attention.masks import causal_mask

Array = jax.Array

IMPLEMENTATIONS = ("xla", "chunked", "cudnn", "cpu_flash")

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
# tiles; `python -m benchmarks.attention_core --lengths 1024 --masks padding`,
# chunked over xla rows). With a mask array, implementation=None runs the tiled
# backend when its occupied tiles times this undercut the share of the logits
# "xla" computes. Huge pages (attention/huge_pages.py) speed "xla"'s large
# arrays up more than the tiled backend's tiles: huge pages 1.01-1.12 at
# T=1024 (1.29 at T=2048 in a throw-away script); 4 KiB pages 0.81-0.94.
_CHUNKED_TILE_COST = 0.9
_CHUNKED_TILE_COST_HUGE_PAGES = 1.2

# What taking the tiled branch of by_mask's lax.switch costs on top of its tiles,
# as a share of "xla"'s time: under jax.grad the "xla" branches not taken still
# write their [B, H, T, T] residuals, as zeros. Measured fwd+bwd, auto (tiles
# taken) minus the tiled backend alone, over "xla": 4 KiB pages, B=4 T=1024
# padding, (652 - 459) / 543 = 0.36; huge pages, B=1 T=2048 half-padded,
# (144 - 114) / 364 = 0.08 (`python -m benchmarks.attention_core`, 2026-11-25).
_SWITCH_ZEROS_COST = 0.35
_SWITCH_ZEROS_COST_HUGE_PAGES = 0.1

# What default_implementation returns when the mask's contents decide.
BY_MASK = "by mask"


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


def cpu_flash_applies(query: Array, *, bias: Any = None) -> bool:
  """Can :mod:`attention.cpu_flash` run these inputs here (CPU, kernel compiled)?

  It has no bias and computes in float32 (so not float64); dropout it has.
  """
  return (jax.default_backend() == "cpu" and bias is None
          and query.dtype in (jnp.float32, jnp.bfloat16, jnp.float16)
          and _cpu_flash.available())


def default_implementation(
    query: Array, key: Array, *, dropout: bool = False, is_causal: bool = False,
    mask: Array | None = None, bias: Array | None = None,
) -> str:
  """The backend ``implementation=None`` resolves to for these inputs.

  Returns one of :data:`IMPLEMENTATIONS`, or :data:`BY_MASK` when a mask array
  decides at run time on CPU (logits up to 512 MiB). On CPU:
  ``"cpu_flash"`` wherever :func:`cpu_flash_applies` (1.7-4.0x flax's
  fwd+bwd at T=256-4096 with every mask kind, benchmarks/RESULTS.md). Else,
  the rules below, measured before that kernel existed. On CPU without a mask
  array, from 512 tokens: the tiled backend when a tile costs less than
  ``"xla"``'s product (:data:`_CHUNKED_TILE_COST`, 4 KiB pages) and there is no
  ``is_causal``, else ``"xla"``. With a mask array:

  * at least 512 tokens: the tiled backend if the tiles it would compute
    (:func:`attention.chunked.occupied_tile_fraction`), plus the zero residuals
    the switch writes for the ``"xla"`` branches (:data:`_SWITCH_ZEROS_COST`),
    cost less than the logits ``"xla"`` computes;
  * otherwise ``"xla"``; when the mask has a query axis, allows no key after
    its query (:func:`mask_within_causal`, e.g. ``make_causal_mask``) and the
    sequence is long enough for :func:`causal_row_blocks`, with the row blocks
    of ``is_causal``, since then ``mask`` and ``mask & causal`` are the same.
  """
  if cpu_flash_applies(query, bias=bias):
    return "cpu_flash"
  if dropout:  # of the other backends, only "xla" has attention dropout
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
  # "xla" only while its [batch, heads, q, k] float32 arrays stay moderate.
  # Without a mask array: with is_causal, "xla"'s row blocks do no more work
  # than the tiles; otherwise the tiles win where a tile costs less than the
  # same share of "xla"'s product, i.e. with 4 KiB pages, where every large
  # "xla" buffer faults in page by page (no mask, fwd+bwd over "xla": 0.79 at
  # B=4 T=512, 0.63 at B=4 T=1024, 0.66 at B=1 T=2048; RESULTS.md). With a mask
  # array, which tiles are empty is data.
  batch = math.prod(jnp.broadcast_shapes(query.shape[:-3], key.shape[:-3]))
  logits_bytes = 4 * batch * query.shape[-2] * query.shape[-3] * key.shape[-3]
  if logits_bytes > _XLA_MAX_BYTES:
    return "chunked"
  if mask is None:
    return "chunked" if not is_causal and _tile_cost() < 1.0 else "xla"
  return BY_MASK


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
  return occupied * _tile_cost() + _switch_zeros_cost() < xla_share


def _tile_cost() -> float:
  """The tiled backend's fwd+bwd cost per tile over "xla"'s, for this process's pages."""
  return _CHUNKED_TILE_COST_HUGE_PAGES if _huge_pages.active() else _CHUNKED_TILE_COST


def _switch_zeros_cost() -> float:
  """Extra cost of the tiled branch of ``by_mask`` over "xla"'s time (zero residuals)."""
  return _SWITCH_ZEROS_COST_HUGE_PAGES if _huge_pages.active() else _SWITCH_ZEROS_COST


def by_mask(attend: Callable[..., Array], query, key, value, bias, mask, *,
            is_causal: bool, **options) -> Array:
  """Runs ``attend`` with the backend the mask's contents pick (CPU).

  ``attend`` is :func:`attention.core.dot_product_attention`; see
  :func:`default_implementation` for the rule.

  Every candidate is compiled and ``lax.switch`` runs one. Under ``jax.grad``
  the branches not taken still hand back their residuals, as zeros. Since the
  "xla" backend saves only ``P`` and its output (:mod:`attention.softmax_attention`),
  that costs less than rematerialising its forward pass: B=4 H=8 T=1024 fwd+bwd
  (``jax.value_and_grad``) against flax, causal mask array 1.32x with remat and
  1.81x without; padding mask 0.98x and 1.21x, where "xla" alone is 1.38x
  (``python -m benchmarks.attention_core --lengths 1024 --masks causal_mask padding``).
  JAX gives residuals of equal shape and dtype one slot for all branches, so
  every branch saves q, k, v and out as ``[batch, heads, T, head_dim]`` (the
  "xla" row blocks in one custom VJP, the tiled backend's grouped heads as a
  bitcast): only the probabilities, the tiled backend's mask and its
  log-sum-exp are zero-filled by the branches that lack them. Before, every
  row block's slices of q, k, v and out were too. The "xla" branch's
  zero-filled residuals with a padding mask, B=4 H=8: T=256, 18 buffers
  (15 MiB) before, 4 (5 MiB) now; T=1024, 42 (164 MiB) before, 10 (76 MiB)
  now (counted in the jaxpr of ``jax.value_and_grad``). The switch still
  costs: with a padding mask, auto took 111.9 ms against "xla"'s 101.4 at
  T=1024, and 10.3 against 8.0 at T=256, where a variant with no zero-filled
  residual at all was still 1.2 ms over (benchmarks/RESULTS.md). That cost
  comes with the backward pass (the forward alone: 0.1 ms at T=256). With row
  blocks, the backward pass slices q, k and v again across the conditional's
  boundary, where one program shares the forward's slices; with one product,
  the same matmuls run slower inside the switch (6.66 against 5.21 ms at
  T=256, per-op profile). Under jax.vmap
  with a batched mask the switch becomes a select and every branch runs: pass
  ``implementation`` there.
  """
  q_len, kv_len = query.shape[-3], key.shape[-3]

  def run(impl, causal):
    return lambda *a: attend(*a, implementation=impl, is_causal=causal, **options)

  branches = [run("xla", is_causal)]
  index = jnp.int32(0)
  xla_share = _xla_work_fraction(q_len, kv_len, is_causal)
  if _may_split_mask(query, key, mask, is_causal):
    within = mask_within_causal(mask, q_len, kv_len)
    branches.append(run("xla", True))
    index = jnp.where(within, len(branches) - 1, index)
    xla_share = jnp.where(within, _xla_work_fraction(q_len, kv_len, True), xla_share)
  if min(q_len, kv_len) >= _CHUNKED_MIN_LEN:
    branches.append(run("chunked", is_causal))
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
