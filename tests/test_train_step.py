"""The train step's options: gradient accumulation, bf16 compute, schedules."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments import optim, train
from experiments.configs import default
from experiments.data import create_datasets
from experiments.models import create_model


def _setup(**overrides):
  c = default.get_config()
  c.model.emb_dim = c.model.qkv_dim = 16
  c.model.mlp_dim, c.model.num_layers = 32, 1
  c.label_smoothing = 0.1
  for key, value in overrides.items():
    node = c
    *path, leaf = key.split(".")
    for p in path:
      node = node[p]
    node[leaf] = value
  ds = create_datasets(c.data, seed=0, batch_size=8)
  model = create_model(c.model, src_vocab_size=ds.src_vocab.size,
                       tgt_vocab_size=ds.tgt_vocab.size, max_len=64)
  tx = optim.make_optimizer(c)
  batch = next(ds.train)
  params = model.init({"params": jax.random.key(0)}, batch["src"], batch["tgt_in"])["params"]
  state = train.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                           opt_state=tx.init(params), rng=jax.random.key_data(jax.random.key(1)))
  return c, model, tx, state, batch


def test_gradient_accumulation_equals_one_big_batch():
  c, model, _, state, batch = _setup()
  # Plain SGD, so equal updates mean equal gradients (Adam's first step is
  # ~lr*sign(g), which amplifies rounding on near-zero components).
  tx = optax.inject_hyperparams(optax.sgd)(learning_rate=1.0)
  state = state.replace(opt_state=tx.init(state.params))
  one = jax.jit(train.make_train_step(model, tx, "seq2seq", c))
  c.grad_accum_steps = 4
  four = jax.jit(train.make_train_step(model, tx, "seq2seq", c))
  (s1, m1), (s4, m4) = (f(state, batch, np.float32(1e-3)) for f in (one, four))
  # Dropout is off in the default config, so the micro-batch RNG split is moot.
  assert float(m1["loss"]) == pytest.approx(float(m4["loss"]), rel=1e-5)
  assert float(m1["tokens"]) == float(m4["tokens"])
  for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s4.params)):
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-4)
  assert float(m1["grad_norm"]) == pytest.approx(float(m4["grad_norm"]), rel=1e-5)


def test_bf16_compute_keeps_fp32_params_and_trains():
  c, model, tx, state, batch = _setup(**{"model.dtype": "bfloat16"})
  step = jax.jit(train.make_train_step(model, tx, "seq2seq", c))
  losses = []
  for _ in range(30):
    state, m = step(state, batch, np.float32(3e-3))
    losses.append(float(m["loss"]))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.params))
  assert np.isfinite(losses).all() and losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize("schedule", optim.SCHEDULES)
def test_schedules_warm_up_then_follow_their_shape(schedule):
  c = default.get_config()
  c.schedule, c.learning_rate, c.warmup_steps, c.num_train_steps = schedule, 1.0, 10, 110
  fn = optim.learning_rate_fn(c)
  assert fn(0) == pytest.approx(0.1) and fn(9) == pytest.approx(1.0)
  expected_end = {"rsqrt": (10 / 109) ** 0.5, "linear": 0.0, "cosine": 0.0, "constant": 1.0}
  assert fn(109) == pytest.approx(expected_end[schedule], abs=0.011)
  if schedule == "cosine":
    assert fn(60) == pytest.approx(0.5, abs=1e-6)     # halfway through the decay
  if schedule == "rsqrt":
    assert fn(40) == pytest.approx(0.5, rel=1e-6)     # sqrt(10 / 40)
