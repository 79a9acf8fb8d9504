"""Sampling from the language models: temperature, top-k, or greedy.

The language models (:class:`~attention.models.TransformerLM`,
:class:`~attention.models.LSTMNLanguageModel`,
:class:`~attention.models.LSTMLanguageModel`) share
``init_decode_state(batch_size, max_len)`` and ``decode_step(tokens, state)``;
:func:`lm_step_fn` adapts any of them, with its state explicit (the LSTMs) or
in a Flax collection (the Transformer's key/value cache), and :func:`sample`
feeds a prompt and draws a continuation in one ``lax.scan``, so the whole
thing is one jit-compiled program::

  state, step_fn = lm_step_fn(model, variables, batch_size=4, max_len=264)
  tokens = jax.jit(functools.partial(sample, step_fn, num_tokens=256,
                                     temperature=0.8, top_k=40))(state, prompt, key)

As in :mod:`attention.decoding`, ``PAD`` and ``BOS`` are never drawn (an
emitted ``PAD`` is a skipped step for the recurrent models; ``exclude`` can
ban more, e.g. the unknown-token id), and a row that draws ``EOS`` is
finished: ``PAD`` follows.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from attention.models.base import BOS, EOS, PAD, decode_collections

Array = jax.Array
PyTree = Any
LMStepFn = Callable[[Array, PyTree], tuple[Array, PyTree]]


def lm_step_fn(model: Any, variables: PyTree, *, batch_size: int,
               max_len: int) -> tuple[PyTree, LMStepFn]:
  """``(state, step_fn)`` for a language model, ``step_fn(tokens [N], state) -> (logits [N, V], state)``.

  Args:
    model: a language model of :mod:`attention.models`.
    variables: its variables, e.g. ``{'params': ...}``.
    batch_size: rows ``N``.
    max_len: steps the state must hold (prompt plus continuation).
  """
  collections = list(decode_collections(model))
  if collections:
    _, state = model.apply(variables, batch_size, max_len, method="init_decode_state",
                           mutable=collections)
    state = dict(state)
  else:
    state = model.apply(variables, batch_size, max_len, method="init_decode_state")

  def step_fn(tokens: Array, state: PyTree) -> tuple[Array, PyTree]:
    if collections:
      (logits, _, _), new_state = model.apply({**variables, **state}, tokens,
                                              method="decode_step", mutable=collections)
      return logits, dict(new_state)
    logits, new_state, _ = model.apply(variables, tokens, state, method="decode_step")
    return logits, new_state

  return state, step_fn


def sampling_logits(logits: Array, *, temperature: float = 1.0, top_k: int = 0,
                    exclude: tuple[int, ...] = (PAD, BOS)) -> Array:
  """float32 ``logits [..., V]`` of the distribution :func:`sample` draws from.

  The ``exclude`` ids get ``-inf``; then the logits are divided by
  ``temperature`` and, with ``top_k > 0``, all but the ``top_k`` largest set
  to ``-inf`` (ties at the threshold are kept).
  """
  if temperature <= 0:
    raise ValueError(f"temperature must be > 0 here (0 means greedy in sample), got {temperature}")
  z = _excluded(logits, exclude) / temperature
  if top_k > 0:
    threshold = jax.lax.top_k(z, min(top_k, z.shape[-1]))[0][..., -1:]
    z = jnp.where(z >= threshold, z, -jnp.inf)
  return z


def _excluded(logits: Array, exclude: tuple[int, ...]) -> Array:
  return logits.astype(jnp.float32).at[..., jnp.array(exclude, jnp.int32)].set(-jnp.inf)


def sample(step_fn: LMStepFn, state: PyTree, prompt: Array, rng: Array, *, num_tokens: int,
           temperature: float = 1.0, top_k: int = 0,
           exclude: tuple[int, ...] = (PAD, BOS)) -> Array:
  """Feeds ``prompt`` and draws ``num_tokens`` more tokens.

  Args:
    step_fn: from :func:`lm_step_fn`.
    state: its initial state, for ``N`` rows.
    prompt: ``[N, P]`` int32, ``P >= 1``, without ``PAD``: the text so far
      (for the character models, e.g. a newline or a speaker's name).
    rng: a PRNG key; step ``i`` draws with ``fold_in(rng, i)``, so a seed
      gives the same text whatever ``num_tokens`` is.
    num_tokens: continuation length (static).
    temperature: divides the logits (static); ``0`` picks the most likely
      token at every step (greedy).
    top_k: draw from the ``top_k`` most likely tokens only (static); ``0``:
      all of them.
    exclude: ids never drawn (static; greedy too). Keep ``PAD`` in it.

  Returns:
    ``[N, num_tokens]`` int32: the continuation, without the prompt; ``PAD``
    after a row's ``EOS``.
  """
  if prompt.ndim != 2 or prompt.shape[1] < 1:
    raise ValueError(f"prompt must be [batch, length >= 1] token ids, got shape {prompt.shape}")

  def feed(state, tokens):
    return step_fn(tokens, state)[1], None

  state, _ = jax.lax.scan(feed, state, prompt[:, :-1].T)

  def draw(carry, i):
    last, state, finished = carry
    logits, state = step_fn(last, state)
    if temperature == 0:
      token = jnp.argmax(_excluded(logits, exclude), axis=-1)
    else:
      z = sampling_logits(logits, temperature=temperature, top_k=top_k, exclude=exclude)
      token = jax.random.categorical(jax.random.fold_in(rng, i), z, axis=-1)
    token = jnp.where(finished, PAD, token.astype(jnp.int32))
    return (token, state, finished | (token == EOS)), token

  init = (prompt[:, -1].astype(jnp.int32), state, jnp.zeros(prompt.shape[:1], bool))
  _, tokens = jax.lax.scan(draw, init, jnp.arange(num_tokens))
  return tokens.T
