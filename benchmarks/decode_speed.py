"""Parameter counts and greedy / beam-4 decode speed of every seq2seq model at Multi30k sizes.

    python -m benchmarks.decode_speed                      # all models, CPU
    python -m benchmarks.decode_speed --models transformer rnnsearch --max_extra 0

Sizes: vocab 8000 (source and target), Transformer d256 3+3 layers 8 heads ff512
with shared/tied embeddings; RNNs emb 256 hidden 512 (Luong: 2 layers). Weights
are random, so an untrained model never emits EOS: every sentence runs all
``source length + max_extra`` steps, the worst case. Speeds are sentences/s at
batch 64 with mean source length ~13 tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from attention import decoding
from attention import models as M
from benchmarks import device_info

VOCAB = 8000


def build(name: str):
  rnn = dict(vocab_size=VOCAB, output_vocab_size=VOCAB, emb_dim=256, hidden_dim=512)
  if name == "transformer":
    return M.Transformer(M.TransformerConfig(
        vocab_size=VOCAB, share_embeddings=True, logits_via_embedding=True, emb_dim=256,
        qkv_dim=256, num_heads=8, num_layers=3, mlp_dim=512, max_len=128))
  return {"rnnencdec": lambda: M.RNNEncDec(**rnn),
          "rnnsearch": lambda: M.RNNSearch(**rnn),
          "luong": lambda: M.LuongSeq2Seq(**rnn, num_layers=2),
          "lstmn": lambda: M.LSTMNSeq2Seq(**rnn, max_len=128)}[name]()


def sources(batch: int, seed: int = 0) -> np.ndarray:
  rng = np.random.default_rng(seed)
  lengths = rng.integers(10, 17, size=batch)
  src = np.zeros((batch, 16), np.int32)
  for i, n in enumerate(lengths):
    src[i, :n - 1] = rng.integers(4, VOCAB, size=n - 1)
    src[i, n - 1] = M.EOS
  return src


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--models", nargs="+",
                 default=["transformer", "rnnencdec", "rnnsearch", "luong", "lstmn"])
  p.add_argument("--beams", type=int, nargs="+", default=[1, 4])
  p.add_argument("--max_extra", type=int, default=10)
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--out", default="benchmarks/out/decode_speed.json")
  args = p.parse_args(argv)
  src = sources(args.batch)
  rows = []
  device = device_info.describe()
  print(f"device {device}; batch {args.batch}; output steps <= "
        f"{16 + args.max_extra}")
  for name in args.models:
    model = build(name)
    variables = jax.jit(model.init)(jax.random.key(0), jnp.asarray(src), jnp.asarray(src))
    n_params = sum(x.size for x in jax.tree.leaves(variables["params"]))
    for beam in args.beams:
      run = lambda: decoding.decode(model, variables, src, beam_size=beam,
                                    max_extra=args.max_extra)
      t0 = time.perf_counter()
      jax.block_until_ready(run())
      compile_s = time.perf_counter() - t0
      best = float("inf")
      for _ in range(args.repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(run())
        best = min(best, time.perf_counter() - t0)
      row = dict(model=name, params=int(n_params), beam=beam, sent_per_s=args.batch / best,
                 ms_per_batch=best * 1e3, first_call_s=compile_s)
      rows.append(row)
      print(f"{name:12s} params {n_params / 1e6:6.2f}M  beam {beam}: {row['sent_per_s']:8.1f}"
            f" sent/s ({row['ms_per_batch']:7.1f} ms/batch; first call {compile_s:5.1f} s)",
            flush=True)
  os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
  with open(args.out, "w") as f:
    json.dump({"device": device, "args": vars(args), "rows": rows}, f,
              indent=1)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  from attention import huge_pages
  huge_pages.reexec_with_huge_pages()
  main()
