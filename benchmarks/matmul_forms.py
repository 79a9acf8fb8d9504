"""The transposed-operand matmul of attention's backward pass, three ways.

    python -m benchmarks.matmul_forms [--length 1024] [--batch_heads 32] [--head_dim 64]

Times ``Pᵀ x`` for ``P [batch_heads, T, T]`` and ``x [batch_heads, T, head_dim]``
(``dV = Pᵀ dO``, ``dK = dSᵀ q``):

* ``einsum``: ``jnp.einsum("bqk,bqd->bkd")``, what autodiff of ``P @ v`` emits;
* ``pt_matmul``: :func:`attention.transposed_matmul.pt_matmul`, which computes
  ``xᵀ P`` and transposes the small result;
* ``P x`` (peer): the plain ``[m, k] @ [k, n]`` product with the same FLOPs.

It prints ms, GFLOP/s and each one's speed against ``einsum``, measured
round-robin in one process (huge pages on, as in every benchmark here).
"""

from __future__ import annotations

import argparse
import json
import os


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--length", type=int, default=1024)
  p.add_argument("--batch_heads", type=int, default=32)
  p.add_argument("--head_dim", type=int, default=64)
  p.add_argument("--repeats", type=int, default=7)
  p.add_argument("--out", default="benchmarks/out/matmul_forms.json")
  args = p.parse_args(argv)

  import jax
  import jax.numpy as jnp
  import numpy as np

  from attention import huge_pages
  from attention.transposed_matmul import pt_matmul
  from benchmarks import device_info
  from benchmarks.attention_core import _time_interleaved

  rng = np.random.default_rng(0)
  n, t, d = args.batch_heads, args.length, args.head_dim
  probs = jnp.asarray(rng.random((n, t, t), np.float32))
  x = jnp.asarray(rng.standard_normal((n, t, d), np.float32))
  fns = {
      "einsum": jax.jit(lambda a, b: jnp.einsum("bqk,bqd->bkd", a, b)),
      "pt_matmul": jax.jit(pt_matmul),
      "P x (peer)": jax.jit(lambda a, b: jnp.einsum("bqk,bkd->bqd", a, b)),
  }
  want = np.asarray(fns["einsum"](probs, x))
  err = float(np.max(np.abs(np.asarray(fns["pt_matmul"](probs, x)) - want)))
  times = _time_interleaved(fns, (probs, x), args.repeats)
  flops = 2 * n * t * t * d
  device = device_info.describe()
  print(f"{device} ({jax.default_backend()}), huge pages {'on' if huge_pages.active() else 'off'};"
        f" P [{n}, {t}, {t}], x [{n}, {t}, {d}]; pt_matmul max |diff| vs einsum {err:.1e}")
  rows = []
  for name, sec in times.items():
    rows.append(dict(form=name, ms=sec * 1e3, gflops=flops / sec / 1e9,
                     speedup=times["einsum"] / sec))
    print(f"  {name:12s} {sec * 1e3:8.1f} ms {flops / sec / 1e9:7.1f} GFLOP/s"
          f"  x{times['einsum'] / sec:4.2f} vs einsum")
  os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(dict(device=device, args=vars(args), max_abs_diff=err, rows=rows), f, indent=1)
  return 0


if __name__ == "__main__":
  from attention import huge_pages as _hp

  _hp.reexec_with_huge_pages()
  raise SystemExit(main())
