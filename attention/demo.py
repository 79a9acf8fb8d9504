"""A one-minute tour: every mechanism of the library on random data.

    python -m attention.demo

Prints, for each module, a check that means something: backends agreeing with
each other, KV-cache decoding agreeing with the full pass, alignment rows
summing to one, the LSTMN's intra-attention staying on the past.
"""

from __future__ import annotations

import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import attention


def _timed(fn, *args):
  jax.block_until_ready(fn(*args))
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  return (time.perf_counter() - start) * 1e3


def scaled_dot_product(rng) -> None:
  b, t, h, d = 2, 512, 4, 64
  q, k, v = (jax.random.normal(key, (b, t, h, d)) for key in jax.random.split(rng, 3))
  mask = nn.make_causal_mask(jnp.ones((b, t)), dtype=bool)
  outs = {}
  for impl in ("xla", "chunked"):
    fn = jax.jit(lambda q, k, v, impl=impl: attention.dot_product_attention(
        q, k, v, is_causal=True, implementation=impl))
    outs[impl] = fn(q, k, v)
    print(f"  dot_product_attention[{impl:7s}] causal T={t}: {_timed(fn, q, k, v):6.1f} ms")
  flax_fn = jax.jit(lambda q, k, v: nn.dot_product_attention(q, k, v, mask=mask))
  print(f"  flax.linen.dot_product_attention      : {_timed(flax_fn, q, k, v):6.1f} ms")
  diff = float(jnp.max(jnp.abs(outs["xla"] - outs["chunked"])))
  print(f"  xla vs chunked max |diff| = {diff:.1e}; auto picks "
        f"{attention.default_implementation(q, k, is_causal=True)!r} on {jax.default_backend()}")


def multi_head(rng) -> None:
  x = jax.random.normal(rng, (2, 12, 64))
  mha = attention.MultiHeadAttention(num_heads=8, num_kv_heads=2, rotary=True)
  params = mha.init(rng, x)["params"]
  full = mha.apply({"params": params}, x, is_causal=True)
  dec = attention.MultiHeadAttention(num_heads=8, num_kv_heads=2, rotary=True, decode=True)
  cache = dec.init(rng, x)["cache"]
  y, mut = dec.apply({"params": params, "cache": cache}, x[:, :5], mutable=["cache"])
  steps = [y]
  for i in range(5, 12):
    y, mut = dec.apply({"params": params, "cache": mut["cache"]}, x[:, i:i + 1], mutable=["cache"])
    steps.append(y)
  diff = float(jnp.max(jnp.abs(jnp.concatenate(steps, 1) - full)))
  print(f"  MultiHeadAttention GQA 8q/2kv + RoPE: prefill 5 + 7 cached steps vs full pass,"
        f" max |diff| = {diff:.1e}")


def additive_and_luong(rng) -> None:
  keys = jax.random.normal(rng, (2, 9, 32))
  query = jax.random.normal(jax.random.fold_in(rng, 1), (2, 32))
  mask = jnp.arange(9)[None] < jnp.array([[9], [6]])
  add = attention.AdditiveAttention(hidden_dim=16)
  ctx, w = add.apply(add.init(rng, query, keys, mask=mask), query, keys, mask=mask)
  print(f"  AdditiveAttention: context {ctx.shape}, weights sum {np.asarray(w.sum(-1)).round(4)},"
        f" weight on padding {float(w[1, 6:].sum()):.1f}")
  for score, mode in (("dot", "global"), ("general", "local-m"), ("concat", "local-p")):
    luong = attention.LuongAttention(score=score, mode=mode, window=2)
    variables = luong.init(rng, query, keys, mask=mask, step=jnp.array(4))
    _, w = luong.apply(variables, query, keys, mask=mask, step=jnp.array(4))
    nz = np.nonzero(np.asarray(w[0]) > 1e-6)[0]
    print(f"  LuongAttention[{score}, {mode}]: attended source positions {nz.tolist()}")


def lstmn(rng) -> None:
  x = jax.random.normal(rng, (1, 6, 16))
  layer = attention.LSTMN(features=32)
  variables = layer.init(rng, x)
  h, weights = layer.apply(variables, x, return_weights=True)
  w = np.asarray(weights[0])
  print(f"  LSTMN: hidden {h.shape}; intra-attention is strictly on the past:"
        f" upper triangle sum = {np.triu(w).sum():.1f}; row sums {w.sum(-1).round(3).tolist()}")


def main() -> None:
  rng = jax.random.key(0)
  print(f"attention demo on {jax.devices()[0].device_kind} (jax {jax.__version__})")
  for title, fn in (("Scaled dot-product attention (Vaswani et al. 2017)", scaled_dot_product),
                    ("Multi-head attention", multi_head),
                    ("Bahdanau and Luong attention (2015)", additive_and_luong),
                    ("LSTMN (Cheng et al. 2016)", lstmn)):
    print(title)
    fn(rng)


if __name__ == "__main__":
  main()
