"""Tests for attention.models.lstmn: the LSTMN language model and seq2seq.

Compilation dominates on CPU, so the file keeps it down: tiny widths, few
model configurations, jitted helpers shared across tests (model as a static
argument), and parameters drawn with NumPy at the shapes ``eval_shape``
reports instead of running the initialisers (compiling ``model.init`` costs
several times what compiling a forward pass does).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from attention.decoding import greedy_search, make_decode_fns
from attention.models.base import BOS, EOS, PAD
from attention.models.lstmn import LSTMNLanguageModel, LSTMNSeq2Seq

VOCAB, EMB, HID = 12, 16, 32
TOL = dict(rtol=1e-5, atol=1e-5)
LENGTHS = (5, 4, 3, 5, 2, 4, 5, 1)


def reverse_batch(seed: int = 0):
  """Right-padded reversal task: target = reversed source, then EOS."""
  rng = np.random.RandomState(seed)
  src = np.full((len(LENGTHS), max(LENGTHS) + 1), PAD, np.int32)
  tgt_out = np.full_like(src, PAD)
  for i, n in enumerate(LENGTHS):
    src[i, :n] = rng.randint(3, VOCAB, size=n)
    tgt_out[i, :n] = src[i, :n][::-1]
    tgt_out[i, n] = EOS
  tgt_in = np.concatenate([np.full((len(LENGTHS), 1), BOS, np.int32), tgt_out[:, :-1]], 1)
  tgt_in[tgt_out == PAD] = PAD
  return jnp.asarray(src), jnp.asarray(tgt_in), jnp.asarray(tgt_out)


def lm_batch(seed: int = 1):
  """Distinct first tokens (so every sequence is predictable), then EOS and PAD."""
  rng = np.random.RandomState(seed)
  tokens = np.full((len(LENGTHS), max(LENGTHS) + 2), PAD, np.int32)
  for i, n in enumerate(LENGTHS):
    tokens[i, 0] = 3 + i
    tokens[i, 1:n + 1] = rng.randint(3, VOCAB, size=n)
    tokens[i, n + 1] = EOS
  return jnp.asarray(tokens)


SRC, TGT_IN, TGT_OUT = reverse_batch()
LM_TOKENS = lm_batch()
LM_IN, LM_OUT = LM_TOKENS[:, :-1], LM_TOKENS[:, 1:]

# The configurations the tests draw from (each one is a compile-cache key).
# Overfitting, whose gradient compiles dominate the file, uses one layer;
# SHALLOW and the LM of the decode test cover stacking elsewhere.
DEEP = LSTMNSeq2Seq(VOCAB, VOCAB, emb_dim=EMB, hidden_dim=HID, fusion="deep")
SHALLOW = LSTMNSeq2Seq(VOCAB, VOCAB, emb_dim=EMB, hidden_dim=HID, num_layers=2,
                       fusion="shallow", readout_context=True)
SHALLOW_1 = SHALLOW.clone(num_layers=1, readout_context=False)
LM = LSTMNLanguageModel(VOCAB, emb_dim=EMB, hidden_dim=HID)


@functools.lru_cache(maxsize=None)
def _param_shapes(model, *arg_shapes):
  args = [jax.ShapeDtypeStruct(shape, jnp.int32) for shape in arg_shapes]
  return jax.eval_shape(model.init, jax.random.key(0), *args)["params"]


def init_params(model, *args, seed: int = 0):
  """Random parameters at the model's shapes: kernels and embeddings
  ``N(0, 1 / fan_in)``, vectors ``N(0, 0.1^2)`` (no term is trivially zero)."""
  rng = np.random.RandomState(seed)
  leaves, tree = jax.tree_util.tree_flatten(_param_shapes(model, *(a.shape for a in args)))
  draw = lambda s: rng.normal(size=s.shape) * (s.shape[0] ** -0.5 if len(s.shape) > 1 else 0.1)
  return jax.tree_util.tree_unflatten(tree, [jnp.asarray(draw(s), s.dtype) for s in leaves])


def masked_xent(logits, targets):
  mask = (targets != PAD).astype(jnp.float32)
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  return jnp.sum(losses * mask) / jnp.sum(mask)


@functools.partial(jax.jit, static_argnums=0)
def forward(model, params, *inputs):
  return model.apply({"params": params}, *inputs, return_alignments=True)


def overfit(loss_fn, params, steps: int = 200):
  """``steps`` Adam updates in one jitted scan; returns ``(params, losses)``."""
  opt = optax.adam(1e-2)

  def one_step(carry, _):
    p, opt_state = carry
    loss, grads = jax.value_and_grad(loss_fn)(p)
    updates, opt_state = opt.update(grads, opt_state, p)
    return (optax.apply_updates(p, updates), opt_state), loss

  run = jax.jit(lambda p: jax.lax.scan(one_step, (p, opt.init(p)), None, length=steps))
  (params, _), losses = run(params)
  return params, losses


# ---------------------------------------------------------------- overfitting
def test_lm_overfits_tiny_batch():
  params = init_params(LM, LM_IN)
  params, losses = overfit(lambda p: masked_xent(LM.apply({"params": p}, LM_IN), LM_OUT), params)
  assert losses[0] > 1.5  # starts near log(VOCAB)
  assert float(losses[-1]) < 0.05, float(losses[-1])


@pytest.mark.parametrize("model", [DEEP, SHALLOW_1], ids=["deep", "shallow"])
def test_seq2seq_overfits_reversal_and_greedy_decodes_it(model):
  params = init_params(model, SRC, TGT_IN)
  params, losses = overfit(
      lambda p: masked_xent(model.apply({"params": p}, SRC, TGT_IN), TGT_OUT), params)
  assert losses[0] > 1.5
  assert float(losses[-1]) < 0.05, float(losses[-1])

  # Through the shared search code, on encode()'s own memory: the protocol
  # works end to end and PAD fed to finished rows is harmless.
  result = greedy(model, params)
  np.testing.assert_array_equal(result.tokens, TGT_OUT)
  assert result.alignments["inter"].shape == (*TGT_OUT.shape, SRC.shape[1])


@functools.partial(jax.jit, static_argnums=0)
def greedy(model, params):
  state, step_fn = make_decode_fns(model, {"params": params}, SRC, max_len=TGT_OUT.shape[1])
  return greedy_search(step_fn, state, batch_size=SRC.shape[0], max_len=TGT_OUT.shape[1])


# ------------------------------------------- teacher forcing == decode_step
@functools.partial(jax.jit, static_argnums=(0, 4))
def seq2seq_step_by_step(model, params, src, tgt_in, max_len, enc_noise):
  """encode, init_decode_state, then decode_step once per gold token.

  ``enc_noise [B, S, H]`` is added to every encoder memory tape (alpha), or
  becomes the tape where the model has none (shallow fusion), so the fusion
  test shares this compilation: zeros leave a deep model unchanged.
  """
  v = {"params": params}
  memory = model.apply(v, src, method=model.encode)
  tapes = tuple(tape._replace(memory=enc_noise if tape.memory is None else
                              tape.memory + enc_noise) for tape in memory["tapes"])
  state = model.apply(v, memory, max_len, method=model.init_decode_state)

  def one(state, tokens):
    logits, state, aux = model.apply(v, tokens, state, {**memory, "tapes": tapes},
                                     method=model.decode_step)
    return state, (logits, aux)

  state, outs = jax.lax.scan(one, state, tgt_in.T)
  return jax.tree_util.tree_map(lambda x: jnp.moveaxis(x, 0, 1), outs), memory, state


NO_NOISE = jnp.zeros((*SRC.shape, HID), jnp.float32)


@pytest.mark.parametrize("model", [DEEP, SHALLOW], ids=["deep", "shallow"])
def test_seq2seq_teacher_forcing_matches_decode_step(model):
  assert type(model).decode_collections == () and model.decode_collections == ()
  params = init_params(model, SRC, TGT_IN, seed=1)
  logits, align = forward(model, params, SRC, TGT_IN)
  (b, t), s = TGT_IN.shape, SRC.shape[1]
  assert logits.shape == (b, t, VOCAB) and logits.dtype == jnp.float32
  assert align["inter"].shape == (b, t, s) and align["intra"].shape == (b, t, t)

  # Two spare slots: the decode state may be longer than the sequence.
  (step_logits, aux), memory, state = seq2seq_step_by_step(
      model, params, SRC, TGT_IN, t + 2, NO_NOISE)
  for leaf in jax.tree_util.tree_leaves((memory, state)):
    assert leaf.ndim == 0 or leaf.shape[0] == b  # beam search gathers along axis 0
  np.testing.assert_allclose(step_logits, logits, **TOL)
  np.testing.assert_allclose(aux["inter"], align["inter"], **TOL)
  np.testing.assert_allclose(aux["intra"][..., :t], align["intra"], **TOL)
  assert np.all(np.asarray(aux["intra"][..., t:]) == 0.0)
  # Intra-attention is causal and skips padding: row t covers the real
  # positions before t (all of them, summing to one, once there is any).
  intra = np.asarray(align["intra"])
  assert np.all(intra[:, np.triu(np.ones((t, t), bool))] == 0.0)
  assert np.all(intra[np.broadcast_to(np.asarray(TGT_IN == PAD)[:, None, :], intra.shape)] == 0)
  np.testing.assert_allclose(intra.sum(-1)[:, 1:], np.asarray(TGT_IN[:, 1:] != PAD), **TOL)


def test_lm_teacher_forcing_matches_decode_step_and_jit():
  # Two layers, and max_len < T: both paths must cap the tapes the same way.
  # The eager pass stands for both models (it costs as much as a compile).
  model = LSTMNLanguageModel(VOCAB, emb_dim=EMB, hidden_dim=HID, num_layers=2, max_len=4)
  params = init_params(model, LM_TOKENS, seed=2)
  logits, align = forward(model, params, LM_TOKENS)
  eager_logits, eager_align = model.apply({"params": params}, LM_TOKENS, return_alignments=True)
  np.testing.assert_allclose(eager_logits, logits, **TOL)
  np.testing.assert_allclose(eager_align["intra"], align["intra"], **TOL)
  b, t = LM_TOKENS.shape
  assert logits.shape == (b, t, VOCAB) and align["intra"].shape == (b, 2, t, 4)

  @jax.jit
  def step_by_step(p):
    state = model.apply({"params": p}, b, t, method=model.init_decode_state)

    def one(st, tok):
      logits, st, aux = model.apply({"params": p}, tok, st, method=model.decode_step)
      return st, (logits, aux)

    return jax.lax.scan(one, state, LM_TOKENS.T)

  _, (step_logits, aux) = step_by_step(params)
  np.testing.assert_allclose(jnp.moveaxis(step_logits, 0, 1), logits, **TOL)
  np.testing.assert_allclose(jnp.moveaxis(aux["intra"], 0, 2), align["intra"], **TOL)
  # Steps past the last slot still attend, over the 4 stored positions.
  np.testing.assert_allclose(np.asarray(align["intra"])[0, :, 4:].sum(-1), 1.0, **TOL)


# ------------------------------------------------------------------- padding
def test_padded_source_gets_zero_inter_attention_and_changes_nothing():
  params = init_params(SHALLOW, SRC, TGT_IN, seed=3)
  padded = jnp.pad(SRC, ((0, 0), (0, 3)), constant_values=PAD)
  logits, align = forward(SHALLOW, params, SRC, TGT_IN)
  logits_p, align_p = forward(SHALLOW, params, padded, TGT_IN)
  np.testing.assert_allclose(logits_p, logits, rtol=1e-6, atol=1e-6)
  inter = np.asarray(align_p["inter"])
  src_valid = np.broadcast_to(np.asarray(padded != PAD)[:, None, :], inter.shape)
  assert np.all(inter[~src_valid] == 0.0)
  np.testing.assert_allclose(inter[..., :SRC.shape[1]], align["inter"], rtol=1e-6, atol=1e-6)
  # Real target steps spread all their mass over real source tokens.
  np.testing.assert_allclose(inter.sum(-1), np.asarray(TGT_IN != PAD, np.float32), **TOL)


# -------------------------------------------------------------------- fusion
@pytest.mark.parametrize("model", [DEEP, SHALLOW], ids=["deep", "shallow"])
def test_only_deep_fusion_reads_the_encoder_memory_tape(model):
  params = init_params(model, SRC, TGT_IN, seed=1)  # as in the test above: cached
  deep = model.fusion == "deep"
  assert ("W_r" in params["decoder_0"]) == deep
  assert ("W_gates_ctx" in params["decoder_0"]) == (not deep)
  memory = jax.eval_shape(lambda: model.apply({"params": params}, SRC, method=model.encode))
  assert all((tape.memory is None) != deep for tape in memory["tapes"])

  logits, align = forward(model, params, SRC, TGT_IN)
  noise = jnp.asarray(np.random.RandomState(5).normal(size=NO_NOISE.shape), jnp.float32)
  (logits_n, align_n), _, _ = seq2seq_step_by_step(
      model, params, SRC, TGT_IN, TGT_IN.shape[1] + 2, noise)
  # p^t depends on the layer input, gamma~_{t-1} and the encoder *hidden*
  # tape only. For a one-layer deep model and for shallow fusion at any depth
  # none of these sees the memory tape, so the alignment ignores it...
  np.testing.assert_allclose(align_n["inter"], align["inter"], **TOL)
  if deep:
    # ...while the fused memory moves every real step's output.
    diff = np.abs(np.asarray(logits_n - logits)).max(-1)
    assert np.all(diff[np.asarray(TGT_IN != PAD)] > 1e-3), diff
  else:
    # ...and shallow fusion ignores a memory tape entirely.
    np.testing.assert_allclose(logits_n, logits, **TOL)


# ------------------------------------------------------------------- misc
def test_dropout_only_in_training_and_bad_fusion():
  model = DEEP.clone(dropout_rate=0.3)
  params = init_params(model, SRC, TGT_IN, seed=6)
  run = jax.jit(lambda key: model.apply({"params": params}, SRC, TGT_IN, train=True,
                                        rngs={"dropout": key}))
  train_a, train_b = run(jax.random.key(1)), run(jax.random.key(2))
  # Reference: the same parameters in the dropout-free configuration.
  eval_logits, _ = forward(DEEP, params, SRC, TGT_IN)
  assert not np.allclose(train_a, eval_logits, atol=1e-4)
  assert not np.allclose(train_a, train_b, atol=1e-4)
  with pytest.raises(ValueError, match="fusion"):
    jax.eval_shape(DEEP.clone(fusion="medium").init, jax.random.key(0), SRC, TGT_IN)
