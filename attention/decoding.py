"""Greedy and beam search for any model that follows the seq2seq protocol.

Three layers, each usable on its own:

* :func:`greedy_search` and :func:`beam_search` know nothing about models.
  They drive a ``step_fn(tokens [N], state) -> (logits [N, V], state, aux)``
  inside one ``lax.while_loop`` (stopping early once every sentence is done),
  so they are jit-compilable and batched.
* :func:`make_decode_fns` turns a model of :mod:`attention.models.base`'s
  protocol plus its variables and a source batch into ``(init_state,
  step_fn)`` for them, hiding whether the model keeps explicit state (RNNs)
  or a Flax collection such as a Transformer's key/value cache.
* :func:`decode` is the convenience entry point: it pads the source length up
  to a bucket, jit-compiles per (model, bucket, options) and runs a search.

State layout: ``init_state`` has one row per sentence (leading axis ``B`` on
every non-scalar leaf). The searches repeat it to ``N = B * beam_size`` rows,
the beams of sentence ``b`` in rows ``b * beam_size + k``, and after each
beam step gather every non-scalar leaf along the beams' ancestry. Scalar
(ndim 0) leaves, e.g. a cache index, are shared and never gathered.

Outputs never contain ``BOS``; a finished sequence holds its ``EOS`` and then
``PAD``. The searches never pick ``BOS`` or ``PAD`` as a token (a model puts some
probability on them, trained or not); scores stay the model's own
log-probabilities, not renormalised over the other tokens. Alignments
``aux[name]`` are stacked per output step: ``[B, L, ..., S]``, zero after ``EOS``,
and for beam search follow each returned beam's own history.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from attention.models.base import BOS, EOS, PAD, decode_collections

Array = jax.Array
PyTree = Any
StepFn = Callable[[Array, PyTree], tuple[Array, PyTree, dict[str, Array]]]

DEFAULT_MAX_EXTRA = 50
DEFAULT_LENGTH_BUCKET = 16


class DecodeResult(NamedTuple):
  """What the searches return (a pytree, so it can leave a jitted function).

  Attributes:
    tokens: ``[B, L]`` int32, the best sequence per sentence.
    scores: ``[B]`` float32: its log-probability (greedy) or length-normalised
      score ``log p / lp(|Y|)`` (beam).
    alignments: dict of ``[B, L, ..., S]`` aux arrays for ``tokens``.
    beams: ``[B, K, L]`` all returned hypotheses, best first (beam only).
    beam_scores: ``[B, K]`` their scores (beam only); ``-inf`` marks an empty slot.
  """

  tokens: Array
  scores: Array
  alignments: dict[str, Array]
  beams: Array | None = None
  beam_scores: Array | None = None


def length_penalty(length: Array | int, alpha: float) -> Array:
  """GNMT length penalty ``lp(|Y|) = ((5 + |Y|) / 6) ** alpha`` (Wu et al. 2016)."""
  return ((5.0 + jnp.asarray(length, jnp.float32)) / 6.0) ** alpha


def _expand(state: PyTree, k: int) -> PyTree:
  return jax.tree.map(lambda x: x if jnp.ndim(x) == 0 else jnp.repeat(x, k, axis=0), state)


def _take_beams(x: Array, idx: Array) -> Array:
  """``x [B, K, ...]``, ``idx [B, K']`` -> ``[B, K', ...]`` with ``x[b, idx[b, k]]``."""
  return jax.vmap(lambda xb, ib: xb[ib])(x, idx)


def _gather_state(state: PyTree, idx: Array) -> PyTree:
  """Reorders flat ``[B*K, ...]`` leaves so row ``b*K + k`` comes from beam ``idx[b, k]``."""
  b, k = idx.shape

  def gather(x):
    if jnp.ndim(x) == 0:
      return x
    return _take_beams(x.reshape((b, x.shape[0] // b) + x.shape[1:]), idx).reshape(
        (b * k,) + x.shape[1:])

  return jax.tree.map(gather, state)


def _like(new: PyTree, old: PyTree) -> PyTree:
  # A step that returns e.g. bf16 for an f32 initial state would otherwise
  # break the while_loop's fixed carry types.
  return jax.tree.map(lambda n, o: n.astype(o.dtype), new, old)


def _aux_buffer(step_fn: StepFn, tokens: Array, state: PyTree, lead: tuple[int, ...],
                max_len: int) -> dict[str, Array]:
  """Zero buffers ``lead + [max_len] + aux.shape[1:]`` for the stacked alignments."""
  _, _, aux = jax.eval_shape(step_fn, tokens, state)
  return jax.tree.map(lambda s: jnp.zeros(lead + (max_len,) + s.shape[1:], s.dtype), aux)


def _put_axis(buf: Array, i: Array, value: Array, axis: int) -> Array:
  """Writes ``value`` (``buf``'s shape without ``axis``) at index ``i`` of ``axis``."""
  return jax.lax.dynamic_update_index_in_dim(buf, value.astype(buf.dtype), i, axis)


def _emittable_logp(logits: Array, bos_id: int, pad_id: int) -> Array:
  """float32 log-softmax of ``logits [..., V]`` with ``BOS`` and ``PAD`` at ``-inf``.

  Fed back, an emitted ``PAD`` is a skipped step for the recurrent models, so a
  hypothesis would end there without ``EOS``.
  """
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return logp.at[..., jnp.array([bos_id, pad_id])].set(-jnp.inf)


def greedy_search(step_fn: StepFn, init_state: PyTree, *, batch_size: int, max_len: int,
                  bos_id: int = BOS, eos_id: int = EOS, pad_id: int = PAD) -> DecodeResult:
  """Picks the most likely token at every step.

  Args:
    step_fn: ``(tokens [B], state) -> (logits [B, V], state, aux)``.
    init_state: state before the first step (non-scalar leaves ``[B, ...]``).
    batch_size: ``B``.
    max_len: number of steps ``L`` (output length, ``EOS`` included).
    bos_id, eos_id, pad_id: special tokens.

  Returns:
    :class:`DecodeResult` with ``tokens [B, L]``, ``scores [B]`` (summed
    log-probabilities) and ``alignments`` ``[B, L, ..., S]``.
  """
  b = batch_size
  first = jnp.full((b,), bos_id, jnp.int32)
  aux0 = _aux_buffer(step_fn, first, init_state, (b,), max_len)
  init = (jnp.zeros((), jnp.int32), first, jnp.full((b, max_len), pad_id, jnp.int32),
          jnp.zeros((b,), jnp.bool_), jnp.zeros((b,), jnp.float32), init_state, aux0)

  def cond(carry):
    i, _, _, finished, *_ = carry
    return (i < max_len) & ~jnp.all(finished)

  def body(carry):
    i, last, out, finished, score, old_state, aux_buf = carry
    logits, state, aux = step_fn(last, old_state)
    state = _like(state, old_state)
    logp = _emittable_logp(logits, bos_id, pad_id)
    tok = jnp.argmax(logp, axis=-1).astype(jnp.int32)
    alive = ~finished
    score = score + jnp.where(alive, jnp.take_along_axis(logp, tok[:, None], -1)[:, 0], 0.0)
    tok = jnp.where(alive, tok, pad_id)
    out = _put_axis(out, i, tok, 1)
    aux_buf = jax.tree.map(
        lambda buf, a: _put_axis(buf, i, jnp.where(
            alive.reshape((b,) + (1,) * (a.ndim - 1)), a, 0), 1), aux_buf, aux)
    return i + 1, tok, out, finished | (tok == eos_id), score, state, aux_buf

  _, _, out, _, score, _, aux = jax.lax.while_loop(cond, body, init)
  return DecodeResult(out, score, aux)


def beam_search(step_fn: StepFn, init_state: PyTree, *, batch_size: int, beam_size: int,
                max_len: int, alpha: float = 0.6, bos_id: int = BOS, eos_id: int = EOS,
                pad_id: int = PAD) -> DecodeResult:
  """Beam search with GNMT length normalisation, keeping alive and finished sets apart.

  As in tensor2tensor and flax's WMT example: each step expands the ``K``
  alive beams into their top ``2K`` continuations; those ending in ``EOS``
  compete (score ``log p / lp(|Y|)``, ``|Y|`` counting ``EOS``) with the
  ``K`` finished hypotheses so far, whose scores are frozen; the best ``K``
  others stay alive. A sentence is done when ``K`` hypotheses have finished
  and the worst of them beats the best score an alive beam could still
  reach; the loop ends when every sentence is done or after ``max_len``
  steps. Sentences with fewer than ``K`` finished hypotheses then fill the
  remaining slots with alive ones (normalised at their length ``L``), always
  ranked after finished ones.

  With ``beam_size=1`` the alive beam follows greedy search's path. With
  ``alpha=0`` the result is greedy's, except in two cases: when an earlier
  ``EOS`` that was the runner-up scored better (that shorter, higher-scoring
  hypothesis is returned), and when greedy reaches ``max_len`` without ``EOS``
  while some hypothesis finished (finished ones rank first, even at a lower
  score). (:func:`decode` runs :func:`greedy_search` for ``beam_size=1``.)

  Args:
    step_fn: ``(tokens [B*K], state) -> (logits [B*K, V], state, aux)``.
    init_state: state with one row per sentence; repeated to ``B*K`` here.
    batch_size: ``B``.
    beam_size: ``K``.
    max_len: number of steps ``L``.
    alpha: length penalty exponent (0 = plain log-probability).
    bos_id, eos_id, pad_id: special tokens.

  Returns:
    :class:`DecodeResult`: best ``tokens [B, L]`` and ``scores [B]``, its
    ``alignments`` ``[B, L, ..., S]``, and all ``beams [B, K, L]`` with
    ``beam_scores [B, K]``, best first.
  """
  b, k = batch_size, beam_size
  state0 = _expand(init_state, k)
  first = jnp.full((b, k), bos_id, jnp.int32)
  aux0 = _aux_buffer(step_fn, first.reshape(-1), state0, (b, k), max_len)
  seq0 = jnp.full((b, k, max_len), pad_id, jnp.int32)
  # Only beam 0 is live at the start, so the first step does not pick K copies.
  alive_lp0 = jnp.tile(jnp.array([0.0] + [-jnp.inf] * (k - 1), jnp.float32), (b, 1))
  fin_score0 = jnp.full((b, k), -jnp.inf, jnp.float32)
  best_lp = length_penalty(max_len, alpha)
  put = lambda buf, i, v: _put_axis(buf, i, v, 2)

  def done(i, alive_lp, fin_score):
    # Log-probs only fall, so an alive beam can at best keep its current
    # log-prob, divided by the largest penalty of a length still reachable.
    bound = alive_lp[:, 0] / jnp.maximum(best_lp, length_penalty(i + 1, alpha))
    full = jnp.all(jnp.isfinite(fin_score), axis=1)
    return (full & (jnp.min(fin_score, axis=1) >= bound)) | jnp.isneginf(alive_lp[:, 0])

  def cond(carry):
    i, _, _, alive_lp, _, _, _, fin_score, _ = carry
    return (i < max_len) & ~jnp.all(done(i, alive_lp, fin_score))

  def body(carry):
    i, last, alive_seq, alive_lp, alive_aux, old_state, fin_seq, fin_score, fin_aux = carry
    logits, state, aux = step_fn(last.reshape(-1), old_state)
    state = _like(state, old_state)
    vocab = logits.shape[-1]
    logp = _emittable_logp(logits, bos_id, pad_id).reshape(b, k, vocab)
    cand_lp, cand = jax.lax.top_k((alive_lp[:, :, None] + logp).reshape(b, k * vocab), 2 * k)
    cand_beam, cand_tok = cand // vocab, (cand % vocab).astype(jnp.int32)
    cand_eos = cand_tok == eos_id
    aux = jax.tree.map(lambda a: a.reshape((b, k) + a.shape[1:]), aux)

    # Alive: the best K continuations that did not end.
    new_alive_lp, pick = jax.lax.top_k(jnp.where(cand_eos, -jnp.inf, cand_lp), k)
    parent = jnp.take_along_axis(cand_beam, pick, 1)
    new_tok = jnp.take_along_axis(cand_tok, pick, 1)
    new_alive_seq = put(_take_beams(alive_seq, parent), i, new_tok)
    new_alive_aux = jax.tree.map(
        lambda buf, a: put(_take_beams(buf, parent), i, _take_beams(a, parent)), alive_aux, aux)
    state = _gather_state(state, parent)

    # Finished: old finished (frozen) vs candidates that just emitted EOS.
    eos_score = jnp.where(cand_eos, cand_lp / length_penalty(i + 1, alpha), -jnp.inf)
    new_fin_score, pick = jax.lax.top_k(jnp.concatenate([fin_score, eos_score], 1), k)
    from_old = pick < k
    old_pick = jnp.where(from_old, pick, 0)
    eos_parent = jnp.take_along_axis(cand_beam, jnp.where(from_old, 0, pick - k), 1)

    def merge(old_buf, alive_buf, step_value):
      fresh = put(_take_beams(alive_buf, eos_parent), i, step_value)
      keep = from_old.reshape(from_old.shape + (1,) * (old_buf.ndim - 2))
      return jnp.where(keep, _take_beams(old_buf, old_pick), fresh)

    new_fin_seq = merge(fin_seq, alive_seq, jnp.full((b, k), eos_id, jnp.int32))
    new_fin_aux = jax.tree.map(lambda f, al, a: merge(f, al, _take_beams(a, eos_parent)),
                               fin_aux, alive_aux, aux)
    return (i + 1, new_tok, new_alive_seq, new_alive_lp, new_alive_aux, state,
            new_fin_seq, new_fin_score, new_fin_aux)

  init = (jnp.zeros((), jnp.int32), first, seq0, alive_lp0, aux0, state0, seq0,
          fin_score0, aux0)
  (steps, _, alive_seq, alive_lp, alive_aux, _, fin_seq, fin_score,
   fin_aux) = jax.lax.while_loop(cond, body, init)

  # Rank finished before alive (truncated) hypotheses, then by score.
  scores = jnp.concatenate([fin_score, alive_lp / length_penalty(steps, alpha)], 1)
  tier = jnp.concatenate([jnp.where(jnp.isfinite(fin_score), 2, 0),
                          jnp.where(jnp.isfinite(alive_lp), 1, 0)], 1)
  order = jnp.lexsort((-scores, -tier), axis=-1)[:, :k]
  beams = _take_beams(jnp.concatenate([fin_seq, alive_seq], 1), order)
  beam_scores = jnp.take_along_axis(scores, order, 1)
  aux = jax.tree.map(lambda f, a: _take_beams(jnp.concatenate([f, a], 1), order)[:, 0],
                     fin_aux, alive_aux)
  return DecodeResult(beams[:, 0], beam_scores[:, 0], aux, beams, beam_scores)


def make_decode_fns(model: Any, variables: PyTree, src: Array, *, max_len: int,
                    beam_size: int = 1) -> tuple[PyTree, StepFn]:
  """Adapts a protocol model to the searches' ``(init_state, step_fn)``.

  Encodes ``src`` once. For a model with ``decode_collections`` (e.g. the
  Transformer's ``("cache",)``), ``init_decode_state`` runs with those
  collections mutable and the state is the dict of created collections;
  ``step_fn`` applies ``decode_step`` with them and returns the mutated
  ones. Otherwise the model's explicit state is used as is.

  Args:
    model: a Flax module following :mod:`attention.models.base`'s protocol.
    variables: its variables, e.g. ``{'params': ...}``.
    src: ``[B, S]`` int32 source tokens.
    max_len: decode steps the state must hold.
    beam_size: rows per sentence ``step_fn`` will be called with; the
      memory is repeated to ``B * beam_size`` rows once, here.

  Returns:
    ``init_state`` with one row per sentence and ``step_fn(tokens [B *
    beam_size], state) -> (logits, state, aux)``.

  Example::

    init_state, step_fn = make_decode_fns(model, variables, src, max_len=40, beam_size=4)
    result = beam_search(step_fn, init_state, batch_size=src.shape[0], beam_size=4,
                         max_len=40)
  """
  collections = decode_collections(model)
  memory = model.apply(variables, src, method="encode")
  if collections:
    _, state = model.apply(variables, memory, max_len, method="init_decode_state",
                           mutable=list(collections))
    state = dict(state)
  else:
    state = model.apply(variables, memory, max_len, method="init_decode_state")
  memory = _expand(memory, beam_size) if beam_size > 1 else memory

  def step_fn(tokens: Array, state: PyTree):
    if collections:
      (logits, _, aux), new_state = model.apply(
          {**variables, **state}, tokens, None, memory, method="decode_step",
          mutable=list(collections))
      return logits, dict(new_state), aux
    return model.apply(variables, tokens, state, memory, method="decode_step")

  return state, step_fn


def bucket_length(length: int, bucket: int = DEFAULT_LENGTH_BUCKET) -> int:
  """``length`` rounded up to a multiple of ``bucket`` (at least ``bucket``)."""
  return max(bucket, -(-int(length) // bucket) * bucket)


@functools.partial(jax.jit, static_argnames=(
    "model", "beam_size", "alpha", "max_len", "return_alignments"))
def _decode_jit(model, variables, src, *, beam_size, alpha, max_len, return_alignments):
  init_state, step_fn = make_decode_fns(model, variables, src, max_len=max_len,
                                        beam_size=beam_size)
  if not return_alignments:
    # Returning no aux lets XLA drop the alignment computation from the loop.
    inner = step_fn
    step_fn = lambda tokens, state: inner(tokens, state)[:2] + ({},)
  if beam_size == 1:
    return greedy_search(step_fn, init_state, batch_size=src.shape[0], max_len=max_len)
  return beam_search(step_fn, init_state, batch_size=src.shape[0], beam_size=beam_size,
                     max_len=max_len, alpha=alpha)


def decode(model: Any, variables: PyTree, src: Any, *, beam_size: int = 1,
           alpha: float = 0.6, max_extra: int = DEFAULT_MAX_EXTRA,
           return_alignments: bool = False,
           length_bucket: int = DEFAULT_LENGTH_BUCKET,
           max_len: int | None = None) -> DecodeResult:
  """Translates a batch: greedy (``beam_size=1``) or beam search, jit-compiled.

  The source is cut to its longest real sentence and padded with ``PAD`` up
  to the next multiple of ``length_bucket``: padding never changes a
  protocol model's output, and one compilation then serves every batch whose
  longest sentence falls in the same bucket (compilations are cached per
  model, bucket, batch size and options). The output has ``L = bucketed
  source length + max_extra`` steps, the budget of Vaswani et al. (input
  length + 50). The loop stops as soon as every sentence has finished, so a
  large budget adds no steps, only memory and per-step work that scales with
  ``L`` (cache size, beam gathers).

  Args:
    model: a Flax module following :mod:`attention.models.base`'s protocol.
    variables: its variables (``{'params': ...}``).
    src: ``[B, S]`` int source tokens on the host (numpy or a concrete array).
    beam_size: 1 for greedy search, ``K > 1`` for beam search.
    alpha: length penalty exponent (beam search only).
    max_extra: output steps beyond the bucketed source length.
    return_alignments: also collect the model's per-step alignments (costs
      memory ``[B, K, L, ..., S]``); otherwise ``alignments`` is ``{}``.
    length_bucket: source length granularity.
    max_len: optional cap on the output steps, e.g. the longest sequence the
      model supports (a Transformer's ``config.max_len``); bucketing can
      otherwise ask for up to ``length_bucket - 1`` more steps than
      ``longest source + max_extra``.

  Returns:
    :class:`DecodeResult` (``beams``/``beam_scores`` only for beam search).
  """
  src = np.asarray(src, dtype=np.int32)
  real = (src != PAD).any(axis=0)
  longest = int(np.nonzero(real)[0].max()) + 1 if real.any() else 1
  padded = bucket_length(longest, length_bucket)
  src = np.pad(src[:, :longest], ((0, 0), (0, padded - longest)), constant_values=PAD)
  steps = padded + max_extra if max_len is None else min(padded + max_extra, max_len)
  return _decode_jit(model, variables, jnp.asarray(src), beam_size=beam_size,
                     alpha=float(alpha), max_len=steps,
                     return_alignments=return_alignments)
