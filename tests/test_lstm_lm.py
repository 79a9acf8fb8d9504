"""Tests for attention.models.lstm_lm: the plain stacked-LSTM language model.

Compilation dominates on CPU, so the tests share one jitted forward (model
static) and draw parameters with NumPy at the shapes ``eval_shape`` reports.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from attention.models import LSTMLanguageModel
from attention.models.base import EOS, PAD

VOCAB, EMB, HID = 12, 16, 32
TOL = dict(rtol=1e-5, atol=1e-5)
LENGTHS = (5, 4, 3, 5, 2, 4, 5, 1)
MODEL = LSTMLanguageModel(VOCAB, emb_dim=EMB, hidden_dim=HID, num_layers=2)


def lm_batch(seed: int = 1) -> jax.Array:
  """Distinct first tokens (so every sequence is predictable), then EOS and PAD."""
  rng = np.random.RandomState(seed)
  tokens = np.full((len(LENGTHS), max(LENGTHS) + 2), PAD, np.int32)
  for i, n in enumerate(LENGTHS):
    tokens[i, 0] = 3 + i
    tokens[i, 1:n + 1] = rng.randint(3, VOCAB, size=n)
    tokens[i, n + 1] = EOS
  return jnp.asarray(tokens)


LM_TOKENS = lm_batch()
LM_IN, LM_OUT = LM_TOKENS[:, :-1], LM_TOKENS[:, 1:]


def init_params(model: LSTMLanguageModel, tokens: jax.Array, seed: int = 0):
  """Random parameters at the model's shapes: kernels and embeddings
  ``N(0, 1 / fan_in)``, vectors ``N(0, 0.1^2)`` (no term is trivially zero)."""
  shapes = jax.eval_shape(model.init, jax.random.key(0),
                          jax.ShapeDtypeStruct(tokens.shape, jnp.int32))["params"]
  rng = np.random.RandomState(seed)
  leaves, tree = jax.tree_util.tree_flatten(shapes)
  draw = lambda s: rng.normal(size=s.shape) * (s.shape[0] ** -0.5 if len(s.shape) > 1 else 0.1)
  return jax.tree_util.tree_unflatten(tree, [jnp.asarray(draw(s), s.dtype) for s in leaves])


@functools.partial(jax.jit, static_argnums=0)
def forward(model, params, tokens):
  return model.apply({"params": params}, tokens)


# ----------------------------------------------------------- numpy reference
def _sigmoid(x: np.ndarray) -> np.ndarray:
  return 1.0 / (1.0 + np.exp(-x))


def reference_logits(params, tokens: np.ndarray, num_layers: int) -> np.ndarray:
  """Float64 stacked LSTM ``[B, T] -> [B, T, V]`` from the model's own params.

  Gates in flax's order and naming: input kernels ``ii, if, ig, io`` (no
  bias), recurrent kernels and biases ``hi, hf, hg, ho``. ``PAD`` steps leave
  ``(c, h)`` unchanged and output zeros.
  """
  p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)
  b, t = tokens.shape
  valid = tokens != PAD
  x = p["embed"]["embedding"][tokens]                      # [B, T, E]
  for layer in range(num_layers):
    q = p[f"cells_{layer}"]
    pre = lambda g, xt, h: xt @ q[f"i{g}"]["kernel"] + h @ q[f"h{g}"]["kernel"] + q[f"h{g}"]["bias"]
    c = np.zeros((b, HID))
    h = np.zeros((b, HID))
    out = np.zeros((b, t, HID))
    for s in range(t):
      xt = x[:, s]
      i, f = _sigmoid(pre("i", xt, h)), _sigmoid(pre("f", xt, h))
      g, o = np.tanh(pre("g", xt, h)), _sigmoid(pre("o", xt, h))
      c_new = f * c + i * g
      h_new = o * np.tanh(c_new)
      m = valid[:, s, None]
      c, h = np.where(m, c_new, c), np.where(m, h_new, h)
      out[:, s] = np.where(m, h_new, 0.0)
    x = out
  return x @ p["output"]["kernel"] + p["output"]["bias"]


def test_logits_match_numpy_reference_lstm():
  # A PAD in the middle of a row too: it must be skipped, not just trailing.
  tokens = np.asarray(LM_TOKENS).copy()
  tokens[0, 2] = PAD
  params = init_params(MODEL, LM_TOKENS, seed=1)
  logits = forward(MODEL, params, jnp.asarray(tokens))
  assert logits.shape == (*tokens.shape, VOCAB) and logits.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(logits, np.float64),
                             reference_logits(params, tokens, num_layers=2), **TOL)


def test_parameter_count_formula():
  model = LSTMLanguageModel(65, emb_dim=256, hidden_dim=512, num_layers=2)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 4), jnp.int32))
  count = sum(x.size for x in jax.tree_util.tree_leaves(shapes))
  v, e, h = 65, 256, 512
  assert count == v * e + 4 * h * (e + h + 1) + 4 * h * (h + h + 1) + (h + 1) * v == 3_724_097


# ----------------------------------------------------------------- causality
def test_changing_token_t_changes_no_earlier_logits():
  params = init_params(MODEL, LM_TOKENS, seed=2)
  base = np.asarray(forward(MODEL, params, LM_TOKENS))
  t = 3
  changed = np.asarray(LM_TOKENS).copy()
  changed[:, t] = np.where(changed[:, t] == 4, 5, 4)      # differs in every row
  logits = np.asarray(forward(MODEL, params, jnp.asarray(changed)))
  # Changing token t leaves every earlier logit bit-identical...
  np.testing.assert_array_equal(logits[:, :t], base[:, :t])
  # ...and does move every later real position (PAD outputs stay zero).
  moved = np.abs(logits[:, t:] - base[:, t:]).max(-1) > 1e-6
  later_real = np.asarray(changed[:, t:] != PAD)
  np.testing.assert_array_equal(moved, later_real)


# ------------------------------------------- teacher forcing == decode_step
def test_teacher_forcing_matches_decode_step_and_no_alignments():
  params = init_params(MODEL, LM_TOKENS, seed=3)
  logits = forward(MODEL, params, LM_TOKENS)
  b, t = LM_TOKENS.shape

  @jax.jit
  def step_by_step(p):
    state = MODEL.apply({"params": p}, b, t, method=MODEL.init_decode_state)

    def one(st, tok):
      step_logits, st, aux = MODEL.apply({"params": p}, tok, st, method=MODEL.decode_step)
      assert aux == {}
      return st, step_logits

    return jax.lax.scan(one, state, LM_TOKENS.T)[1]

  np.testing.assert_allclose(jnp.moveaxis(step_by_step(params), 0, 1), logits, **TOL)
  _, align = jax.eval_shape(
      lambda p: MODEL.apply({"params": p}, LM_TOKENS, return_alignments=True), params)
  assert align == {}


# ---------------------------------------------------------------- overfitting
def test_overfits_tiny_batch():
  params = init_params(MODEL, LM_IN, seed=0)
  mask = (LM_OUT != PAD).astype(jnp.float32)

  def loss_fn(p):
    losses = optax.softmax_cross_entropy_with_integer_labels(
        MODEL.apply({"params": p}, LM_IN), LM_OUT)
    return jnp.sum(losses * mask) / jnp.sum(mask)

  opt = optax.adam(1e-2)

  def one_step(carry, _):
    p, opt_state = carry
    loss, grads = jax.value_and_grad(loss_fn)(p)
    updates, opt_state = opt.update(grads, opt_state, p)
    return (optax.apply_updates(p, updates), opt_state), loss

  run = jax.jit(lambda p: jax.lax.scan(one_step, (p, opt.init(p)), None, length=200))
  _, losses = run(params)
  assert losses[0] > 1.5  # starts near log(VOCAB)
  assert float(losses[-1]) < 0.05, float(losses[-1])
