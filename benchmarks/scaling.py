"""Benchmark: data-parallel scaling of the trainer's step, and loss equality across devices.

For each device count N a fresh subprocess (the device count is fixed when JAX
starts) builds the tiny default experiment (``experiments.configs.default``,
shrunk: ``--steps`` steps, no eval/decoding) and runs
``experiments.train.make_train_step`` jitted over ``experiments.train.make_mesh``
exactly as ``train_and_evaluate`` does: donated state, replicated parameters,
the global batch sharded along ``data``. On CPU the N devices are simulated with
``XLA_FLAGS=--xla_force_host_platform_device_count=N``; with ``--real`` (GPU
machines) the child sees the first N real devices via ``CUDA_VISIBLE_DEVICES``.

The global batch and seed are the same for every N, so the per-step losses
must agree up to float reduction order; the largest relative difference from
the first device count is printed with PASS/FAIL (``--rtol``). Throughput is
target tokens (the trainer's ``tokens``) per second over the timed steps,
i.e. all steps after the first (which compiles).

    python -m benchmarks.scaling                       # N = 1 2 4 8, 20 steps
    python -m benchmarks.scaling --devices 1 2 --steps 6
    python -m benchmarks.scaling --real --devices 1 2 4 8   # GPU machine
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from benchmarks import device_info

_MARK = "SCALING_RESULT "


def _child(steps: int, batch: int) -> None:
  """Trains in this process on every visible device; prints one result line."""
  import jax
  import numpy as np
  from jax.sharding import NamedSharding, PartitionSpec as P

  from experiments import optim
  from experiments.configs import default
  from experiments.data import create_datasets
  from experiments.models import create_model
  from experiments.train import TrainState, make_mesh, make_train_step

  config = default.get_config()
  config.num_train_steps = steps
  config.batch_size = config.eval_batch_size = batch
  config.decode.enabled = False
  mesh = make_mesh(config.model_parallelism)
  replicated, data = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
  with tempfile.TemporaryDirectory() as workdir:
    ds = create_datasets(config.data, seed=config.seed, batch_size=config.batch_size,
                         eval_batch_size=config.eval_batch_size, workdir=workdir)
    batches = [next(ds.train) for _ in range(steps)]
  model = create_model(config.model, src_vocab_size=ds.src_vocab.size,
                       tgt_vocab_size=ds.tgt_vocab.size,
                       max_len=int(config.data.max_len) + config.decode.max_extra + 18)
  tx = optim.make_optimizer(config)
  lr_fn = optim.learning_rate_fn(config)

  def init_state(rng):
    params_rng, state_rng = jax.random.split(rng)
    dummy = (jax.numpy.ones((1, 8), jax.numpy.int32),) * 2
    params = model.init({"params": params_rng}, *dummy, train=False)["params"]
    return TrainState(step=jax.numpy.zeros((), jax.numpy.int32), params=params,
                      opt_state=tx.init(params), rng=jax.random.key_data(state_rng))

  abstract = jax.eval_shape(init_state, jax.random.key(config.seed))
  state_sharding = jax.tree.map(lambda _: replicated, abstract)
  state = jax.jit(init_state, out_shardings=state_sharding)(jax.random.key(config.seed))
  step_fn = jax.jit(make_train_step(model, tx, "seq2seq", config), donate_argnums=(0,),
                    in_shardings=(state_sharding, data, replicated),
                    out_shardings=(state_sharding, replicated))
  to_global = lambda b: {k: jax.make_array_from_process_local_data(data, np.asarray(v))
                         for k, v in b.items()}
  losses, tokens, start = [], 0.0, None
  for i, host_batch in enumerate(batches):
    state, metrics = step_fn(state, to_global(host_batch), np.float32(lr_fn(i)))
    metrics = jax.device_get(metrics)  # one sync per step: times are per-step honest
    losses.append(float(metrics["loss"]))
    if i == 0:
      start = time.perf_counter()  # step 0 compiles; time the rest
    else:
      tokens += float(metrics["tokens"])
  elapsed = time.perf_counter() - start
  print(_MARK + json.dumps({"devices": jax.device_count(), "mesh": dict(mesh.shape),
                            "device_kind": jax.devices()[0].device_kind, "losses": losses,
                            "timed_steps": steps - 1, "seconds": elapsed,
                            "tokens_per_s": tokens / elapsed if elapsed > 0 else None}),
        flush=True)


def _run(n: int, args) -> dict:
  env = dict(os.environ)
  if args.real:
    # The first n of the GPUs this process was given (e.g. by Slurm), not 0..n-1.
    given = env.get("CUDA_VISIBLE_DEVICES")
    ids = given.split(",") if given else [str(i) for i in range(n)]
    env["CUDA_VISIBLE_DEVICES"] = ",".join(ids[:n])
  else:
    flags = [f for f in env.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={n}"])
    env["JAX_PLATFORMS"] = "cpu"
  cmd = [sys.executable, "-m", "benchmarks.scaling", "--_child", str(args.steps), str(args.batch)]
  res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
  lines = [l for l in res.stdout.splitlines() if l.startswith(_MARK)]
  if res.returncode or not lines:
    tail = (res.stderr or res.stdout).strip().splitlines()[-5:]
    raise RuntimeError(f"N={n} failed (rc {res.returncode}):\n  " + "\n  ".join(tail))
  result = json.loads(lines[-1][len(_MARK):])
  if result["devices"] != n:
    # E.g. --real with fewer GPUs than asked for: the row would be mislabelled.
    raise RuntimeError(f"N={n}: the run saw {result['devices']} {result['device_kind']}"
                       f" device(s), not {n}; pass --devices counts this machine has.")
  return result


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4, 8])
  p.add_argument("--steps", type=int, default=20, help="steps per run (the first compiles)")
  p.add_argument("--batch", type=int, default=64, help="global batch, same for every N")
  p.add_argument("--real", action="store_true", help="use real (GPU) devices, not simulated CPU")
  p.add_argument("--rtol", type=float, default=1e-4, help="max relative loss difference")
  p.add_argument("--timeout", type=float, default=900)
  p.add_argument("--out", default="benchmarks/out/scaling.json")
  p.add_argument("--_child", nargs=2, type=int, help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args._child:
    return _child(*args._child)
  if args.steps < 2:
    p.error("--steps must be at least 2 (the first step compiles and is not timed).")
  bad = [n for n in args.devices if args.batch % n]
  if bad:
    p.error(f"--batch {args.batch} is not divisible by device counts {bad}.")

  host = device_info.host_description()
  print(f"host: {host}", flush=True)
  runs = []
  for n in args.devices:
    try:
      r = _run(n, args)
    except RuntimeError as e:
      print(f"error: {e}", file=sys.stderr)
      return 1
    runs.append(r)
    print(f"N={n}: {r['device_kind']} mesh {r['mesh']} {r['tokens_per_s']:.0f} tok/s"
          f" final loss {r['losses'][-1]:.6f}", flush=True)
  ref = runs[0]["losses"]
  rows = []
  print(f"\n{'devices':>7s} {'tok/s':>10s} {'vs N=' + str(args.devices[0]):>8s}"
        f" {'per-dev eff':>11s} {'final loss':>11s} {'max rel diff':>12s}")
  for n, r in zip(args.devices, runs):
    diff = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(r["losses"], ref))
    speedup = r["tokens_per_s"] / runs[0]["tokens_per_s"]
    eff = speedup * args.devices[0] / n
    rows.append(dict(devices=n, tokens_per_s=r["tokens_per_s"], speedup=speedup,
                     efficiency=eff, losses=r["losses"], max_rel_diff=diff))
    print(f"{n:7d} {r['tokens_per_s']:10.0f} {speedup:8.2f} {eff:11.2f}"
          f" {r['losses'][-1]:11.6f} {diff:12.2e}")
  worst = max(row["max_rel_diff"] for row in rows)
  ok = worst <= args.rtol
  print(f"\nloss equality across device counts: max relative difference {worst:.2e}"
        f" over {args.steps} steps -> {'PASS' if ok else 'FAIL'} (rtol {args.rtol:g})")
  os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
  with open(args.out, "w") as f:
    json.dump({"args": {k: v for k, v in vars(args).items() if k != "_child"},
               "host": host, "device_kind": runs[0]["device_kind"], "rows": rows,
               "max_rel_diff": worst, "pass": ok}, f, indent=1)
  print(f"wrote {args.out}")
  return 0 if ok else 1


if __name__ == "__main__":
  from attention import huge_pages
  huge_pages.reexec_with_huge_pages()
  sys.exit(main())
