"""XLA:CPU with and without huge pages for its large buffers (attention/huge_pages.py).

    python -m benchmarks.huge_pages [--repeats 7] [--rounds 2] [--length 1024]

Runs the same workloads in fresh processes, alternately with glibc's default
4 KiB pages and with ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` (``--rounds`` of
each, so drifting machine load hits both). It prints each workload's ms per call
(the best round's median), minor page faults per call, and the speed-up.
Workloads: a bare ``x * 2`` over ``[32, T, T]`` float32, the ``q kᵀ`` logits matmul
(``[32, T, 64]``), and attention forward+backward at B=4, H=8, D=64 for flax's
``dot_product_attention`` and ours (``implementation=None``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

_MARK = "RESULT "


def _child(length: int, repeats: int) -> None:
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import numpy as np

  from attention import dot_product_attention, huge_pages
  from benchmarks.attention_core import _loss

  rng = np.random.default_rng(0)
  big = jnp.asarray(rng.standard_normal((32, length, length), np.float32))
  heads = jnp.asarray(rng.standard_normal((32, length, 64), np.float32))
  q, k, v, ct = (jnp.asarray(rng.standard_normal((4, length, 8, 64)), jnp.float32)
                 for _ in range(4))

  def fwd_bwd(attn):
    # value_and_grad, as benchmarks.attention_core times it: with jax.grad alone
    # XLA drops flax's forward P v (the loss is linear in the output), so flax
    # and ours would do different work. (The RESULTS.md rows of 2026-11-24 were
    # timed with jax.grad; each row's speed-up compares one implementation
    # with itself, which that does not change.)
    grad = jax.value_and_grad(lambda q, k, v: _loss(attn(q, k, v), ct), argnums=(0, 1, 2))
    return jax.jit(grad), (q, k, v)

  cases = {
      f"x * 2, [32, {length}, {length}] fp32": (jax.jit(lambda x: x * 2), (big,)),
      f"q kᵀ, [32, {length}, 64]": (jax.jit(lambda a: jnp.einsum("bqd,bkd->bqk", a, a)),
                                    (heads,)),
      f"flax attention fwd+bwd, B=4 T={length}": fwd_bwd(nn.dot_product_attention),
      f"ours (None) attention fwd+bwd, B=4 T={length}": fwd_bwd(dot_product_attention),
  }
  out = {}
  for name, (fn, args) in cases.items():
    jax.block_until_ready(fn(*args))
    times, faults = [], []
    for _ in range(repeats):
      before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
      start = time.perf_counter()
      jax.block_until_ready(fn(*args))
      times.append(time.perf_counter() - start)
      faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    out[name] = dict(ms=float(np.median(times)) * 1e3, faults=float(np.median(faults)))
  print(_MARK + json.dumps(dict(huge_pages=huge_pages.active(), cases=out)), flush=True)


def _run(huge: bool, args) -> dict:
  env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "ATTENTION_HUGE_PAGES")}
  if huge:
    env["GLIBC_TUNABLES"] = "glibc.malloc.hugetlb=1"
  cmd = [sys.executable, "-m", "benchmarks.huge_pages", "--_child",
         "--length", str(args.length), "--repeats", str(args.repeats)]
  res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
  lines = [l for l in res.stdout.splitlines() if l.startswith(_MARK)]
  if res.returncode != 0 or not lines:
    raise RuntimeError(f"child (huge={huge}) failed, rc {res.returncode}:\n{res.stderr[-2000:]}")
  return json.loads(lines[-1][len(_MARK):])


def _best(results: list[dict]) -> dict:
  """Per workload, the round with the lowest median time."""
  best = dict(results[0], cases={})
  for name in results[0]["cases"]:
    best["cases"][name] = min((r["cases"][name] for r in results), key=lambda c: c["ms"])
  return best


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--length", type=int, default=1024)
  p.add_argument("--repeats", type=int, default=7, help="timed calls per workload and process")
  p.add_argument("--rounds", type=int, default=2, help="processes per setting, alternated")
  p.add_argument("--timeout", type=float, default=900)
  p.add_argument("--out", default="benchmarks/out/huge_pages.json")
  p.add_argument("--_child", action="store_true", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args._child:
    _child(args.length, args.repeats)
    return 0
  from attention import huge_pages
  runs = {False: [], True: []}
  for _ in range(args.rounds):
    for huge_on in (False, True):
      runs[huge_on].append(_run(huge_on, args))
  small, huge = (_best(runs[h]) for h in (False, True))
  from benchmarks import device_info
  host = device_info.host_description()
  print(f"host: {host}; THP mode {huge_pages.thp_mode()}, glibc {huge_pages.glibc_version()};"
        f" huge pages took effect: {huge['huge_pages']}")
  print(f"\n{'workload':44s} {'4 KiB ms':>9s} {'faults':>8s} {'huge ms':>9s} {'faults':>8s}"
        f" {'speed-up':>8s}")
  rows = []
  for name, a in small["cases"].items():
    b = huge["cases"][name]
    rows.append(dict(workload=name, small_ms=a["ms"], small_faults=a["faults"],
                     huge_ms=b["ms"], huge_faults=b["faults"], speedup=a["ms"] / b["ms"]))
    print(f"{name:44s} {a['ms']:9.1f} {a['faults']:8.0f} {b['ms']:9.1f} {b['faults']:8.0f}"
          f" {a['ms'] / b['ms']:8.2f}")
  os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(dict(args=vars(args), host=host, took_effect=huge["huge_pages"], rows=rows), f,
              indent=1)
  print(f"wrote {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
