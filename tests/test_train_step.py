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


_ACCUM_SCRIPT = r"""
import json
import jax, jax.numpy as jnp, numpy as np, optax
from jax.sharding import NamedSharding, PartitionSpec as P
from tests.test_train_step import _setup
from experiments import train
c, model, _, state, batch = _setup()
tx = optax.inject_hyperparams(optax.sgd)(learning_rate=1.0)
state = state.replace(opt_state=tx.init(state.params))
mesh = train.make_mesh()
rep, data = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
state, batch = jax.device_put(state, rep), jax.device_put(batch, data)
out = {}
for k in (1, 2):
  c.grad_accum_steps = k
  step = jax.jit(train.make_train_step(model, tx, "seq2seq", c, mesh),
                 in_shardings=(rep, data, rep), out_shardings=(rep, rep))
  hlo = step.lower(state, batch, np.float32(1e-3)).compile().as_text()
  new, m = step(state, batch, np.float32(1e-3))
  out[k] = {"all_gather": hlo.count("all-gather("), "all_reduce": hlo.count("all-reduce("),
            "loss": float(m["loss"]), "params": [np.asarray(p).tolist() for p in
                                                 jax.tree.leaves(new.params)[:3]]}
print("RESULT" + json.dumps(out))
"""


def test_gradient_accumulation_keeps_data_parallelism_on_four_devices():
  # Every device must compute only its own rows of each micro-batch: the
  # compiled step all-reduces gradients and gathers no batch.
  import json
  import os
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=4")
  res = subprocess.run([sys.executable, "-c", _ACCUM_SCRIPT], cwd=root, env=env,
                       capture_output=True, text=True, timeout=600)
  assert res.returncode == 0, res.stderr[-3000:]
  out = json.loads([l for l in res.stdout.splitlines() if l.startswith("RESULT")][0][6:])
  one, four = out["1"], out["2"]
  assert four["all_gather"] == 0 and four["all_reduce"] > 0
  assert four["loss"] == pytest.approx(one["loss"], rel=1e-5)
  for a, b in zip(one["params"], four["params"]):
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-4)
