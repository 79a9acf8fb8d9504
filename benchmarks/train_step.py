"""Benchmark: one jitted train step of our ``Transformer`` against a stock-flax peer.

Both models (ours and :class:`benchmarks.flax_transformer.FlaxTransformer`, at
identical dimensions) run through the very same step,
``experiments.train.make_train_step`` (forward, backward, label-smoothed
cross-entropy, global-norm clipping, Adam update; state donated), on the same
synthetic full-length batch, in the same process. Reports ms/step, tokens/s,
the ratio ours/peer (> 1: ours is faster) and the model-FLOPs utilisation.

    python -m benchmarks.train_step                              # multi30k dims, batch 64
    python -m benchmarks.train_step --size base --batch 32 --dtype bf16
    python -m benchmarks.train_step --size base --dtype bf16 --attention_dropout 0  # cuDNN on GPU
    python -m benchmarks.train_step --size multi30k --batch 16 --steps 3   # smoke test
    python -m benchmarks.train_step --profile 8     # also each model's 8 costliest XLA ops

Tokens: ``tok/s`` counts source plus target tokens, ``B·(S + T)`` per step
(the batch has no padding); ``tgt tok/s`` counts ``B·T``, the trainer's measure.

Model FLOPs per step (matmuls only; biases, LayerNorm, softmax and the
embedding lookups are left out; backward = 2 × forward, hence the factor 6 =
2 FLOPs per multiply-add × 3 passes), with ``d = emb_dim``, ``q = qkv_dim``,
``m = mlp_dim``, ``V`` the target vocabulary, ``Le``/``Ld`` encoder/decoder layers::

  F = 6·(N_enc·B·S + N_dec·B·T + N_kv·B·S)
      + 12·q·B·(Le·S·S + Ld·T·T + Ld·T·S)
  N_enc = Le·(4·d·q + 2·d·m)              # q, k, v, o projections and the MLP
  N_dec = Ld·(4·d·q + 2·d·q + 2·d·m) + d·V  # self q/k/v/o, cross q/o, MLP, logits
  N_kv  = Ld·2·d·q                        # cross-attention k/v, run on the S source tokens

i.e. ``6·N·tokens`` with each weight matrix charged for the tokens it actually
processes, plus the attention term ``12·layers·T_k·q`` per query token (QKᵀ and
AV, forward + backward) for encoder self-, decoder self- and cross-attention.
The causal decoder self-attention is counted in full, as is customary for MFU.
MFU = F / step time / peak, where the peak is a measured ``jnp.dot`` of two
``n×n`` matrices of the benchmark dtype (2·n³ FLOPs, best of several; n = 2048
on CPU, 8192 on GPU), so MFU is relative to what this machine's matmul reaches.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import re
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import config_dict

from attention import huge_pages
from benchmarks import device_info

SIZES = {  # emb_dim, num_layers, num_heads, mlp_dim, vocab (as experiments.configs)
    "tiny": (64, 2, 4, 128, 1024),
    "multi30k": (256, 3, 8, 512, 8192),
    "base": (512, 6, 8, 2048, 32768),
}


def step_config() -> config_dict.ConfigDict:
  """The optimizer/loss fields ``make_train_step`` and ``make_optimizer`` read."""
  c = config_dict.ConfigDict()
  c.grad_accum_steps = 1
  c.label_smoothing = 0.1
  c.learning_rate = 1e-3
  c.grad_clip_norm = 1.0
  c.adam_b1, c.adam_b2, c.adam_eps, c.weight_decay = 0.9, 0.98, 1e-9, 0.0
  return c


def model_flops(d: int, q: int, m: int, vocab: int, enc_layers: int, dec_layers: int,
                batch: int, src_len: int, tgt_len: int) -> float:
  """Training FLOPs of one step (the formula of the module docstring)."""
  n_enc = enc_layers * (4 * d * q + 2 * d * m)
  n_dec = dec_layers * (6 * d * q + 2 * d * m) + d * vocab
  n_kv = dec_layers * 2 * d * q
  dense = 6 * (n_enc * batch * src_len + n_dec * batch * tgt_len + n_kv * batch * src_len)
  attn = 12 * q * batch * (enc_layers * src_len ** 2 + dec_layers * tgt_len ** 2
                           + dec_layers * tgt_len * src_len)
  return float(dense + attn)


def matmul_peak(dtype, n: int, repeats: int = 5) -> float:
  """Best FLOP/s of an ``n×n @ n×n`` ``jnp.dot`` in ``dtype``."""
  rng = np.random.default_rng(0)
  a, b = (jnp.asarray(rng.standard_normal((n, n)), dtype) for _ in range(2))
  dot = jax.jit(jnp.dot)
  jax.block_until_ready(dot(a, b))
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(dot(a, b))
    best = min(best, time.perf_counter() - start)
  return 2 * n ** 3 / best


def _batch(args, vocab: int) -> dict:
  rng = np.random.default_rng(0)
  tok = lambda n: jnp.asarray(rng.integers(4, vocab, size=(args.batch, n)), jnp.int32)
  tgt = tok(args.tgt_len + 1)
  return {"src": tok(args.src_len), "tgt_in": tgt[:, :-1], "tgt_out": tgt[:, 1:]}


class _Stepper:
  """One model's compiled train step, timed one step at a time."""

  def __init__(self, model, batch: dict):
    from experiments import optim
    from experiments.train import TrainState, make_train_step
    cfg = step_config()
    tx = optim.make_optimizer(cfg)
    params = jax.jit(lambda r: model.init({"params": r}, batch["src"], batch["tgt_in"],
                                          train=False)["params"])(jax.random.key(0))
    self.state = TrainState(step=jnp.zeros((), jnp.int32), params=params,
                            opt_state=tx.init(params), rng=jax.random.key_data(jax.random.key(1)))
    self.params = sum(x.size for x in jax.tree.leaves(params))
    self.batch, self.lr = batch, jnp.float32(cfg.learning_rate)
    # Compiled ahead of time, once: the profile reads this executable's HLO
    # instead of compiling the step a second time (tens of seconds on a GPU host).
    start = time.perf_counter()
    self.step = jax.jit(make_train_step(model, tx, "seq2seq", cfg), donate_argnums=(0,)).lower(
        self.state, batch, self.lr).compile()
    self.compile_s = time.perf_counter() - start
    self.timed()  # warm-up
    self.times: list[float] = []

  def timed(self) -> float:
    start = time.perf_counter()
    self.state, self.metrics = self.step(self.state, self.batch, self.lr)
    jax.block_until_ready(self.metrics)
    return time.perf_counter() - start

  def result(self) -> dict:
    return {"median_s": float(np.median(self.times)), "min_s": float(np.min(self.times)),
            "compile_s": self.compile_s, "loss": float(self.metrics["loss"]),
            "params": int(self.params)}


