"""Benchmark: our ``dot_product_attention`` backends against flax's and jax.nn's.

Times forward and forward+backward, reports achieved GFLOP/s and the max error
against a float64 numpy reference, and prints the speed ratio of each of ours
against ``flax.linen.dot_product_attention`` measured in the same run.

    python -m benchmarks.attention_core                      # T = 256..4096
    python -m benchmarks.attention_core --lengths 1024 --batch 4 --heads 8 --head_dim 64
    python -m benchmarks.attention_core --memory --budget_gb 4   # largest T per backend
    python -m benchmarks.attention_core --lengths 1024 --attention_dropout 0.1

With ``--attention_dropout RATE`` every implementation that has attention
dropout runs with it (flax's, ours "xla", "cpu_flash" and auto; one pattern
shared over batch and heads, flax's default), and the others are left out.
Our error is then measured against float64 numpy fed our keep pattern
(:func:`attention.dropout.keep_mask`); flax draws its own pattern, so its
error is not reported.

FLOPs: forward = 4·B·H·Tq·Tk·D (two matmuls), halved when causal; forward +
backward counts 3× that (the backward pass does four matmuls of the same size:
dV, dP, dQ, dK). These are model FLOPs: the tiled backend and cuDNN also
recompute QKᵀ in the backward pass, which is not counted (FlashAttention's
papers count it, giving 3.5×).
The backward pass gets a dense random output cotangent, as in training (see _loss),
and fwd+bwd times ``jax.value_and_grad``: the loss value needs the attention output.
With ``jax.grad`` alone, XLA drops the forward ``P v`` product, because a loss linear in
the output needs no output for its gradient. A training step always computes it.
Max error: against float64 numpy on example 0, head 0, over the query rows that
attend at least one key (padded queries have no softmax; flax fills them with the
mean of the values, ours with zeros).
Timing: median over ``--repeats`` rounds, each round calling every
implementation once in turn, so load changes on a shared machine shift all of
them together rather than whichever happened to run at the time. With
``--calls_per_turn N`` each turn times N consecutive calls, as a training loop
makes them (the median is over all of them).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from attention import dropout as dropout_lib
from attention import huge_pages
from benchmarks import device_info


DROPOUT_KEY = 0  # the attention-dropout key of every implementation


def _peers(blocks=(), dropout=0.0):
  """Implementations by name; each ``"BQxBK"`` in ``blocks`` adds the tiled
  backend with that tile, e.g. ``ours(chunked 512x256)``. With ``dropout``,
  only those that have attention dropout, all running it."""
  import flax.linen as nn
  from attention import dot_product_attention
  drop = dict(dropout_rng=jax.random.key(DROPOUT_KEY), dropout_rate=dropout) if dropout else {}

  def ours(impl, **tiles):
    def f(q, k, v, mask, causal):
      if causal == "is_causal":
        return dot_product_attention(q, k, v, is_causal=True, implementation=impl,
                                     **tiles, **drop)
      return dot_product_attention(q, k, v, mask=mask, implementation=impl, **tiles, **drop)
    return f

  def flax_fn(q, k, v, mask, causal):
    return nn.dot_product_attention(q, k, v, mask=mask, deterministic=not dropout, **drop)

  def jaxnn(q, k, v, mask, causal):
    if causal == "is_causal":
      return jax.nn.dot_product_attention(q, k, v, is_causal=True)
    return jax.nn.dot_product_attention(q, k, v, mask=mask)

  impls = {"flax": flax_fn, "jax.nn": jaxnn, "ours(auto)": ours(None),
           "ours(xla)": ours("xla"), "ours(chunked)": ours("chunked")}
  if jax.default_backend() == "gpu":
    impls["ours(cudnn)"] = ours("cudnn")
  from attention import cpu_flash
  if jax.default_backend() == "cpu" and cpu_flash.available():
    impls["ours(cpu_flash)"] = ours("cpu_flash")
  for tile in blocks:
    bq, bk = (int(n) for n in tile.split("x"))
    impls[f"ours(chunked {tile})"] = ours("chunked", block_q=bq, block_kv=bk)
  if dropout:
    impls = {n: f for n, f in impls.items() if n in ("flax", "ours(auto)", "ours(xla)",
                                                     "ours(cpu_flash)")}
  return impls


def _loss(out, cotangent):
  """A scalar whose gradient w.r.t. ``out`` is the dense ``cotangent``.

  ``sum(out)`` would hand the backward pass a cotangent of ones, and XLA then
  turns two of its four matmuls (``dO v^T`` and ``P^T dO``) into reductions: a
  backward pass no training step ever runs.
  """
  return jnp.sum(out.astype(jnp.float32) * cotangent.astype(jnp.float32))


def _mask(kind, b, t):
  import flax.linen as nn
  if kind in ("causal_mask", "is_causal"):
    return nn.make_causal_mask(jnp.ones((b, t)), dtype=bool)
  if kind == "padding":
    lengths = np.linspace(t // 2, t, b).astype(int)
    valid = jnp.asarray(np.arange(t)[None] < lengths[:, None])
    return nn.make_attention_mask(valid, valid, dtype=bool)
  return None


def _time_interleaved(fns, args, repeats, calls_per_turn=1):
  """Median seconds per call of each function, timed round-robin.

  Every function gets a turn per round, so slow drifts in machine load (a shared
  CPU) hit all implementations alike and the ratios stay meaningful. A turn is an
  untimed call, then ``calls_per_turn`` timed ones: the first call after a
  different function pays for the state of the heap that function left. With huge
  pages on, a flax fwd+bwd at T=1024 took 704 ms right after the tiled backend and
  433 ms right after jax.nn; a training loop, which repeats one function, never
  pays that.
  """
  times = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      jax.block_until_ready(fn(*args))
      for _ in range(calls_per_turn):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times[name].append(time.perf_counter() - start)
  return {name: float(np.median(t)) for name, t in times.items()}


def _reference_row_block(q, k, v, mask, keep=None, keep_scale=1.0):
  """float64 output of example 0, head 0 (heads and examples are independent).

  ``keep``: attention dropout's ``[1, 1, T, T]`` pattern, applied with
  ``keep_scale`` to the probabilities.

  Returns ``(out [T, D], rows)`` where ``rows`` marks the queries that attend at
  least one key: fully masked rows (padded queries) have no softmax, and the
  implementations fill them by convention (flax: the mean of the values,
  ours: zeros), so errors are measured on the other rows only.
  """
  q, k, v = (np.asarray(x[0, :, 0], np.float64) for x in (q, k, v))
  s = q @ k.T / np.sqrt(q.shape[-1])
  allowed = np.ones(s.shape, bool) if mask is None else np.asarray(mask)[0, 0]
  s = np.where(allowed, s, -np.inf)
  m = np.max(s, -1, keepdims=True)
  e = np.exp(s - np.where(np.isfinite(m), m, 0)) * allowed
  den = e.sum(-1, keepdims=True)
  p = e / np.where(den > 0, den, 1)
  if keep is not None:
    p = p * np.asarray(keep)[0, 0] * keep_scale
  return p @ v, allowed.any(-1)


def run_speed(args):
  impls = _peers(args.blocks, args.attention_dropout)
  dtype = jnp.bfloat16 if args.dtype == "bf16" else jnp.float32
  rows = []
  for t in args.lengths:
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.normal(size=(args.batch, t, args.heads, args.head_dim)), dtype)
               for _ in range(3))
    keep, keep_scale = None, 1.0  # the pattern ours draws, for the reference
    if args.attention_dropout:
      keep = dropout_lib.keep_mask(jax.random.key(DROPOUT_KEY), args.attention_dropout,
                                   (1, 1, t, t))
      keep_scale = dropout_lib.keep_scale(args.attention_dropout)
    for kind in args.masks:
      mask = _mask(kind, args.batch, t)
      cotangent = jnp.asarray(rng.normal(size=q.shape), dtype)
      ref, rows_ok = _reference_row_block(q.astype(jnp.float32), k.astype(jnp.float32),
                                          v.astype(jnp.float32), mask, keep, keep_scale)
      flops = 4 * args.batch * args.heads * t * t * args.head_dim
      if kind in ("causal_mask", "is_causal"):
        flops //= 2
      compiled, errors = {}, {}
      for name, fn in impls.items():
        fwd = jax.jit(lambda q, k, v, m, fn=fn: fn(q, k, v, m, kind))
        grad = jax.jit(jax.value_and_grad(lambda q, k, v, m, c, fn=fn: _loss(
            fn(q, k, v, m, kind), c), argnums=(0, 1, 2)))
        try:
          out = fwd(q, k, v, mask)
          jax.block_until_ready(grad(q, k, v, mask, cotangent))
        except Exception as e:  # e.g. cuDNN rejecting a shape: report, keep going
          print(f"  {name}: failed: {type(e).__name__}: {str(e).splitlines()[0]}")
          continue
        diff = np.abs(np.asarray(out[0, :, 0], np.float64) - ref)
        # flax draws another dropout pattern than the reference's.
        errors[name] = None if keep is not None and name == "flax" else float(
            np.max(diff[rows_ok]))
        compiled[name] = (fwd, grad)
      t_fwd = _time_interleaved({n: f for n, (f, _) in compiled.items()},
                                (q, k, v, mask), args.repeats, args.calls_per_turn)
      t_grad = _time_interleaved({n: g for n, (_, g) in compiled.items()},
                                 (q, k, v, mask, cotangent), args.repeats,
                                 args.calls_per_turn)
      base = {"fwd": t_fwd["flax"], "fwd_bwd": t_grad["flax"]} if "flax" in compiled else {}
      for name in compiled:
        t_f, t_b, err = t_fwd[name], t_grad[name], errors[name]
        row = dict(T=t, mask=kind, impl=name, fwd_ms=t_f * 1e3, fwd_bwd_ms=t_b * 1e3,
                   fwd_gflops=flops / t_f / 1e9, fwd_bwd_gflops=3 * flops / t_b / 1e9,
                   max_err=err,
                   speedup_fwd=base["fwd"] / t_f if base else None,
                   speedup_fwd_bwd=base["fwd_bwd"] / t_b if base else None)
        rows.append(row)
        print(f"T={t:5d} {kind:11s} {name:22s} fwd {row['fwd_ms']:8.1f} ms "
              f"({row['fwd_gflops']:6.1f} GF/s, x{row['speedup_fwd'] or 0:4.2f} vs flax)  "
              f"fwd+bwd {row['fwd_bwd_ms']:8.1f} ms (x{row['speedup_fwd_bwd'] or 0:4.2f})  "
              f"err {'n/a' if err is None else f'{err:.1e}'}", flush=True)
  return rows


def _peak_rss_child(impl, t, heads, head_dim, dropout=0.0):
  """Runs one causal fwd+bwd in this (fresh) process and prints its peak RSS in bytes."""
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.normal(size=(1, t, heads, head_dim)), jnp.float32) for _ in range(3))
  fn = _peers(dropout=dropout)[impl]
  # Every implementation that has is_causal gets it; only flax's function
  # needs the [T, T] mask array (4·T² bytes).
  native = impl.startswith("ours") or impl == "jax.nn"
  mask = None if native else _mask("causal_mask", 1, t)
  kind = "is_causal" if native else "causal_mask"
  cotangent = jnp.asarray(rng.normal(size=q.shape), jnp.float32)
  grad = jax.jit(jax.value_and_grad(lambda q, k, v, c: _loss(fn(q, k, v, mask, kind), c),
                                    argnums=(0, 1, 2)))
  jax.block_until_ready(grad(q, k, v, cotangent))
  print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


def run_memory(args):
  """Peak RSS of one causal fwd+bwd per (implementation, T), each in a fresh CPU process.

  Host memory on CPU only: the children run with ``JAX_PLATFORMS=cpu`` even on
  a GPU machine, where RSS would not see the device's arrays. RSS includes the
  JAX runtime (about 0.25 GB). Lengths are tried in order until one does not
  fit, fails or times out.
  """
  rows = []
  env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false", JAX_PLATFORMS="cpu")
  for impl in args.memory_impls:
    best, stopped = None, False
    for t in args.memory_lengths:
      cmd = [sys.executable, "-m", "benchmarks.attention_core", "--_child", impl, str(t),
             str(args.memory_heads), str(args.head_dim), str(args.attention_dropout)]
      status = "ok"
      try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=args.memory_timeout,
                             env=env)
        rss = int(res.stdout.strip().splitlines()[-1]) if res.returncode == 0 else None
        if rss is None:
          status = f"failed (rc {res.returncode})"
      except subprocess.TimeoutExpired:
        rss, status = None, f"timeout ({args.memory_timeout:g} s)"
      except (ValueError, IndexError):
        rss, status = None, "failed (no RSS printed)"
      fits = rss is not None and rss <= args.budget_gb * 2**30
      if rss is not None and not fits:
        status = "over budget"
      rows.append(dict(impl=impl, T=t, peak_rss_gb=None if rss is None else rss / 2**30,
                       fits=fits, status=status))
      shown = status if rss is None else f"{rss / 2**30:6.2f} GB ({status})"
      print(f"memory {impl:14s} T={t:6d} heads={args.memory_heads} peak RSS {shown}", flush=True)
      if not fits:
        stopped = True
        break
      best = t
    bound = best if stopped or best is None else f">= {best} (every length tried fit)"
    print(f"  largest T within {args.budget_gb} GB for {impl}: {bound}")
  return rows


def _tile(text: str) -> str:
  parts = text.split("x")
  if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
    raise argparse.ArgumentTypeError(f"--blocks {text!r}: want BQxBK, e.g. 512x256")
  return text


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 4096])
  p.add_argument("--masks", nargs="+", default=["causal_mask", "is_causal", "padding"],
                 choices=["none", "causal_mask", "is_causal", "padding"])
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--heads", type=int, default=8)
  p.add_argument("--head_dim", type=int, default=64)
  p.add_argument("--dtype", default="bf16" if jax.default_backend() == "gpu" else "fp32",
                 choices=["fp32", "bf16"])
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--attention_dropout", type=float, default=0.0,
                 help="attention dropout rate; only implementations with dropout run")
  p.add_argument("--calls_per_turn", type=int, default=1,
                 help="timed consecutive calls per implementation per round")
  p.add_argument("--blocks", nargs="*", default=[], type=_tile,
                 help="also time the tiled backend with these tiles, e.g. 128x128 512x256")
  p.add_argument("--memory", action="store_true", help="also run the peak-RSS sweep")
  p.add_argument("--memory_only", action="store_true")
  p.add_argument("--budget_gb", type=float, default=4.0)
  p.add_argument("--memory_impls", nargs="+",
                 default=["ours(auto)", "ours(chunked)", "flax", "jax.nn"])
  p.add_argument("--memory_lengths", type=int, nargs="+", default=[4096, 8192, 16384, 32768])
  p.add_argument("--memory_heads", type=int, default=1)
  p.add_argument("--memory_timeout", type=float, default=900)
  p.add_argument("--out", default=None, help="default: benchmarks/out/attention_core.json,"
                 " or attention_core_memory.json with --memory_only (so the timings stay)")
  p.add_argument("--_child", nargs=5, help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if not 0.0 <= args.attention_dropout < 1.0:
    p.error(f"--attention_dropout={args.attention_dropout} must be in [0, 1)")
  if args.out is None:
    args.out = ("benchmarks/out/attention_core_memory.json" if args.memory_only
                else "benchmarks/out/attention_core.json")
  if args._child:
    impl, t, h, d, rate = args._child
    return _peak_rss_child(impl, int(t), int(h), int(d), float(rate))
  hp = huge_pages.active()
  device = device_info.describe()
  print(f"device: {device} ({jax.default_backend()}), jax {jax.__version__},"
        f" host huge pages {'on' if hp else 'off'}")
  result = {"device": device, "backend": jax.default_backend(),
            "huge_pages": hp,
            "args": {k: v for k, v in vars(args).items() if k != "_child"}}
  if not args.memory_only:
    result["speed"] = run_speed(args)
  if args.memory or args.memory_only:
    result["memory"] = run_memory(args)
  os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(result, f, indent=1)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  huge_pages.reexec_with_huge_pages()
  main()
