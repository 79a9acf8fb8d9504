"""Transformer / TransformerLM: training, masking, caching and configuration options.

Compilation dominates the run time on CPU, so the tests share a few jitted
functions and shapes: sources ``[8, 8]``, decoder inputs ``[8, 24]`` (the
length greedy/beam decoding returns: bucket 16 + ``max_extra`` 8).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from attention import decoding
from attention.models import EOS, PAD, Transformer, TransformerConfig, TransformerLM
from attention.models.base import shift_right

VOCAB = 16
MAX_EXTRA = 8
STEPS = 16 + MAX_EXTRA
TINY = TransformerConfig(
    vocab_size=VOCAB, emb_dim=32, num_heads=4, num_layers=1, num_decoder_layers=2,
    qkv_dim=32, mlp_dim=64, max_len=48, dropout_rate=0.0, attention_dropout_rate=0.0)


def reversal_batch(n: int = 8, seed: int = 0):
  """Sources of 3..7 words (ids 3..15), targets = the reversed source + EOS.

  Returns ``src [n, 8]``, ``tgt_in [n, 8]``, ``tgt_out [n, 8]``.
  """
  rng = np.random.default_rng(seed)
  src = np.zeros((n, 8), np.int32)
  tgt = np.zeros((n, 8), np.int32)
  for i in range(n):
    words = rng.integers(3, VOCAB, size=rng.integers(3, 8))
    src[i, :len(words)] = words
    tgt[i, :len(words) + 1] = [*words[::-1], EOS]
  return jnp.asarray(src), jnp.asarray(shift_right(tgt)), jnp.asarray(tgt)


def long(x):
  """Pads the time axis to ``STEPS``, the one decoder length the jitted calls see."""
  return jnp.pad(x, ((0, 0), (0, STEPS - x.shape[1])))


@functools.partial(jax.jit, static_argnames=("model",))
def _init(model, key, src, tgt_in):
  return model.init(key, src, tgt_in)


def init(model, seed=0):
  src, tgt_in, _ = reversal_batch()
  return _init(model, jax.random.key(seed), src, tgt_in)


@functools.partial(jax.jit, static_argnames=("model", "train"))
def forward(model, variables, src, tgt_in, *, train=False, rngs=None):
  """``(logits, alignments)`` of a teacher-forced pass."""
  return model.apply(variables, src, tgt_in, train=train, return_alignments=True, rngs=rngs)


def masked_xent(logits, targets):
  mask = targets != PAD
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  return jnp.sum(losses * mask) / jnp.sum(mask)


def train(cfg, steps=100, lr=3e-3):
  model = Transformer(cfg)
  src, tgt_in, tgt_out = reversal_batch()
  params = init(model)["params"]
  opt = optax.adam(lr)

  @jax.jit
  def step(params, opt_state):
    loss, grads = jax.value_and_grad(
        lambda p: masked_xent(model.apply({"params": p}, src, tgt_in), tgt_out))(params)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  opt_state, losses = opt.init(params), []
  for _ in range(steps):
    params, opt_state, loss = step(params, opt_state)
    losses.append(loss)
  return model, {"params": params}, [float(x) for x in losses]


@functools.lru_cache(maxsize=None)
def trained(pre_ln: bool):
  # The pre-LN model has one decoder layer: only to keep its compile short.
  cfg = TINY.replace(pre_ln=True, num_decoder_layers=1) if pre_ln else TINY
  return train(cfg)


def teacher_forced_logprob(model, variables, src, out, alpha):
  """Uncached ``sum log p(y_t) / lp(|y|)`` of output rows ``out [B, STEPS]``."""
  logits, _ = forward(model, variables, src, shift_right(out))
  logp = np.asarray(jax.nn.log_softmax(logits))
  tok_lp = np.take_along_axis(logp, np.asarray(out)[..., None], -1)[..., 0]
  real = np.asarray(out) != PAD
  return (tok_lp * real).sum(1) / ((5 + real.sum(1)) / 6) ** alpha


@pytest.mark.parametrize("pre_ln", [False, True], ids=["post_ln", "pre_ln"])
def test_overfits_tiny_batch(pre_ln):
  _, variables, losses = trained(pre_ln)
  assert losses[0] > 2.0 and losses[-1] < 0.05, (losses[0], losses[-1])
  for stack in ("encoder", "decoder"):
    assert ("final_norm" in variables["params"][stack]) == pre_ln


def test_jit_matches_eager():
  model, variables, _ = trained(False)
  src, tgt_in, _ = reversal_batch(seed=1)
  eager = model.apply(variables, src, long(tgt_in))
  jitted, _ = forward(model, variables, src, long(tgt_in))
  assert eager.dtype == jnp.float32 and eager.shape == (8, STEPS, VOCAB)
  np.testing.assert_allclose(eager, jitted, atol=1e-5, rtol=1e-5)


def test_padding_gets_zero_attention_and_changes_nothing():
  model = Transformer(TINY)
  variables = init(model, seed=2)
  src, tgt_in, _ = reversal_batch(seed=2)
  logits, align = forward(model, variables, src, long(tgt_in))
  cross = np.asarray(align["cross"])
  assert cross.shape == (8, 2, 4, STEPS, 8)                 # [B, layers, heads, T, S]
  pad = np.broadcast_to(np.asarray(src == PAD)[:, None, None, None, :], cross.shape)
  assert pad.any() and np.all(cross[pad] == 0.0)
  np.testing.assert_allclose(cross.sum(-1), 1.0, rtol=1e-5)
  logits2, align2 = forward(model, variables, jnp.pad(src, ((0, 0), (0, 9))), long(tgt_in))
  np.testing.assert_allclose(logits2, logits, atol=1e-5)
  np.testing.assert_allclose(align2["cross"][..., :8], cross, atol=1e-6)
  assert np.all(np.asarray(align2["cross"])[..., 8:] == 0.0)


def test_decode_state_is_the_kv_cache():
  model = Transformer(TINY)
  variables = init(model)
  src, _, _ = reversal_batch()
  state = jax.eval_shape(
      lambda v: decoding.make_decode_fns(model, v, src, max_len=20, beam_size=3)[0], variables)
  assert set(state) == {"cache"}
  layer = state["cache"]["decoder"]["layer_0"]["self_attention"]
  assert layer["cached_key"].shape == (8, 20, 4, 8)          # [B, max_len, heads, head_dim]
  assert layer["cache_index"].shape == () and state["cache"]["decoder"]["position"].shape == ()
  with pytest.raises(ValueError, match="max_len"):
    decoding.make_decode_fns(model, variables, src, max_len=TINY.max_len + 1)


def test_cached_greedy_matches_uncached_argmax():
  model, variables, _ = trained(False)
  src, _, tgt_out = reversal_batch()
  res = decoding.decode(model, variables, src, max_extra=MAX_EXTRA, return_alignments=True)
  tokens, cached_align = np.asarray(res.tokens), np.asarray(res.alignments["cross"])
  assert tokens.shape == (8, STEPS) and cached_align.shape == (8, STEPS, 2, 4, 16)
  # Uncached reference: a full pass over the prefix so far at every step.
  prefix = np.zeros((8, STEPS), np.int32)
  prefix[:, 0] = 1
  done = np.zeros(8, bool)
  for t in range(STEPS):
    logits, align = forward(model, variables, src, jnp.asarray(prefix))
    nxt = np.where(done, PAD, np.argmax(np.asarray(logits)[:, t], -1))
    np.testing.assert_array_equal(tokens[:, t], nxt)
    np.testing.assert_allclose(cached_align[~done, t, ..., :8],
                               np.asarray(align["cross"])[~done, :, :, t], atol=1e-5)
    assert np.all(cached_align[:, t, ..., 8:] == 0) and np.all(cached_align[done, t] == 0)
    done |= nxt == EOS
    if t + 1 < STEPS:
      prefix[:, t + 1] = nxt
    if done.all():
      break
  # Cached log-probabilities equal the uncached ones (greedy scores: alpha=0).
  np.testing.assert_allclose(
      res.scores, teacher_forced_logprob(model, variables, src, res.tokens, 0.0), atol=1e-4)
  # And the model did memorise the task.
  np.testing.assert_array_equal(tokens[:, :8], np.asarray(tgt_out))
  assert np.all(tokens[:, 8:] == PAD)


def test_beam_search_reorders_cache_correctly():
  model, variables, _ = trained(False)
  src, _, tgt_out = reversal_batch()
  alpha = 0.6
  res = decoding.decode(model, variables, src, beam_size=4, alpha=alpha, max_extra=MAX_EXTRA)
  np.testing.assert_array_equal(np.asarray(res.tokens)[:, :8], np.asarray(tgt_out))
  # Every returned beam's score is its true (uncached) normalised log-prob,
  # which fails if the cache rows were not reordered with the beams.
  scores = np.asarray(res.beam_scores)
  assert np.isfinite(scores).all() and np.all(np.diff(scores, axis=1) <= 1e-6)
  for j in range(4):
    want = teacher_forced_logprob(model, variables, src, res.beams[:, j], alpha)
    np.testing.assert_allclose(scores[:, j], want, rtol=1e-4, atol=1e-4)


def test_shared_embeddings_are_one_parameter():
  src, tgt_in, _ = reversal_batch()
  shapes = lambda m: jax.eval_shape(m.init, jax.random.key(0), src, tgt_in)["params"]
  count = lambda tree: sum(x.size for x in jax.tree.leaves(tree))
  separate = shapes(Transformer(TINY))
  shared = shapes(Transformer(TINY.replace(share_embeddings=True, logits_via_embedding=True)))
  tables = [x for x in jax.tree.leaves(shared) if x.shape == (VOCAB, 32)]
  assert len(tables) == 1 and list(shared["embedding"]) == ["embedding"]
  assert "logits_dense" not in shared["decoder"]
  assert {"src_embedding", "tgt_embedding"} <= set(separate)
  d = 32
  # Separate: source and target tables and a logits Dense; shared: one table.
  assert count(separate) - count(shared) == VOCAB * d + (d * VOCAB + VOCAB)
  with pytest.raises(ValueError, match="share_embeddings"):
    shapes(Transformer(TINY.replace(share_embeddings=True, output_vocab_size=20)))


def test_bfloat16_compute_keeps_float32_params():
  model = Transformer(TINY.replace(dtype=jnp.bfloat16))
  variables = init(Transformer(TINY))
  shapes = jax.eval_shape(lambda: init(model))
  assert {x.dtype for x in jax.tree.leaves(shapes)} == {jnp.dtype(jnp.float32)}
  assert jax.tree.structure(shapes) == jax.tree.structure(variables)
  src, tgt_in, _ = reversal_batch()
  logits, align = forward(model, variables, src, long(tgt_in))
  assert logits.dtype == jnp.float32 and np.isfinite(np.asarray(logits)).all()
  ref, _ = forward(Transformer(TINY), variables, src, long(tgt_in))
  np.testing.assert_allclose(logits, ref, atol=0.1)


def test_dropout_only_in_training():
  cfg = TINY.replace(dropout_rate=0.3, attention_dropout_rate=0.3)
  variables = init(Transformer(TINY))
  src, tgt_in, _ = reversal_batch()
  # An 'rbg' key: threefry dropout masks take far longer to compile on CPU.
  rngs = {"dropout": jax.random.key(1, impl="rbg")}
  # Dropout rates do not matter in eval mode, so TINY's pass is the reference.
  ref, _ = forward(Transformer(TINY), variables, src, long(tgt_in))
  dropped, _ = forward(Transformer(cfg), variables, src, long(tgt_in), train=True, rngs=rngs)
  assert np.abs(np.asarray(dropped) - np.asarray(ref)).max() > 0.1
  # config.deterministic overrides train=True (checked on the flag: another
  # compilation of the same graph would only cost time).
  assert Transformer(cfg.replace(deterministic=True))._deterministic(True)
  assert not Transformer(cfg)._deterministic(True) and Transformer(cfg)._deterministic(False)


def test_lm_cached_decode_equals_full_pass():
  model = TransformerLM(TINY.replace(num_decoder_layers=1, pre_ln=True,
                                     logits_via_embedding=True))
  tokens = jax.random.randint(jax.random.key(0), (3, 7), 1, VOCAB)

  @jax.jit
  def run(tokens):
    variables = model.init(jax.random.key(1), tokens)
    full = model.apply(variables, tokens)
    _, cache = model.apply(variables, 3, 7, method="init_decode_state", mutable=["cache"])
    # A 4-token prefill, then one token at a time.
    (logits, _, _), cache = model.apply({**variables, **cache}, tokens[:, :4],
                                        method="decode_step", mutable=["cache"])
    got = [logits]
    for t in range(4, 7):
      (logits, _, _), cache = model.apply({**variables, **cache}, tokens[:, t],
                                          method="decode_step", mutable=["cache"])
      got.append(logits[:, None])
    return variables, full, jnp.concatenate(got, 1)

  variables, full, cached = run(tokens)
  assert "logits_dense" not in variables["params"]["decoder"]
  assert full.shape == (3, 7, VOCAB)
  np.testing.assert_allclose(cached, full, atol=2e-5, rtol=1e-5)
