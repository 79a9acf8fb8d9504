"""Tests for the recurrent seq2seq models: RNNEncDec, RNNSearch, LuongSeq2Seq.

Compilation dominates the cost of these tests on CPU, so every model is
initialised once per configuration, compiled programs are shared between
tests, and programs are compiled without XLA's backend optimisations.
"""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from attention.models.luong_seq2seq import LuongSeq2Seq
from attention.models.base import BOS_ID, EOS_ID, PAD_ID
from attention.models.rnn_encdec import RNNEncDec
from attention.models.rnnsearch import RNNSearch

VOCAB = 12
EMB, HID = 16, 32
TOL = dict(rtol=1e-5, atol=1e-5)
# The programs here are tiny: XLA spends far longer optimising them than
# running them, and level 0 roughly halves compile time.
FAST_COMPILE = {"xla_backend_optimization_level": 0}

MODELS = {
    "rnn_encdec": lambda **kw: RNNEncDec(VOCAB, VOCAB, emb_dim=EMB, hidden_dim=HID, **kw),
    "rnnsearch": lambda **kw: RNNSearch(VOCAB, VOCAB, emb_dim=EMB, hidden_dim=HID, **kw),
    "luong": lambda **kw: LuongSeq2Seq(VOCAB, VOCAB, emb_dim=EMB, hidden_dim=HID, **kw),
}
# One configuration per model shared by the equivalence and padding tests:
# RNNsearch as in the paper (one layer; the maxout test stacks two), the other
# two stacked to exercise the multi-layer paths.
CONFIGS = {"rnn_encdec": {"num_layers": 2}, "rnnsearch": {}, "luong": {"num_layers": 2}}


def copy_batch(seed: int = 0, lengths=(5, 4, 3, 5, 2, 4, 5, 1)):
  """Right-padded copy task: target = source (content tokens then EOS)."""
  rng = np.random.RandomState(seed)
  src = np.full((len(lengths), max(lengths) + 1), PAD_ID, np.int32)
  for i, n in enumerate(lengths):
    src[i, :n] = rng.randint(3, VOCAB, size=n)
    src[i, n] = EOS_ID
  tgt_in = np.concatenate([np.full((len(lengths), 1), BOS_ID, np.int32), src[:, :-1]], 1)
  return jnp.asarray(src), jnp.asarray(tgt_in), jnp.asarray(src)


SRC, TGT_IN, TGT_OUT = copy_batch()


def run_fast(fn, *args):
  """Compiles ``fn`` for ``args`` (see ``FAST_COMPILE``) and runs it."""
  return compile_fast(fn, *args)(*args)


def compile_fast(fn, *args):
  return jax.jit(fn).lower(*args).compile(compiler_options=FAST_COMPILE)


def frozen(kwargs):
  return tuple(sorted(kwargs.items()))


def random_variables(model, seed=0):
  """Random params of the right shapes, ``N(0, 1/fan_in)``.

  Tracing ``model.init`` under ``eval_shape`` checks that init works while
  skipping the compile of its initialisers, which would cost more than any
  test here; the checks hold for any reasonable weights.
  """
  shapes = jax.eval_shape(model.init, jax.random.key(0), SRC, TGT_IN)
  rng = np.random.RandomState(seed)
  return jax.tree_util.tree_map(
      lambda s: jnp.asarray(rng.normal(0.0, 1.0, s.shape) / np.sqrt(s.shape[0]), s.dtype),
      shapes)


@functools.lru_cache(maxsize=None)
def _variables(name, config):
  return random_variables(MODELS[name](**dict(config)))


def variables_for(name, **config):
  # Parameter shapes do not depend on dropout: such models share weights.
  config.pop("dropout_rate", None)
  return _variables(name, frozen(config))


@functools.lru_cache(maxsize=None)
def _forward(name, config, src_len):
  model = MODELS[name](**dict(config))
  src = jnp.zeros((SRC.shape[0], src_len), jnp.int32)
  return compile_fast(lambda v, s, t: model.apply(v, s, t, return_alignments=True),
                      variables_for(name, **dict(config)), src, TGT_IN)


def forward(name, config, variables, src=SRC):
  """Compiled teacher-forced ``(logits, alignments)``, shared across tests."""
  return _forward(name, frozen(config), src.shape[1])(variables, src, TGT_IN)


def masked_xent(logits, targets):
  mask = (targets != PAD_ID).astype(jnp.float32)
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  return jnp.sum(losses * mask) / jnp.sum(mask)


def assert_alignments_are_distributions(weights, src):
  weights = np.asarray(weights)
  valid = np.broadcast_to(np.asarray(src != PAD_ID)[:, None, :], weights.shape)
  assert np.all(weights[~valid] == 0.0)
  assert np.all(weights >= 0.0)
  np.testing.assert_allclose(weights.sum(-1), 1.0, **TOL)


