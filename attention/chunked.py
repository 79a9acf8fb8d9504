"""Memory-efficient attention: online softmax over tiles, in pure JAX.

The forward pass walks ``[block_q, block_kv]`` tiles, keeping only a running
max, a running normaliser and an output accumulator per query (Milakov &
Gimelshein 2018; Rabe & Staats 2021; Dao et al. 2022). The backward pass is
written by hand (``jax.custom_vjp``): it recomputes each tile's probabilities
from the saved log-sum-exp, so neither pass ever holds a ``[q_len, kv_len]``
array. Peak memory is O(T * block) plus whatever mask/bias the caller passes.

Tiles are skipped, not just masked:

* with ``is_causal`` the key loop of query block ``i`` stops at the last block
  that holds a key ``<= `` the block's last query (a dynamic loop bound);
* with a mask array, a tile whose mask is all False is skipped by ``lax.cond``,
  so a causal or padding mask given as an array costs about what
  ``is_causal`` costs.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from attention.masks import causal_mask
from attention.transposed_matmul import pt_matmul

# Finite stand-in for -inf: exp(NEG_INF - m) underflows to 0 and max() of a
# fully masked row stays finite, so no inf - inf = NaN can arise.
NEG_INF = -1e30

# Tiles of about this many logits (over batch and heads), twice as tall as
# wide, measured fastest on CPU (fwd+bwd over "xla"'s, B=4 H=8 T=1024 padded,
# no tile to skip, `python -m benchmarks.attention_core --lengths 1024 --masks
# padding --blocks 128x128 256x256 512x256`: 1.95, 1.55, 1.01). Smaller tiles pay XLA:CPU's per-kernel cost more
# often; larger ones skip less and hold more memory. B=4 H=8 -> 512x256,
# B=1 H=8 -> 1024x512.
_TILE_ELEMENTS = 4 * 1024 * 1024
_MIN_BLOCK, _MAX_BLOCK_KV, _MAX_BLOCK_Q = 128, 512, 1024


def default_block(batch_heads: int) -> tuple[int, int]:
  """``(block_q, block_kv)`` for ``batch_heads`` = batch * query heads."""
  side = math.isqrt(max(_TILE_ELEMENTS // (2 * max(batch_heads, 1)), 1))
  side = 1 << (side.bit_length() - 1)  # round down to a power of two
  block_kv = int(min(max(side, _MIN_BLOCK), _MAX_BLOCK_KV))
  return min(2 * block_kv, _MAX_BLOCK_Q), block_kv


class _Config(NamedTuple):
  is_causal: bool
  scale: float
  block_q: int
  block_kv: int
  kv_len: int       # unpadded key length, to mask padded keys
  precision: Any


def _ceil_div(a: int, b: int) -> int:
  return -(-a // b)


def _slice_tile(x, i, j, cfg: _Config, q_pad: int, k_pad: int):
  """Slices tile (i, j) out of a 5-D mask/bias whose q/k dims are 1 or padded length."""
  if x.shape[-2] == q_pad and q_pad != 1:
    x = lax.dynamic_slice_in_dim(x, i * cfg.block_q, cfg.block_q, axis=-2)
  if x.shape[-1] == k_pad and k_pad != 1:
    x = lax.dynamic_slice_in_dim(x, j * cfg.block_kv, cfg.block_kv, axis=-1)
  return x


def _position_mask(i, j, cfg: _Config, k_pad: int):
  """Causal and key-padding constraints of tile (i, j), or None if there are none."""
  need_pad = k_pad != cfg.kv_len
  if not (cfg.is_causal or need_pad):
    return None
  qpos = i * cfg.block_q + lax.broadcasted_iota(jnp.int32, (cfg.block_q, cfg.block_kv), 0)
  kpos = j * cfg.block_kv + lax.broadcasted_iota(jnp.int32, (cfg.block_q, cfg.block_kv), 1)
  ok = None
  if cfg.is_causal:
    ok = kpos <= qpos
  if need_pad:
    ok = (kpos < cfg.kv_len) if ok is None else ok & (kpos < cfg.kv_len)
  return ok


def _fold(x, groups: int):
  """``[b, h, groups, rows, ...]`` -> ``[b, h, groups * rows, ...]`` (a bitcast).

  Tiles are computed with the query groups folded into the rows: with a 5-D
  ``bhgqk`` layout the backward contractions over ``(g, q)`` made XLA:CPU
  transpose and copy every probability tile (fwd+bwd of one 1024 x 1024 tile,
  B=4 H=8: 776 ms unfolded, 456 ms folded, 370 ms for "xla").
  """
  return x.reshape(x.shape[:2] + (groups * x.shape[3],) + x.shape[4:])


def _unfold(x, groups: int):
  """Inverse of :func:`_fold`."""
  return x.reshape(x.shape[:2] + (groups, x.shape[2] // groups) + x.shape[3:])


def _fold_tile(x, groups: int, block_q: int):
  """A 5-D mask/bias tile ``[B|1, H|1, g|1, bq|1, bk|1]`` -> 4-D ``[B|1, H|1, (g*bq)|1, bk|1]``."""
  if x.shape[2] == 1 and x.shape[3] == 1:
    return x[:, :, 0]
  x = jnp.broadcast_to(x, x.shape[:2] + (groups, block_q) + x.shape[4:])
  return _fold(x, groups)


def _tile_inputs(i, j, bias, mask, cfg, q_pad, k_pad, positional, groups):
  """Mask and bias of tile (i, j), folded to ``[B|1, H|1, (g*bq)|1, bk|1]``."""
  user_mask = None if mask is None else _fold_tile(
      _slice_tile(mask, i, j, cfg, q_pad, k_pad), groups, cfg.block_q)
  pos = _position_mask(i, j, cfg, k_pad) if positional else None
  if pos is not None and groups > 1:
    pos = jnp.tile(pos, (groups, 1))
  if user_mask is None:
    full_mask = pos
  elif pos is None:
    full_mask = user_mask
  else:
    full_mask = user_mask & pos
  tile_bias = None if bias is None else _fold_tile(
      _slice_tile(bias, i, j, cfg, q_pad, k_pad), groups, cfg.block_q)
  return full_mask, tile_bias


def _tile_occupancy(mask, cfg: _Config, q_pad: int, k_pad: int):
  """``[n_q, n_kv]`` bool: does tile (i, j) of the mask allow any (query, key) pair?

  One pass over the mask, before the loops, so each tile's skip test is a
  scalar lookup and each query block's key loop can start at its first and
  stop after its last occupied tile (a causal mask array then costs what
  ``is_causal`` costs).
  """
  if mask is None:
    return None
  n_q, n_kv = q_pad // cfg.block_q, k_pad // cfg.block_kv
  m = jnp.any(mask, axis=(0, 1, 2))                       # [Tq_pad|1, Tk_pad|1]
  rows = n_q if m.shape[0] != 1 else 1
  cols = n_kv if m.shape[1] != 1 else 1
  m = m.reshape(rows, m.shape[0] // rows, cols, m.shape[1] // cols).any(axis=(1, 3))
  return jnp.broadcast_to(m, (n_q, n_kv))


def _kv_ranges(i, cfg: _Config, n_kv: int, k_pad: int, occupancy):
  """Key blocks of query block i: ``[a, b)`` need no positional mask, ``[b, c)``
  do (the causal diagonal and the padded last block)."""
  n_end = n_kv
  n_free = n_kv - (1 if k_pad != cfg.kv_len else 0)
  if cfg.is_causal:
    last_q = (i + 1) * cfg.block_q - 1
    n_end = jnp.minimum(last_q // cfg.block_kv + 1, n_kv)
    # Block j is wholly visible when its last key <= the block's first query.
    n_free = jnp.minimum((i * cfg.block_q + 1) // cfg.block_kv, n_free)
  lo, hi = 0, n_kv
  if occupancy is not None:
    row = occupancy[i]
    lo = jnp.where(jnp.any(row), jnp.argmax(row), 0)
    hi = jnp.where(jnp.any(row), n_kv - jnp.argmax(row[::-1]), 0)
  a = jnp.asarray(lo, jnp.int32)
  b = jnp.maximum(a, jnp.minimum(n_free, hi))
  c = jnp.maximum(b, jnp.minimum(n_end, hi))
  return a, b, c


def _loop_tiles(i, cfg, n_kv, k_pad, occupancy, make_step, init):
  """Runs ``make_step(positional)`` over the key blocks query block i needs."""
  a, b, c = _kv_ranges(i, cfg, n_kv, k_pad, occupancy)
  carry = lax.fori_loop(a, b, make_step(False), init)
  return lax.fori_loop(b, c, make_step(True), carry)


def _maybe_skip(occupied, compute, skip, carry):
  if occupied is None:
    return compute(carry)
  return lax.cond(occupied, compute, skip, carry)


def _logits(q_i, k_j, tile_bias, full_mask, cfg):
  s = jnp.einsum("bhqd,bhkd->bhqk", q_i, k_j, precision=cfg.precision,
                 preferred_element_type=jnp.float32)
  if tile_bias is not None:
    s = s + tile_bias.astype(jnp.float32)
  if full_mask is not None:
    s = jnp.where(full_mask, s, NEG_INF)
  return s


def _forward(cfg: _Config, q, k, v, bias, mask):
  """q ``[B,Hkv,G,Tq_pad,D]`` (pre-scaled), k/v ``[B,Hkv,Tk_pad,D]`` -> out, lse."""
  b, hk, g, q_pad, _ = q.shape
  k_pad, dv = k.shape[2], v.shape[-1]
  n_q, n_kv = q_pad // cfg.block_q, k_pad // cfg.block_kv
  q_blocks = jnp.moveaxis(q.reshape(b, hk, g, n_q, cfg.block_q, -1), 3, 0)
  occupancy = _tile_occupancy(mask, cfg, q_pad, k_pad)

  def q_step(_, inp):
    i, q_i = inp
    q_i = _fold(q_i, g)                                    # [b, hk, g*bq, d]

    def make_step(positional):
      def kv_step(j, carry):
        full_mask, tile_bias = _tile_inputs(i, j, bias, mask, cfg, q_pad, k_pad,
                                            positional, g)
        k_j = lax.dynamic_slice_in_dim(k, j * cfg.block_kv, cfg.block_kv, axis=2)
        v_j = lax.dynamic_slice_in_dim(v, j * cfg.block_kv, cfg.block_kv, axis=2)

        def compute(carry):
          m, l, acc = carry
          s = _logits(q_i, k_j, tile_bias, full_mask, cfg)
          m_new = jnp.maximum(m, jnp.max(s, axis=-1))
          p = jnp.exp(s - m_new[..., None])
          if full_mask is not None:
            p = jnp.where(full_mask, p, 0.0)
          corr = jnp.exp(m - m_new)
          l = l * corr + jnp.sum(p, axis=-1)
          pv = jnp.einsum("bhqk,bhkd->bhqd", p.astype(v.dtype), v_j,
                          precision=cfg.precision, preferred_element_type=jnp.float32)
          return m_new, l, acc * corr[..., None] + pv

        occupied = None if occupancy is None else occupancy[i, j]
        return _maybe_skip(occupied, compute, lambda c: c, carry)
      return kv_step

    init = (
        jnp.full((b, hk, g * cfg.block_q), NEG_INF, jnp.float32),
        jnp.zeros((b, hk, g * cfg.block_q), jnp.float32),
        jnp.zeros((b, hk, g * cfg.block_q, dv), jnp.float32),
    )
    m, l, acc = _loop_tiles(i, cfg, n_kv, k_pad, occupancy, make_step, init)
    has_keys = l > 0
    out = acc / jnp.where(has_keys, l, 1.0)[..., None]
    # Rows with no key keep lse = 0; their recomputed probabilities are
    # zeroed by the mask in the backward pass.
    lse = jnp.where(has_keys, m + jnp.log(jnp.where(has_keys, l, 1.0)), 0.0)
    return None, (_unfold(out.astype(q.dtype), g), _unfold(lse, g))

  _, (out, lse) = lax.scan(q_step, None, (jnp.arange(n_q), q_blocks))
  out = jnp.moveaxis(out, 0, 3).reshape(b, hk, g, q_pad, dv)
  lse = jnp.moveaxis(lse, 0, 3).reshape(b, hk, g, q_pad)
  return out, lse


def _backward(cfg: _Config, q, k, v, bias, mask, out, lse, dout):
  b, hk, g, q_pad, d = q.shape
  k_pad = k.shape[2]
  n_q, n_kv = q_pad // cfg.block_q, k_pad // cfg.block_kv
  delta = jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)

  def blocks(x):
    return jnp.moveaxis(x.reshape(x.shape[:3] + (n_q, cfg.block_q) + x.shape[4:]), 3, 0)

  occupancy = _tile_occupancy(mask, cfg, q_pad, k_pad)

  def q_step(carry, inp):
    i, q_i, do_i, lse_i, delta_i = (inp[0],) + tuple(_fold(x, g) for x in inp[1:])
    ein = functools.partial(jnp.einsum, precision=cfg.precision,
                            preferred_element_type=jnp.float32)

    def make_step(positional):
      def kv_step(j, c):
        full_mask, tile_bias = _tile_inputs(i, j, bias, mask, cfg, q_pad, k_pad,
                                            positional, g)
        k_j = lax.dynamic_slice_in_dim(k, j * cfg.block_kv, cfg.block_kv, axis=2)
        v_j = lax.dynamic_slice_in_dim(v, j * cfg.block_kv, cfg.block_kv, axis=2)

        # The cond carries only tile-sized values: threading the full dK/dV
        # buffers through it would copy them for every tile.
        def compute(dq_i):
          s = _logits(q_i, k_j, tile_bias, full_mask, cfg)
          p = jnp.exp(s - lse_i[..., None])
          if full_mask is not None:
            p = jnp.where(full_mask, p, 0.0)
          dv_j = pt_matmul(p.astype(do_i.dtype), do_i, cfg.precision)
          dp = ein("bhqd,bhkd->bhqk", do_i, v_j)
          ds = p * (dp - delta_i[..., None])
          dq_i = dq_i + ein("bhqk,bhkd->bhqd", ds.astype(k_j.dtype), k_j)
          dk_j = pt_matmul(ds.astype(q_i.dtype), q_i, cfg.precision)
          return dq_i, dk_j, dv_j, ds if bias is not None else None

        def skip(dq_i):
          ds = (jnp.zeros(q_i.shape[:3] + (cfg.block_kv,), jnp.float32)
                if bias is not None else None)
          return dq_i, jnp.zeros(k_j.shape, jnp.float32), jnp.zeros(v_j.shape, jnp.float32), ds

        dk, dv, dbias, dq_i = c
        occupied = None if occupancy is None else occupancy[i, j]
        dq_i, dk_j, dv_j, ds = _maybe_skip(occupied, compute, skip, dq_i)
        at = j * cfg.block_kv
        dk = lax.dynamic_update_slice_in_dim(
            dk, lax.dynamic_slice_in_dim(dk, at, cfg.block_kv, 2) + dk_j, at, 2)
        dv = lax.dynamic_update_slice_in_dim(
            dv, lax.dynamic_slice_in_dim(dv, at, cfg.block_kv, 2) + dv_j, at, 2)
        if dbias is not None:
          dbias = _accumulate_bias_grad(dbias, _unfold(ds, g), i, j, cfg, q_pad, k_pad)
        return dk, dv, dbias, dq_i
      return kv_step

    dk, dv, dbias = carry
    dq_i = jnp.zeros(q_i.shape, jnp.float32)
    dk, dv, dbias, dq_i = _loop_tiles(i, cfg, n_kv, k_pad, occupancy, make_step,
                                      (dk, dv, dbias, dq_i))
    return (dk, dv, dbias), _unfold(dq_i, g)

  init = (
      jnp.zeros(k.shape, jnp.float32),
      jnp.zeros(v.shape, jnp.float32),
      None if bias is None else jnp.zeros(bias.shape, jnp.float32),
  )
  xs = (jnp.arange(n_q), blocks(q), blocks(dout), blocks(lse[..., None])[..., 0],
        blocks(delta[..., None])[..., 0])
  (dk, dv, dbias), dq = lax.scan(q_step, init, xs)
  dq = jnp.moveaxis(dq, 0, 3).reshape(q.shape)
  return dq, dk, dv, dbias


def _accumulate_bias_grad(dbias, ds, i, j, cfg, q_pad, k_pad):
  """Adds tile (i, j) of dL/dlogits to a bias gradient of broadcast shape."""
  axes = tuple(a for a in range(5) if dbias.shape[a] == 1 and ds.shape[a] != 1)
  tile = jnp.sum(ds, axis=axes, keepdims=True)
  start = [0, 0, 0, 0, 0]
  if dbias.shape[-2] == q_pad and q_pad != 1:
    start[3] = i * cfg.block_q
  if dbias.shape[-1] == k_pad and k_pad != 1:
    start[4] = j * cfg.block_kv
  old = lax.dynamic_slice(dbias, start, tile.shape)
  return lax.dynamic_update_slice(dbias, old + tile, start)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(cfg, q, k, v, bias, mask):
  return _forward(cfg, q, k, v, bias, mask)[0]


def _flash_fwd(cfg, q, k, v, bias, mask):
  out, lse = _forward(cfg, q, k, v, bias, mask)
  # q and out saved as [B, heads, T, D] (a bitcast of [B, kv_heads, groups, T, D]):
  # under implementation=None's lax.switch, a residual with the shape of one the
  # "xla" branch saves shares its slot instead of being written as zeros there.
  return out, (_heads_4d(q), k, v, bias, mask, _heads_4d(out), lse)


def _heads_4d(x):
  return x.reshape((x.shape[0], x.shape[1] * x.shape[2]) + x.shape[3:])


def _flash_bwd(cfg, res, dout):
  q, k, v, bias, mask, out, lse = res
  q = q.reshape(dout.shape[:3] + q.shape[2:])
  out = out.reshape(dout.shape)
  dq, dk, dv, dbias = _backward(cfg, q, k, v, bias, mask, out, lse, dout)
  dbias = None if bias is None else dbias.astype(bias.dtype)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), dbias, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def _flatten_batch(x, batch, n_batch):
  """``[batch..., *rest]`` (broadcastable) -> ``[B|1, *rest]``."""
  if x is None:
    return None
  lead = x.shape[:n_batch]
  if all(d == 1 for d in lead):
    return x.reshape((1,) + x.shape[n_batch:])
  return jnp.broadcast_to(x, batch + x.shape[n_batch:]).reshape((-1,) + x.shape[n_batch:])


def _pad_axis(x, axis, new_len, value):
  pad = new_len - x.shape[axis]
  if pad == 0 or x.shape[axis] == 1:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, pad)
  return jnp.pad(x, widths, constant_values=value)


def check_block(name: str, block) -> None:
  """Raises unless ``block`` is None (the default tile) or an int >= 1.

  Checked rather than trusted: ``block or default`` would silently turn 0
  into the default, and a negative side would fail deep inside a reshape.
  """
  if block is None:
    return
  if isinstance(block, (bool, np.bool_)) or not isinstance(block, (int, np.integer)):
    raise TypeError(f"{name} must be an int or None, got {block!r}.")
  if block < 1:
    raise ValueError(f"{name}={block} must be >= 1; pass None for the default tile.")


def _tiling(batch_heads, q_len, kv_len, block_q, block_kv):
  """``(block_q, block_kv, q_pad, k_pad)``: tile sides (default, capped at the
  lengths) and the lengths padded to whole tiles."""
  check_block("block_q", block_q)
  check_block("block_kv", block_kv)
  auto_q, auto_kv = default_block(batch_heads)
  bq, bk = min(block_q or auto_q, q_len), min(block_kv or auto_kv, kv_len)
  return bq, bk, _ceil_div(q_len, bq) * bq, _ceil_div(kv_len, bk) * bk


def occupied_tile_fraction(query, key, mask, *, is_causal=False, block_q=None,
                           block_kv=None):
  """Fraction of the tiles :func:`attention` would compute (float32 scalar).

  A tile counts unless the mask (with ``is_causal``, the causal rule too)
  leaves it no (query, key) pair for any example and head, with the tile sizes
  :func:`attention` uses. This is :func:`attention`'s skip test, except that
  :func:`attention` also computes a diagonal tile whose mask allows only
  future pairs. The estimate can be slightly low in that case.

  Args:
    query: ``[batch..., q_len, heads, head_dim]`` (only its shape is read).
    key: ``[batch..., kv_len, kv_heads, head_dim]`` (only its shape is read).
    mask: boolean, broadcastable to ``[batch..., heads, q_len, kv_len]``.
    is_causal: also rule out keys after each query.
    block_q: query tile, as for :func:`attention`.
    block_kv: key tile, as for :func:`attention`.
  """
  batch = jnp.broadcast_shapes(query.shape[:-3], key.shape[:-3])
  q_len, heads = query.shape[-3], query.shape[-2]
  kv_len = key.shape[-3]
  bq, bk, q_pad, k_pad = _tiling(math.prod(batch) * heads, q_len, kv_len, block_q, block_kv)
  m = jnp.reshape(mask, (1,) * max(0, 2 - mask.ndim) + mask.shape)
  m = jnp.any(m, axis=tuple(range(m.ndim - 2)))          # over batch and heads
  m = jnp.broadcast_to(m, (q_len, kv_len))
  if is_causal:
    m = m & causal_mask(q_len, kv_len)
  m = jnp.pad(m, ((0, q_pad - q_len), (0, k_pad - kv_len)))
  tiles = m.reshape(q_pad // bq, bq, k_pad // bk, bk).any(axis=(1, 3))
  return jnp.mean(tiles.astype(jnp.float32))


def attention(query, key, value, bias=None, mask=None, *, is_causal=False, scale=None,
              block_q=None, block_kv=None, precision=None):
  """Tiled attention; same contract as :func:`attention.core.dot_product_attention`.

  Args:
    query: ``[batch..., q_len, heads, head_dim]``.
    key: ``[batch..., kv_len, kv_heads, head_dim]``.
    value: ``[batch..., kv_len, kv_heads, v_head_dim]``.
    bias: optional, broadcastable to ``[batch..., heads, q_len, kv_len]``.
    mask: optional boolean (or float 0/1, nonzero = attend), broadcastable
      like ``bias``; True = attend.
    is_causal: top-left aligned causal attention (a Python bool); future key
      blocks are skipped.
    scale: logit scale, default ``1/sqrt(head_dim)``.
    block_q: query tile, >= 1 (default :func:`default_block`, capped at q_len).
    block_kv: key tile, >= 1 (default :func:`default_block`, capped at kv_len).
    precision: matmul precision.

  Returns:
    ``[batch..., q_len, heads, v_head_dim]``.
  """
  # local: core imports this module
  from attention.core import check_is_causal, checked_mask_bias, grouped

  # The same checks as dot_product_attention's, for direct callers: tiles
  # slice a mask/bias by its trailing dims, so a wrong shape gives wrong
  # values rather than an error.
  check_is_causal(is_causal)
  mask, bias = checked_mask_bias(mask, bias, query, key)
  batch = jnp.broadcast_shapes(query.shape[:-3], key.shape[:-3])
  nb = len(batch)
  q_len, heads, d = query.shape[-3:]
  kv_len, kv_heads = key.shape[-3], key.shape[-2]
  groups = heads // kv_heads
  scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
  bq, bk, q_pad, k_pad = _tiling(math.prod(batch) * heads, q_len, kv_len, block_q, block_kv)
  cfg = _Config(bool(is_causal), scale, bq, bk, kv_len, precision)

  def heads_first(x, n):  # [B, T, kvh, (g,) D] -> [B, kvh, (g,) T, D]
    return jnp.moveaxis(x, 1, n)

  q = _flatten_batch(jnp.broadcast_to(query, batch + query.shape[-3:]), batch, nb)
  q = q.reshape(q.shape[:2] + (kv_heads, groups, d)) * jnp.asarray(scale, query.dtype)
  q = _pad_axis(heads_first(q, 3), 3, q_pad, 0)
  k = _pad_axis(heads_first(_flatten_batch(jnp.broadcast_to(key, batch + key.shape[-3:]), batch, nb), 2), 2, k_pad, 0)
  v = _pad_axis(heads_first(_flatten_batch(jnp.broadcast_to(value, batch + value.shape[-3:]), batch, nb), 2), 2, k_pad, 0)

  def prep(x, fill):
    x = _flatten_batch(grouped(x, nb, heads, groups), batch, nb)
    if x is None:
      return None
    return _pad_axis(_pad_axis(x, 3, q_pad, fill), 4, k_pad, fill)

  out = _flash(cfg, q, k, v, prep(bias, 0), prep(mask, False))
  out = jnp.moveaxis(out[:, :, :, :q_len], 3, 1)  # [B, T, kvh, g, Dv]
  out = out.reshape(batch + (q_len, heads, out.shape[-1]))
  return out