def profile_ops(stepper: "_Stepper", top: int, steps: int = 3
                ) -> list[tuple[str, float, str]]:
  """The ``top`` XLA ops by time per step, from a ``jax.profiler`` trace of ``steps`` steps.

  Returns ``(hlo op, ms per step, the JAX operation it came from)``, the last read
  from the compiled HLO's metadata; the trace is read back with
  ``jax.profiler.ProfileData``.
  """
  with tempfile.TemporaryDirectory() as d:
    jax.profiler.start_trace(d)
    for _ in range(steps):
      stepper.timed()
    jax.profiler.stop_trace()
    path = sorted(glob.glob(os.path.join(d, "**", "*.xplane.pb"), recursive=True))[-1]
    data = jax.profiler.ProfileData.from_file(path)
  total = op_time_ns(data.planes)
  hlo = stepper.step.as_text()
  source = dict(re.findall(r'%([\w.-]+) = .*?metadata=\{op_name="([^"]+)"', hlo))
  return [(name, ns / steps / 1e6, source.get(name, ""))
          for name, ns in total.most_common(top)]


def op_time_ns(planes) -> collections.Counter:
  """Nanoseconds per HLO op name in the planes of a ``jax.profiler.ProfileData``.

  A GPU (or TPU) trace has an "XLA Ops" line per device whose events are HLO ops;
  its "XLA Modules" and stream lines would count the same time again, so only
  those lines count there. A CPU trace has the HLO ops on the XLA thread-pool
  lines, beside the Python and PjRt client lines that are left out.
  """
  lines = [line for plane in planes for line in plane.lines]
  device_ops = [line for line in lines if line.name == "XLA Ops"]
  total = collections.Counter()
  for line in device_ops or lines:
    if line.name == "python" or "PjRt" in line.name:
      continue
    for event in line.events:
      if not event.name.startswith("ThunkExecutor"):
        total[event.name] += event.duration_ns
  return total