def step_by_step(model, variables, src, tgt_in):
  """Runs encode / init_decode_state / decode_step over the gold tokens."""
  def start(v, s):
    memory = model.apply(v, s, method=model.encode)
    return memory, model.apply(v, memory, tgt_in.shape[1], method=model.init_decode_state)

  memory, state = run_fast(start, variables, src)
  step_fn = lambda v, t, st, m: model.apply(v, t, st, m, method=model.decode_step)
  step = compile_fast(step_fn, variables, tgt_in[:, 0], state, memory)
  logits, aux = [], []
  for t in range(tgt_in.shape[1]):
    lg, state, a = step(variables, tgt_in[:, t], state, memory)
    logits.append(lg)
    aux.append(a)
  alignments = {k: jnp.stack([a[k] for a in aux], axis=1) for k in aux[0]}
  return jnp.stack(logits, axis=1), alignments, memory, state


# ---------------------------------------------------------------- overfitting
@pytest.mark.parametrize("name", list(MODELS))
def test_overfits_tiny_copy_task(name):
  model = MODELS[name](num_layers=1)
  opt = optax.adam(2e-2)
  loss_fn = lambda p: masked_xent(model.apply({"params": p}, SRC, TGT_IN), TGT_OUT)

  def train(params):
    def one_step(carry, _):
      params, opt_state = carry
      loss, grads = jax.value_and_grad(loss_fn)(params)
      updates, opt_state = opt.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state), loss
    (params, _), losses = jax.lax.scan(one_step, (params, opt.init(params)), None, length=120)
    return losses, model.apply({"params": params}, SRC, TGT_IN, return_alignments=True)

  losses, (logits, align) = run_fast(train, random_variables(model)["params"])
  final = float(masked_xent(logits, TGT_OUT))
  assert float(losses[0]) > 1.5  # starts near log(VOCAB) = 2.48
  assert final < 0.05, (name, final)
  valid = np.asarray(TGT_OUT != PAD_ID)
  np.testing.assert_array_equal(np.argmax(logits, -1)[valid], np.asarray(TGT_OUT)[valid])
  assert set(align) == ({"cross"} if name != "rnn_encdec" else set())
  for weights in align.values():
    assert_alignments_are_distributions(weights, SRC)


# ------------------------------------------- teacher forcing == decode_step
@pytest.mark.parametrize("name", list(MODELS))
def test_teacher_forcing_matches_decode_step_and_jit(name):
  model = MODELS[name](**CONFIGS[name])
  assert model.decode_collections == ()
  variables = variables_for(name, **CONFIGS[name])
  logits, align = forward(name, CONFIGS[name], variables)
  assert logits.shape == (*TGT_IN.shape, VOCAB) and logits.dtype == jnp.float32

  eager_logits, eager_align = model.apply(variables, SRC, TGT_IN, return_alignments=True)
  np.testing.assert_allclose(eager_logits, logits, **TOL)

  step_logits, step_align, memory, state = step_by_step(model, variables, SRC, TGT_IN)
  for leaf in jax.tree_util.tree_leaves((memory, state)):
    assert leaf.ndim >= 1 and leaf.shape[0] == SRC.shape[0]
  np.testing.assert_allclose(step_logits, logits, **TOL)
  assert set(step_align) == set(align) == set(eager_align)
  if name == "rnn_encdec":
    assert align == {}
  else:
    assert align["cross"].shape == (*TGT_IN.shape, SRC.shape[1])
  for key in align:
    np.testing.assert_allclose(eager_align[key], align[key], **TOL)
    np.testing.assert_allclose(step_align[key], align[key], **TOL)


# ------------------------------------------------------------------- padding
@pytest.mark.parametrize("name", list(MODELS))
def test_extra_padding_changes_nothing(name):
  variables = variables_for(name, **CONFIGS[name])
  padded = jnp.pad(SRC, ((0, 0), (0, 4)), constant_values=PAD_ID)
  logits, align = forward(name, CONFIGS[name], variables)
  logits_p, align_p = forward(name, CONFIGS[name], variables, padded)
  np.testing.assert_allclose(logits_p, logits, **TOL)
  assert set(align_p) == set(align)
  for key in align:
    assert_alignments_are_distributions(align_p[key], padded)
    np.testing.assert_allclose(align_p[key][..., : SRC.shape[1]], align[key], **TOL)


def test_rnn_encdec_summary_uses_true_length():
  model = MODELS["rnn_encdec"](**CONFIGS["rnn_encdec"])
  no_pad = jnp.where(SRC == PAD_ID, 5, SRC)

  def summaries(v):
    encode = lambda s: model.apply(v, s, method=model.encode)["summary"]
    return encode(SRC), encode(jnp.pad(SRC, ((0, 0), (0, 3)))), encode(no_pad)

  short, long, unpadded = run_fast(summaries, variables_for("rnn_encdec", **CONFIGS["rnn_encdec"]))
  np.testing.assert_allclose(long, short, **TOL)
  # Reading into the padding (e.g. taking the last column) would change c.
  assert not np.allclose(unpadded, short, atol=1e-3)


