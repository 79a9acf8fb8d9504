"""attention.sampling: the drawn distribution, greedy decoding of every LM, EOS and seeds."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention.models import LSTMLanguageModel, LSTMNLanguageModel, TransformerLM
from attention.models.base import BOS, EOS, PAD
from attention.models.transformer import TransformerConfig
from attention.sampling import lm_step_fn, sample, sampling_logits

V = 7
LOGITS = np.array([3.0, 2.5, 0.1, 1.0, 0.5, -0.4, 1.2], np.float32)  # PAD, BOS heavy


def fixed_step(logits):
  """A stateless toy model: the same logits whatever the input."""
  def step_fn(tokens, state):
    return jnp.broadcast_to(jnp.asarray(logits), (tokens.shape[0], len(logits))), state + 1
  return step_fn


def reference_probs(temperature, top_k):
  z = LOGITS.astype(np.float64).copy()
  z[[PAD, BOS]] = -np.inf
  z = z / temperature
  if top_k:
    z[z < np.sort(z)[-top_k]] = -np.inf
  p = np.exp(z - z.max())
  return p / p.sum()


@pytest.mark.parametrize("temperature,top_k", [(1.0, 0), (0.5, 0), (2.0, 3)])
def test_draws_follow_the_tempered_top_k_softmax(temperature, top_k):
  n = 40000
  step = fixed_step(LOGITS)
  tokens = jax.jit(functools.partial(sample, step, num_tokens=1, temperature=temperature,
                                     top_k=top_k))(jnp.int32(0), jnp.full((n, 1), 3, jnp.int32),
                                                   jax.random.key(0))
  freq = np.bincount(np.asarray(tokens[:, 0]), minlength=V) / n
  want = reference_probs(temperature, top_k)
  assert freq[PAD] == freq[BOS] == 0
  assert np.all(freq[want == 0] == 0)
  # 40000 draws: one standard deviation is at most 0.0025.
  np.testing.assert_allclose(freq, want, atol=0.01)
  np.testing.assert_allclose(
      np.asarray(jax.nn.softmax(sampling_logits(jnp.asarray(LOGITS), temperature=temperature,
                                                top_k=top_k))), want, atol=1e-6)


def test_eos_finishes_a_row_and_seed_fixes_the_text():
  logits = np.full(V, -5.0, np.float32)
  logits[EOS] = 5.0
  tokens = sample(fixed_step(logits), jnp.int32(0), jnp.array([[3], [4]], jnp.int32),
                  jax.random.key(1), num_tokens=4, temperature=1.0)
  np.testing.assert_array_equal(tokens, [[EOS, PAD, PAD, PAD]] * 2)
  step = fixed_step(LOGITS)
  run = lambda n, key: sample(step, jnp.int32(0), jnp.full((3, 2), 4, jnp.int32), key,
                              num_tokens=n)
  long, short = run(12, jax.random.key(5)), run(7, jax.random.key(5))
  np.testing.assert_array_equal(long[:, :7], short)   # step i draws with fold_in(key, i)
  assert not np.array_equal(run(12, jax.random.key(6)), long)
  # Greedy skips excluded ids: LOGITS' best allowed token is 6, then 3.
  greedy = lambda exclude: sample(step, jnp.int32(0), jnp.full((1, 1), 4, jnp.int32),
                                  jax.random.key(0), num_tokens=2, temperature=0.0,
                                  exclude=exclude)
  np.testing.assert_array_equal(greedy((PAD, BOS)), [[6, 6]])
  np.testing.assert_array_equal(greedy((PAD, BOS, 6)), [[3, 3]])
  with pytest.raises(ValueError, match="prompt"):
    sample(step, jnp.int32(0), jnp.zeros((3, 0), jnp.int32), jax.random.key(0), num_tokens=2)
  with pytest.raises(ValueError, match="temperature"):
    sampling_logits(jnp.asarray(LOGITS), temperature=-1.0)


MODELS = {
    "transformer_lm": lambda: TransformerLM(TransformerConfig(
        vocab_size=V, emb_dim=16, num_heads=2, num_layers=2, qkv_dim=16, mlp_dim=32,
        max_len=32, dropout_rate=0.0, attention_dropout_rate=0.0)),
    "lstmn_lm": lambda: LSTMNLanguageModel(V, emb_dim=8, hidden_dim=16, num_layers=2),
    "lstm_lm": lambda: LSTMLanguageModel(V, emb_dim=8, hidden_dim=16, num_layers=2),
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_greedy_continuation_is_the_argmax_of_teacher_forced_logits(name):
  model = MODELS[name]()
  prompt = jnp.array([[3, 4, 5], [6, 3, 3]], jnp.int32)
  params = model.init(jax.random.key(0), prompt)["params"]
  # Larger weights than the init, so the argmax is not nearly tied anywhere,
  # and EOS unlikely (output bias), so that rows run long before ending.
  params = jax.tree.map(lambda p: p * 3.0, params)
  params = jax.tree.map(lambda p: p.at[EOS].add(-20.0) if p.shape == (V,) else p, params)
  state, step_fn = lm_step_fn(model, {"params": params}, batch_size=2, max_len=12)
  cont = jax.jit(functools.partial(sample, step_fn, num_tokens=9, temperature=0.0))(
      state, prompt, jax.random.key(0))
  seq = jnp.concatenate([prompt, cont], axis=1)
  logits = np.asarray(model.apply({"params": params}, seq[:, :-1]), np.float64)
  logits[..., [PAD, BOS]] = -np.inf
  want = logits.argmax(-1)[:, prompt.shape[1] - 1:]
  got = np.asarray(cont)
  # Up to and including a row's EOS the tokens are the argmax; PAD after it.
  for row in range(2):
    end = list(got[row]).index(EOS) + 1 if EOS in got[row] else got.shape[1]
    np.testing.assert_array_equal(got[row, :end], want[row, :end])
    assert np.all(got[row, end:] == PAD)