def time_models(models: dict, batch: dict, steps: int, profile: int = 0) -> dict[str, dict]:
  """Compiles every model's step, then times them interleaved, one step each in turn.

  Interleaving (and alternating who goes first) exposes every model to the same
  background load: timing one model's steps after the other's made the ratio
  swing by ±30% on a busy machine. ``profile > 0`` then traces a few more steps
  of each model and adds its ``top_ops`` (see :func:`profile_ops`).
  """
  steppers = {name: _Stepper(model, batch) for name, model in models.items()}
  names = list(steppers)
  for i in range(steps):
    for name in (names if i % 2 == 0 else names[::-1]):
      steppers[name].times.append(steppers[name].timed())
  results = {name: s.result() for name, s in steppers.items()}
  if profile:
    for name, s in steppers.items():
      try:
        results[name]["top_ops"] = ops = profile_ops(s, profile)
      except Exception as e:  # the timings above must still be reported and written
        print(f"\n{name}: profile failed ({type(e).__name__}: {e}); timings kept")
        continue
      print(f"\n{name}: top {profile} XLA ops, ms per step")
      for op, ms, where in ops:
        print(f"  {ms:8.1f}  {op:28s} {where[-90:]}")
  return results


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  gpu = jax.default_backend() == "gpu"
  p.add_argument("--size", default="multi30k", choices=list(SIZES))
  p.add_argument("--vocab", type=int, default=None, help="default: per --size")
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--src_len", type=int, default=32)
  p.add_argument("--tgt_len", type=int, default=32)
  p.add_argument("--dtype", default="bf16" if gpu else "fp32", choices=["fp32", "bf16"])
  p.add_argument("--steps", type=int, default=10, help="timed steps (after compiling and one warm-up step)")
  p.add_argument("--dropout", type=float, default=0.1,
                 help="embedding and residual dropout of both models")
  p.add_argument("--attention_dropout", type=float, default=None,
                 help="dropout on attention weights (default: --dropout); 0 lets a GPU run"
                      " cuDNN attention, which JAX offers without dropout")
  p.add_argument("--share_embeddings", action="store_true")
  p.add_argument("--logits_via_embedding", action="store_true")
  p.add_argument("--matmul_n", type=int, default=8192 if gpu else 2048)
  p.add_argument("--profile", type=int, default=0, metavar="N",
                 help="after timing, print each model's N most expensive XLA ops")
  p.add_argument("--out", default=None, help="default: benchmarks/out/train_step_<size>.json")
  args = p.parse_args(argv)

  from attention.models.transformer import Transformer, TransformerConfig
  from benchmarks.flax_transformer import FlaxTransformer, FlaxTransformerConfig

  d, layers, heads, mlp, vocab = SIZES[args.size]
  attention_dropout = args.dropout if args.attention_dropout is None else args.attention_dropout
  for name, rate in (("--dropout", args.dropout), ("--attention_dropout", attention_dropout)):
    if not 0.0 <= rate < 1.0:
      p.error(f"{name}={rate} must be in [0, 1)")
  vocab = args.vocab or vocab
  dtype = jnp.bfloat16 if args.dtype == "bf16" else jnp.float32
  ours_cfg = TransformerConfig(
      vocab_size=vocab, share_embeddings=args.share_embeddings,
      logits_via_embedding=args.logits_via_embedding, dtype=dtype, emb_dim=d,
      num_heads=heads, num_layers=layers, qkv_dim=d, mlp_dim=mlp,
      max_len=max(256, args.src_len, args.tgt_len), dropout_rate=args.dropout,
      attention_dropout_rate=attention_dropout)
  models = {"flax": FlaxTransformer(FlaxTransformerConfig.from_ours(ours_cfg)),
            "ours": Transformer(ours_cfg)}
  device = device_info.describe()
  print(f"device: {device} ({jax.default_backend()}), jax {jax.__version__}; size={args.size}"
        f" d={d} layers={layers} heads={heads} mlp={mlp} vocab={vocab} batch={args.batch}"
        f" S={args.src_len} T={args.tgt_len} dtype={args.dtype} dropout={args.dropout}"
        f" attention_dropout={attention_dropout}"
        f" host huge pages {'on' if huge_pages.active() else 'off'}", flush=True)
  peak = matmul_peak(dtype, args.matmul_n)
  print(f"matmul peak ({args.matmul_n}^3 {args.dtype}): {peak / 1e9:.1f} GFLOP/s", flush=True)
  flops = model_flops(d, d, mlp, vocab, layers, layers, args.batch, args.src_len, args.tgt_len)
  batch = _batch(args, vocab)
  tokens = args.batch * (args.src_len + args.tgt_len)
  rows = []
  results = time_models(models, batch, args.steps, args.profile)
  for name, r in results.items():
    t = r["median_s"]
    rows.append(dict(model=name, params=r["params"], ms_per_step=t * 1e3,
                     best_ms=r["min_s"] * 1e3, compile_s=r["compile_s"],
                     tokens_per_s=tokens / t, tgt_tokens_per_s=args.batch * args.tgt_len / t,
                     model_tflops_per_step=flops / 1e12, achieved_gflops=flops / t / 1e9,
                     mfu=flops / t / peak, loss_after=r["loss"], top_ops=r.get("top_ops")))
  base = rows[0]["ms_per_step"]
  for row in rows:
    row["speed_ratio_vs_flax"] = base / row["ms_per_step"]

  print(f"\n{'model':6s} {'params':>10s} {'ms/step':>9s} {'best ms':>9s} {'tok/s':>10s}"
        f" {'tgt tok/s':>10s} {'GFLOP/s':>9s} {'MFU':>7s} {'x vs flax':>9s} {'compile s':>9s}")
  for r in rows:
    print(f"{r['model']:6s} {r['params']:10d} {r['ms_per_step']:9.1f} {r['best_ms']:9.1f}"
          f" {r['tokens_per_s']:10.0f} {r['tgt_tokens_per_s']:10.0f} {r['achieved_gflops']:9.1f}"
          f" {r['mfu']:7.1%} {r['speed_ratio_vs_flax']:9.2f} {r['compile_s']:9.1f}")
  ours = rows[1]["ms_per_step"]
  print(f"\nours/peer throughput ratio: {base / ours:.3f} (model FLOPs/step:"
        f" {flops / 1e9:.2f} GFLOP)")
  out = args.out or f"benchmarks/out/train_step_{args.size}.json"
  os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
  with open(out, "w") as f:
    json.dump({"device": device, "backend": jax.default_backend(), "args": vars(args),
               "attention_dropout": attention_dropout,
               "huge_pages": huge_pages.active(),
               "matmul_peak_flops": peak, "model_flops_per_step": flops, "rows": rows},
              f, indent=1)
  print(f"wrote {out}")


if __name__ == "__main__":
  huge_pages.reexec_with_huge_pages()
  main()