# ---------------------------------------------------------------- RNNsearch
@pytest.mark.parametrize("maxout", [True, False])
def test_rnnsearch_maxout_on_and_off(maxout):
  model = MODELS["rnnsearch"](num_layers=2, maxout=maxout, maxout_dim=8)
  variables = random_variables(model)
  output = variables["params"]["decoder"]["output"]
  # t~ = U_o s_{i-1} + V_o E y_{i-1} + C_o c_i reads [s; E y; c]: H + E + 2H.
  assert output["readout"]["kernel"].shape == (HID + EMB + 2 * HID, 16 if maxout else 8)
  assert output["logits"]["kernel"].shape == (8, VOCAB)
  assert variables["params"]["decoder"]["attention"]["key_proj"]["kernel"].shape == (2 * HID, HID)
  logits, align = run_fast(
      lambda v: model.apply(v, SRC, TGT_IN, return_alignments=True), variables)
  assert np.all(np.isfinite(logits))
  assert_alignments_are_distributions(align["cross"], SRC)


def test_rnnsearch_dropout_is_active_only_in_training():
  config = dict(CONFIGS["rnnsearch"], dropout_rate=0.3)
  model = MODELS["rnnsearch"](**config)
  variables = variables_for("rnnsearch", **config)

  def run(v, key_a, key_b):
    apply = lambda train, key: model.apply(v, SRC, TGT_IN, train=train, rngs={"dropout": key})
    return apply(False, key_a), apply(True, key_a), apply(True, key_b)

  eval_a, train_a, train_b = run_fast(run, variables, jax.random.key(1), jax.random.key(2))
  np.testing.assert_allclose(eval_a, forward("rnnsearch", CONFIGS["rnnsearch"], variables)[0],
                             **TOL)
  assert not np.allclose(train_a, eval_a, atol=1e-4)
  assert not np.allclose(train_a, train_b, atol=1e-4)


# -------------------------------------------------------------------- Luong
@pytest.mark.parametrize("score,mode", list(itertools.product(
    ("dot", "general", "concat"), ("global", "local-m", "local-p"))))
def test_luong_every_score_and_mode(score, mode):
  window = 1
  model = MODELS["luong"](num_layers=1, score=score, mode=mode, window=window)
  # Random weights of the right shapes: compiling nine initialisers would
  # dominate the runtime, and these checks hold for any weights.
  variables = random_variables(model)
  # Only local-p depends on padding in a way of its own (p_t scales with the
  # true length); extra padding for the other modes is covered above.
  extra = 2 if mode == "local-p" else 0
  padded = jnp.pad(SRC, ((0, 0), (0, extra)), constant_values=PAD_ID)
  apply = lambda v, s: model.apply(v, s, TGT_IN, return_alignments=True)
  (logits, align), (logits_p, align_p) = run_fast(
      lambda v: (apply(v, SRC), apply(v, padded) if extra else apply(v, SRC)), variables)

  assert np.all(np.isfinite(logits))
  np.testing.assert_allclose(logits_p, logits, **TOL)
  weights = np.asarray(align["cross"])
  np.testing.assert_allclose(np.asarray(align_p["cross"])[..., : SRC.shape[1]], weights, **TOL)
  valid = np.broadcast_to(np.asarray(SRC != PAD_ID)[:, None, :], weights.shape)
  assert np.all(weights[~valid] == 0.0)
  if mode == "global":
    assert_alignments_are_distributions(weights, SRC)
  else:
    # local-p multiplies by a Gaussian after the softmax, so rows sum to <= 1.
    assert np.all(weights.sum(-1) <= 1.0 + 1e-5)
  if mode == "local-m":
    # p_t = t, clamped to the sentence's last source position.
    last = np.asarray((SRC != PAD_ID).sum(-1)) - 1
    t = np.minimum(np.arange(TGT_IN.shape[1])[None, :], last[:, None])[..., None]
    s = np.arange(SRC.shape[1])[None, None, :]
    outside = np.abs(s - t) > window
    assert np.all(weights[outside] == 0.0)
    np.testing.assert_allclose(weights.sum(-1), 1.0, **TOL)


@pytest.mark.parametrize("input_feeding", [True, False])
def test_luong_input_feeding_param_shapes(input_feeding):
  model = MODELS["luong"](num_layers=2, input_feeding=input_feeding)
  shapes = jax.eval_shape(model.init, jax.random.key(0), SRC, TGT_IN)["params"]
  decoder = shapes["decoder"]
  bottom_in = EMB + HID if input_feeding else EMB
  for gate in "ifgo":
    assert decoder["cells_0"][f"i{gate}"]["kernel"].shape == (bottom_in, HID)
    assert decoder["cells_1"][f"i{gate}"]["kernel"].shape == (HID, HID)
  assert decoder["combine"]["kernel"].shape == (2 * HID, HID)
  assert decoder["output"]["kernel"].shape == (HID, VOCAB)
  assert shapes["encoder"]["layer_0"]["cell"]["ii"]["kernel"].shape == (EMB, HID)
  state = jax.eval_shape(
      lambda v: model.apply(v, model.apply(v, SRC, method=model.encode), TGT_IN.shape[1],
                            method=model.init_decode_state),
      {"params": shapes})
  assert ("feed" in state) == input_feeding
  if input_feeding:
    assert state["feed"].shape == (SRC.shape[0], HID)
