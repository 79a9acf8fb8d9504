"""FlashAttention on the CPU: a C++ kernel behind XLA's FFI (``implementation="cpu_flash"``).

XLA:CPU runs attention as separate ops with ``[batch, heads, q, k]`` arrays
between them, and on a CPU the memory traffic of those arrays is most of the
time. ``csrc/cpu_flash.cc`` keeps every ``[72, 144]`` tile of logits
(``[72, 128]`` with AVX-512) in cache: the forward pass is an online softmax
over key blocks that saves one log-sum-exp per query row, and the backward
pass recomputes each tile's probabilities from it (Dao et al. 2022). Tiles
that ``is_causal`` or the mask rules out entirely are skipped, whatever the
mask's pattern, so a causal or padding mask array costs what it removes.
Memory is O(T·D): no float ``[q, k]`` array exists in either pass. The work
runs on XLA's intra-op thread pool.

The kernel is compiled once per machine with the system C++ compiler
(``$CXX``, else ``c++``; ``-O3 -march=native``) against the FFI headers that
ship with jaxlib, at first use, into ``$ATTENTION_KERNEL_CACHE`` (default
``~/.cache/attention``), keyed by the source, the flags, jaxlib's version and
the CPU. Without a compiler, :func:`available` is False and
``implementation=None`` keeps to the XLA backends; ``ATTENTION_CPU_FLASH=0``
turns it off.

What it covers: float32 compute (bf16/fp16 inputs are upcast), boolean masks
broadcastable to ``[batch..., heads, q_len, kv_len]``, ``is_causal``,
grouped-query attention, ``jit``, ``grad``, ``vmap`` and data parallelism
(each device runs the kernel on its own batch shard; a custom partitioning
rule keeps XLA from gathering the batch), and attention dropout, given as the
boolean keep pattern ``"xla"`` draws (:func:`attention.dropout.keep_mask`), so
both backends drop the same weights for one key. That pattern is a
``[q_len, kv_len]`` bool array (``[batch..., heads, q_len, kv_len]`` without
``broadcast_dropout``), a quarter of the float32 logits' bytes or less; the
rest of the memory stays O(T·D). What it does not: a logit bias (use
``"xla"`` or ``"chunked"``) and forward-mode differentiation.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile
import threading

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.custom_partitioning import custom_partitioning
from jax.experimental.custom_partitioning import ArrayMapping, SdyShardingRule
from jax.sharding import NamedSharding, PartitionSpec

Array = jax.Array

_SOURCE = pathlib.Path(__file__).with_name("csrc") / "cpu_flash.cc"
_FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w",
          "-fno-math-errno", "-fno-trapping-math")
_FWD, _BWD = "attention_cpu_flash_fwd", "attention_cpu_flash_bwd"
_COMPILE_TIMEOUT_S = 600

_log = logging.getLogger(__name__)
_lock = threading.Lock()
_status: dict[str, object] = {}  # "ok": bool, "reason": why not


def available() -> bool:
  """Can this process run the kernel? Compiles and loads it on first call (CPU only)."""
  with _lock:
    if "ok" not in _status:
      try:
        _load()
        _status["ok"] = True
      except Exception as e:  # no compiler, no headers, read-only cache, ...
        _status["ok"] = False
        _status["reason"] = f"{type(e).__name__}: {e}"
        _log.warning("attention.cpu_flash unavailable (%s); using the XLA backends.",
                     _status["reason"])
    return bool(_status["ok"])


def unavailable_reason() -> str | None:
  """Why :func:`available` is False, in one line; None when it is True."""
  return None if available() else str(_status["reason"])


def cache_dir() -> pathlib.Path:
  """Where compiled kernels are kept: ``$ATTENTION_KERNEL_CACHE``, else ``~/.cache/attention``."""
  if os.environ.get("ATTENTION_KERNEL_CACHE"):
    return pathlib.Path(os.environ["ATTENTION_KERNEL_CACHE"])
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return pathlib.Path(base) / "attention"


def _cpu_signature() -> str:
  """What -march=native depends on: a kernel built for one CPU may not run on another."""
  try:
    with open("/proc/cpuinfo") as f:
      lines = [l for l in f if l.startswith(("flags", "model name", "Features", "CPU part"))]
    return "".join(sorted(set(lines)))
  except OSError:
    return f"{platform.machine()} {platform.processor()}"


def library_path(compiler: str) -> pathlib.Path:
  """The cached shared library for this source, compiler, jaxlib and CPU."""
  import jaxlib
  key = hashlib.sha256()
  for part in (_SOURCE.read_bytes(), " ".join(_FLAGS).encode(), compiler.encode(),
               jaxlib.__version__.encode(), _cpu_signature().encode()):
    key.update(part)
    key.update(b"\0")
  return cache_dir() / f"cpu_flash-{key.hexdigest()[:20]}.so"


def _compile(compiler: str, out: pathlib.Path) -> None:
  out.parent.mkdir(parents=True, exist_ok=True)
  # Several processes (tests, multi-host runs) may build at once: each writes
  # its own file and renames it into place, which is atomic.
  fd, tmp = tempfile.mkstemp(prefix=out.name, suffix=".tmp", dir=out.parent)
  os.close(fd)
  cmd = [compiler, *_FLAGS, f"-I{jax.ffi.include_dir()}", str(_SOURCE), "-o", tmp]
  _log.info("attention.cpu_flash: compiling the CPU attention kernel once, into %s", out)
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=_COMPILE_TIMEOUT_S)
    if proc.returncode:
      lines = [l for l in proc.stderr.splitlines() if "error" in l] or proc.stderr.splitlines()
      raise RuntimeError(f"{compiler} failed: {lines[0] if lines else proc.returncode}")
    os.replace(tmp, out)
  finally:
    if os.path.exists(tmp):
      os.unlink(tmp)


def _load() -> None:
  if os.environ.get("ATTENTION_CPU_FLASH", "1") == "0":
    raise RuntimeError("disabled by ATTENTION_CPU_FLASH=0")
  compiler = os.environ.get("CXX") or "c++"
  if not shutil.which(compiler):
    raise RuntimeError(f"no C++ compiler {compiler!r} on PATH (set CXX)")
  path = library_path(compiler)
  if not path.exists():
    _compile(compiler, path)
  lib = ctypes.cdll.LoadLibrary(str(path))
  jax.ffi.register_ffi_target(_FWD, jax.ffi.pycapsule(lib.AttentionCpuFlashForward),
                              platform="cpu")
  jax.ffi.register_ffi_target(_BWD, jax.ffi.pycapsule(lib.AttentionCpuFlashBackward),
                              platform="cpu")


# ---------------------------------------------------------------------------
# The two FFI calls. Shapes (B = one or more batch dims, shared by all):
#   fwd: q [B,Tq,H,D], k [B,Tk,Hkv,D], v [B,Tk,Hkv,Dv], mask, keep -> o [B,Tq,H,Dv], lse [B,H,Tq]
#   bwd: q, k, v, do, lse, delta [B,H,Tq], mask, keep -> dq, dk, dv
# The mask and dropout's keep pattern have q's rank, each dim 1 or full;
# without one, a [1, ..., 1] dummy.

def _f32(shape) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(shape, jnp.float32)


def _fwd_impl(q, k, v, mask, keep, causal, has_mask, has_keep, keep_scale):
  lse_shape = q.shape[:-3] + (q.shape[-2], q.shape[-3])
  return jax.ffi.ffi_call(_FWD, (_f32(q.shape[:-1] + v.shape[-1:]), _f32(lse_shape)))(
      q, k, v, mask, keep, causal=causal, has_mask=has_mask, has_keep=has_keep,
      keep_scale=np.float32(keep_scale))


def _bwd_impl(q, k, v, dout, lse, delta, mask, keep, causal, has_mask, has_keep, keep_scale):
  return jax.ffi.ffi_call(_BWD, (_f32(q.shape), _f32(k.shape), _f32(v.shape)))(
      q, k, v, dout, lse, delta, mask, keep, causal=causal, has_mask=has_mask,
      has_keep=has_keep, keep_scale=np.float32(keep_scale))


# Data parallelism: every operand and result is split along the batch dims
# the way q is; the other dims stay whole on each device.

def _batch_spec(shape) -> tuple:
  spec = tuple(shape.sharding.spec) + (None,) * len(shape.shape)
  return spec[:len(shape.shape) - 3]


def _along_batch(mesh, batch, shape, like=None) -> NamedSharding:
  """``batch`` on the leading dims of ``shape`` (only where it matches ``like``'s dim)."""
  lead = tuple(b if like is None or (shape[i] == like[i] and shape[i] > 1) else None
               for i, b in enumerate(batch))
  return NamedSharding(mesh, PartitionSpec(*lead, *([None] * (len(shape) - len(lead)))))


def _shardings(mesh, arg_shapes, out_ndims):
  q = arg_shapes[0]
  batch = _batch_spec(q)
  args = tuple(_along_batch(mesh, batch, a.shape, like=q.shape) for a in arg_shapes)
  outs = tuple(NamedSharding(mesh, PartitionSpec(*batch, *([None] * (n - len(batch)))))
               for n in out_ndims)
  return args, outs


def _sharding_rule(value_types, result_types):
  """Shardy: the leading dims of every operand and result are one batch factor each."""
  q_shape = tuple(value_types[0].shape)
  nb = len(q_shape) - 3

  def mapping(name, shape, like_q):
    dims = []
    for i, n in enumerate(shape):
      share = i < nb and (not like_q or (n == q_shape[i] and n > 1))
      dims.append(f"b{i}" if share else f"{name}_{i}")
    return ArrayMapping(*dims)

  ops = tuple(mapping(f"in{j}", t.shape, True) for j, t in enumerate(value_types))
  res = tuple(mapping(f"out{j}", t.shape, False) for j, t in enumerate(result_types))
  return SdyShardingRule(ops, res)


def _partitioned(impl, static_argnums):
  op = custom_partitioning(impl, static_argnums=static_argnums)

  def infer(*args):
    mesh, arg_shapes, result_shape = args[-3:]
    return _shardings(mesh, arg_shapes, [len(r.shape) for r in result_shape])[1]

  def partition(*args):
    static, (mesh, arg_shapes, result_shape) = args[:-3], args[-3:]
    arg_sh, out_sh = _shardings(mesh, arg_shapes, [len(r.shape) for r in result_shape])
    names = ("causal", "has_mask", "has_keep", "keep_scale")
    return mesh, functools.partial(impl, **dict(zip(names, static))), out_sh, arg_sh

  op.def_partition(
      partition=partition, infer_sharding_from_operands=infer,
      sharding_rule=lambda *a: _sharding_rule(a[-2], a[-1]))
  return op


_fwd_partitioned = _partitioned(_fwd_impl, static_argnums=(5, 6, 7, 8))
_bwd_partitioned = _partitioned(_bwd_impl, static_argnums=(8, 9, 10, 11))


@functools.lru_cache(maxsize=None)
def _batched_op(partitioned, mask_index, causal, has_mask, has_keep, keep_scale):
  """The call, under ``vmap`` too: a vmapped axis becomes one more batch dim.

  The operands at ``mask_index`` and after it are the mask and the keep pattern.
  """

  @jax.custom_batching.custom_vmap
  def op(*args):
    return partitioned(*args, causal, has_mask, has_keep, keep_scale)

  @op.def_vmap
  def rule(axis_size, in_batched, *args):
    lead = []
    for i, (x, batched) in enumerate(zip(args, in_batched)):
      if not batched:  # masks broadcast; every other operand needs the axis
        x = x[None] if i >= mask_index else jnp.broadcast_to(x, (axis_size,) + x.shape)
      lead.append(x)
    outs = op(*lead)
    return outs, tuple(True for _ in outs)

  return op


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _attend(q, k, v, mask, keep, causal, keep_scale):
  return _forward(q, k, v, mask, keep, causal, keep_scale)[0]


def _mask_arg(mask, ndim):
  return jnp.zeros((1,) * ndim, bool) if mask is None else mask


def _forward(q, k, v, mask, keep, causal, keep_scale):
  op = _batched_op(_fwd_partitioned, 3, causal, mask is not None, keep is not None,
                   keep_scale)
  out, lse = op(q, k, v, _mask_arg(mask, q.ndim), _mask_arg(keep, q.ndim))
  return out, (q, k, v, mask, keep, out, lse)


def _backward(causal, keep_scale, residuals, dout):
  q, k, v, mask, keep, out, lse = residuals
  # δ = rowsum(dO ∘ O) = rowsum(dP ∘ P), at [q, d] cost rather than [q, k]
  # (with dropout too: O and dP both carry its pattern).
  delta = jnp.einsum("...qhd,...qhd->...hq", dout, out)
  op = _batched_op(_bwd_partitioned, 6, causal, mask is not None, keep is not None,
                   keep_scale)
  dq, dk, dv = op(q, k, v, dout, lse, delta, _mask_arg(mask, q.ndim),
                  _mask_arg(keep, q.ndim))
  return dq, dk, dv, None, None


_attend.defvjp(_forward, _backward)


def attention(query: Array, key: Array, value: Array, mask: Array | None = None, *,
              is_causal: bool = False, scale: float | None = None,
              keep: Array | None = None, keep_scale: float = 1.0) -> Array:
  """``(softmax(q kᵀ · scale, where=mask) ∘ keep · keep_scale) v`` by the CPU kernel.

  Call it through :func:`attention.dot_product_attention` (which checks the
  arguments) with ``implementation="cpu_flash"``, or let ``None`` pick it.

  Args:
    query: ``[batch..., q_len, heads, head_dim]``.
    key: ``[batch..., kv_len, kv_heads, head_dim]``, ``heads % kv_heads == 0``.
    value: ``[batch..., kv_len, kv_heads, v_head_dim]``.
    mask: optional boolean, broadcastable to ``[batch..., heads, q_len,
      kv_len]``; True = attend.
    is_causal: query i attends keys ``j <= i`` (top-left aligned).
    scale: logit scale, default ``1/sqrt(head_dim)``.
    keep: optional attention-dropout pattern, boolean and broadcastable like
      ``mask``; True = keep. Applied to the normalised weights, as in ``"xla"``.
    keep_scale: the factor kept weights are multiplied by, ``1 / (1 - rate)``.

  Returns:
    ``[batch..., q_len, heads, v_head_dim]`` float32; rows with no key are 0.
  """
  if not available():
    raise RuntimeError(f"attention.cpu_flash is unavailable: {unavailable_reason()}")
  batch = jnp.broadcast_shapes(query.shape[:-3], key.shape[:-3])
  lead = batch or (1,)  # the kernel's batch is at least one dim
  q, k, v = (jnp.broadcast_to(x.astype(jnp.float32), lead + x.shape[-3:])
             for x in (query, key, value))
  mask, keep = (None if x is None else x.reshape((1,) * (len(lead) + 3 - x.ndim) + x.shape)
                for x in (mask, keep))
  scale = 1.0 / np.sqrt(q.shape[-1]) if scale is None else scale
  out = _attend(q * jnp.float32(scale), k, v, mask, keep, bool(is_causal),
                float(keep_scale) if keep is not None else 1.0)
  return out.reshape(batch + out.shape[-3:])
