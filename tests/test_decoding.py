"""Greedy/beam search against brute-force enumeration on hand-built toy models."""

from __future__ import annotations

import functools
import itertools
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention import decoding
from attention.models.base import BOS, EOS, PAD

V = 5                 # PAD, BOS, EOS and two word tokens
WORDS = (3, 4)


# --------------------------------------------------------------------------
# Toy step function: a second-order Markov chain, one table per sentence.
# The state carries the token before the previous one and the sentence index,
# so a wrong beam gather shows up as wrong scores.
# --------------------------------------------------------------------------
def random_tables(seed: int, batch: int, sharp: float = 2.0) -> np.ndarray:
  """``[B, prev2, prev, next]`` log-probs; only EOS and WORDS can follow."""
  rng = np.random.default_rng(seed)
  logits = np.full((batch, V, V, V), -np.inf)
  logits[..., [EOS, *WORDS]] = rng.normal(size=(batch, V, V, 3)) * sharp
  return logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)


def toy(tables: np.ndarray):
  table = jnp.asarray(tables, jnp.float32)
  batch = tables.shape[0]
  init_state = {"prev2": jnp.full((batch,), BOS, jnp.int32),
                "row": jnp.arange(batch, dtype=jnp.int32),
                "step": jnp.zeros((), jnp.int32)}   # scalar: must never be gathered

  def step_fn(tokens, state):
    logits = table[state["row"], state["prev2"], tokens]
    aux = {"align": jax.nn.one_hot(tokens, V)[:, None, :]}   # [N, 1, S]
    new = {"prev2": tokens, "row": state["row"], "step": state["step"] + 1}
    return logits, new, aux

  return init_state, step_fn


def sequence_logprob(table: np.ndarray, seq) -> float:
  prev2, prev, total = BOS, BOS, 0.0
  for tok in seq:
    total += table[prev2, prev, tok]
    prev2, prev = prev, tok
  return total


def lp(length: int, alpha: float) -> float:
  return ((5.0 + length) / 6.0) ** alpha


def brute_force(table: np.ndarray, max_len: int, alpha: float):
  """All finished sequences (words then EOS, at most ``max_len`` tokens), best first."""
  out = []
  for n in range(max_len):
    for words in itertools.product(WORDS, repeat=n):
      seq = (*words, EOS)
      out.append((sequence_logprob(table, seq) / lp(len(seq), alpha), seq))
  return sorted(out, key=lambda t: -t[0])


def strip(row) -> tuple[int, ...]:
  row = [int(t) for t in row]
  return tuple(row[: row.index(EOS) + 1]) if EOS in row else tuple(row)


@functools.partial(jax.jit, static_argnames=("beam_size", "max_len"))
def _beam(tables, alpha, *, beam_size, max_len):
  state, step_fn = toy(tables)
  return decoding.beam_search(step_fn, state, batch_size=tables.shape[0],
                              beam_size=beam_size, max_len=max_len, alpha=alpha)


@functools.partial(jax.jit, static_argnames=("max_len",))
def _greedy(tables, *, max_len):
  state, step_fn = toy(tables)
  return decoding.greedy_search(step_fn, state, batch_size=tables.shape[0], max_len=max_len)


def run_beam(tables, beam_size, max_len, alpha):
  # alpha is traced, so one compilation serves every alpha.
  out = _beam(jnp.asarray(tables, jnp.float32), jnp.float32(alpha), beam_size=beam_size,
              max_len=max_len)
  return jax.tree.map(np.asarray, out)


def run_greedy(tables, max_len):
  return jax.tree.map(np.asarray, _greedy(jnp.asarray(tables, jnp.float32), max_len=max_len))


# --------------------------------------------------------------------------
def test_length_penalty_formula():
  np.testing.assert_allclose(decoding.length_penalty(7, 0.6), (12 / 6) ** 0.6, rtol=1e-6)
  np.testing.assert_allclose(decoding.length_penalty(1, 0.6), 1.0, rtol=1e-6)
  np.testing.assert_allclose(decoding.length_penalty(30, 0.0), 1.0)


def numpy_greedy(table: np.ndarray, max_len: int) -> tuple[list[int], float]:
  """Greedy decoding of one sentence's table, never picking PAD or BOS: (tokens, log p)."""
  prev2, prev, want, score = BOS, BOS, [], 0.0
  for _ in range(max_len):
    row = table[prev2, prev].copy()
    row[[PAD, BOS]] = -np.inf
    tok = int(np.argmax(row))
    want.append(tok)
    score += table[prev2, prev, tok]
    prev2, prev = prev, tok
    if tok == EOS:
      break
  return want, score


def test_greedy_matches_numpy_argmax():
  tables = random_tables(0, 6)
  res = run_greedy(tables, max_len=7)
  assert res.tokens.shape == (6, 7) and res.alignments["align"].shape == (6, 7, 1, V)
  for b in range(6):
    want, score = numpy_greedy(tables[b], 7)
    assert strip(res.tokens[b]) == tuple(want)
    assert np.all(res.tokens[b, len(want):] == PAD)
    np.testing.assert_allclose(res.scores[b], score, rtol=1e-5)


def test_beam_size_one_is_greedy():
  # With one beam the alive hypothesis follows greedy's path, and, without a
  # length penalty, the search stops as soon as greedy would. They can only
  # differ through the finished set: an EOS that was the runner-up at some
  # earlier step. Make EOS always the best or the worst token: then equal.
  tables = random_tables(1, 6)
  words = tables[..., list(WORDS)]
  coin = np.random.default_rng(5).random(words.shape[:-1]) < 0.3
  tables[..., EOS] = np.where(coin, words.max(-1) + 1.0, words.min(-1) - 1.0)
  tables = tables - np.logaddexp.reduce(tables, axis=-1, keepdims=True)
  greedy = run_greedy(tables, max_len=7)
  beam = run_beam(tables, beam_size=1, max_len=7, alpha=0.0)
  np.testing.assert_array_equal(beam.tokens, greedy.tokens)
  np.testing.assert_allclose(beam.scores, greedy.scores, rtol=1e-5)
  np.testing.assert_allclose(beam.alignments["align"], greedy.alignments["align"])


def test_beam_size_one_never_worse_than_greedy():
  # In general one beam returns greedy's path cut by the best EOS it saw.
  tables = random_tables(1, 6)
  greedy = run_greedy(tables, max_len=7)
  beam = run_beam(tables, beam_size=1, max_len=7, alpha=0.0)
  for b in range(6):
    g, got = strip(greedy.tokens[b]), strip(beam.tokens[b])
    assert got[:-1] == g[:len(got) - 1] and got[-1] == EOS
    if g[-1] == EOS:
      assert beam.scores[b] >= greedy.scores[b] - 1e-6


def test_beam_beats_greedy_on_handmade_case():
  # From BOS, word 3 is likelier (0.6) but leads to a flat distribution;
  # word 4 (0.4) is almost surely followed by EOS.
  p = np.full((V, V, V), 1e-9)
  p[:, :, [EOS, *WORDS]] = 1 / 3
  p[BOS, BOS] = 1e-9
  p[BOS, BOS, [3, 4]] = [0.6, 0.4]
  p[BOS, 4] = 1e-9
  p[BOS, 4, EOS] = 0.99
  tables = np.repeat(np.log(p / p.sum(-1, keepdims=True))[None], 6, axis=0)
  alpha, max_len = 0.6, 4
  best_score, best_seq = brute_force(tables[0], max_len, alpha)[0]
  assert best_seq == (4, EOS)
  greedy = run_greedy(tables, max_len=7)
  assert strip(greedy.tokens[0])[0] == 3
  beam = run_beam(tables, beam_size=2, max_len=max_len, alpha=alpha)
  assert strip(beam.tokens[0]) == best_seq
  np.testing.assert_allclose(beam.scores[0], best_score, rtol=1e-5)


@pytest.mark.parametrize("alpha", [0.0, 0.6, 1.0])
def test_exhaustive_beam_equals_brute_force(alpha):
  # With K >= 2**L beams nothing is ever pruned, so the K returned hypotheses
  # must be exactly the best finished sequences found by enumeration.
  max_len, k, batch = 3, 8, 6
  tables = random_tables(6, batch)
  beam = run_beam(tables, beam_size=k, max_len=max_len, alpha=alpha)
  greedy = run_greedy(tables, max_len=7)
  greedy_worse = 0
  for b in range(batch):
    ranked = brute_force(tables[b], max_len, alpha)     # 1 + 2 + 4 = 7 sequences
    want_scores = [s for s, _ in ranked]
    np.testing.assert_allclose(beam.beam_scores[b, :len(ranked)], want_scores, rtol=1e-5)
    assert strip(beam.tokens[b]) == ranked[0][1]
    got = {strip(row) for row in beam.beams[b, :len(ranked)]}
    assert got == {seq for _, seq in ranked}
    g = strip(greedy.tokens[b])
    if g[-1] == EOS and len(g) <= max_len:
      g_score = sequence_logprob(tables[b], g) / lp(len(g), alpha)
      assert g_score <= ranked[0][0] + 1e-6
      greedy_worse += g_score < ranked[0][0] - 1e-6
  assert greedy_worse > 0, "pick a seed where greedy is not optimal"


def test_finished_beams_frozen_and_padded():
  tables = random_tables(3, 6, sharp=1.5)
  alpha, max_len, k = 0.6, 6, 3
  res = run_beam(tables, beam_size=k, max_len=max_len, alpha=alpha)
  assert res.beams.shape == (6, k, max_len) and res.beam_scores.shape == (6, k)
  assert np.all(np.diff(res.beam_scores, axis=1) <= 1e-6)   # best first
  align = res.alignments["align"][:, :, 0]                     # [B, L, S]
  for b in range(6):
    for j in range(k):
      row = res.beams[b, j]
      seq = strip(row)
      assert seq[-1] == EOS and EOS not in seq[:-1]
      assert np.all(row[len(seq):] == PAD)
      # A finished score is the one it got when it emitted EOS: recomputing
      # from the table catches both later updates and wrong state gathers.
      np.testing.assert_allclose(
          res.beam_scores[b, j], sequence_logprob(tables[b], seq) / lp(len(seq), alpha),
          rtol=1e-5)
    # Alignments of the best beam follow its own history: at step i the toy
    # "attends" to the token fed in, i.e. the previous output (BOS first).
    best = strip(res.tokens[b])
    fed = (BOS, *best[:-1])
    np.testing.assert_array_equal(align[b, :len(best)], np.eye(V)[list(fed)])
    assert np.all(align[b, len(best):] == 0)


def test_no_finished_hypothesis_falls_back_to_alive():
  # EOS impossible: nothing finishes, the alive beams come back instead.
  tables = random_tables(4, 6)
  tables[..., EOS] = -np.inf
  tables -= np.logaddexp.reduce(tables, axis=-1, keepdims=True)
  res = run_beam(tables, beam_size=3, max_len=6, alpha=0.6)
  assert np.all(np.isin(res.beams, WORDS)) and np.all(np.isfinite(res.beam_scores))
  for b in range(6):
    np.testing.assert_allclose(
        res.scores[b], sequence_logprob(tables[b], res.tokens[b]) / lp(6, 0.6), rtol=1e-5)


# --------------------------------------------------------------------------
# A protocol model with explicit state, for make_decode_fns and decode().
# --------------------------------------------------------------------------
ENCODE_TRACES: list[tuple[int, ...]] = []


class CountingModel(nn.Module):
  """Next token = a fixed function of the previous one; attends uniformly to the source."""

  vocab: int = 8
  decode_collections: ClassVar[tuple[str, ...]] = ()

  def setup(self):
    # prev -> prev + 1, and the last word -> EOS.
    nxt = np.r_[[3, 3, 3], np.arange(4, self.vocab), [EOS]]
    self.table = self.param("table", lambda *_: jnp.asarray(
        np.eye(self.vocab)[nxt] * 5.0, jnp.float32))

  def encode(self, src, *, train=False):
    ENCODE_TRACES.append(tuple(src.shape))   # runs once per trace
    return {"mask": src != PAD}

  def init_decode_state(self, memory, max_len):
    return {"steps": jnp.zeros(memory["mask"].shape[:1], jnp.int32)}

  def decode_step(self, tokens, state, memory):
    mask = memory["mask"].astype(jnp.float32)
    aux = {"attention": mask / mask.sum(-1, keepdims=True)}
    return self.table[tokens], {"steps": state["steps"] + 1}, aux

  def __call__(self, src, tgt_in, *, train=False, return_alignments=False):
    logits = self.table[tgt_in]
    if return_alignments:
      mask = (src != PAD).astype(jnp.float32)
      att = jnp.broadcast_to((mask / mask.sum(-1, keepdims=True))[:, None],
                             tgt_in.shape + src.shape[-1:])
      return logits, {"attention": att}
    return logits


def test_decode_buckets_source_lengths_without_recompiling():
  model = CountingModel(vocab=9)    # a config no other test uses: fresh jit cache
  variables = model.init(jax.random.key(0), jnp.ones((1, 4), jnp.int32),
                         jnp.ones((1, 3), jnp.int32))
  ENCODE_TRACES.clear()
  rng = np.random.default_rng(0)
  for length in (3, 7, 12, 16):
    src = rng.integers(3, 9, size=(2, length)).astype(np.int32)
    src[1, length // 2:] = PAD
    res = decoding.decode(model, variables, src, return_alignments=True, max_extra=10)
    assert res.tokens.shape == (2, 16 + 10)
    att = np.asarray(res.alignments["attention"])         # [B, L, S]
    assert att.shape == (2, 26, 16)
    assert np.all(att[:, :, length:] == 0) and np.all(att[1, :, length // 2:] == 0)
    np.testing.assert_array_equal(strip(res.tokens[0]), (3, 4, 5, 6, 7, 8, EOS))
  assert ENCODE_TRACES == [(2, 16)]
  decode = functools.partial(decoding.decode, model, variables, max_extra=10,
                             return_alignments=True)
  src = np.full((2, 17), 5, np.int32)                        # next bucket
  assert decode(src).tokens.shape == (2, 42)
  assert ENCODE_TRACES == [(2, 16), (2, 32)]
  # Trailing all-PAD columns are cut first, so they do not change the bucket.
  decode(np.pad(src[:, :5], ((0, 0), (0, 30))))
  assert ENCODE_TRACES == [(2, 16), (2, 32)]
  # Other static options are another compilation; max_len caps the steps.
  res = decoding.decode(model, variables, src[:, :5], max_extra=10, max_len=20)
  assert res.tokens.shape == (2, 20) and res.alignments == {}
  assert ENCODE_TRACES == [(2, 16), (2, 32), (2, 16)]


def test_decode_beam_with_explicit_state_model():
  model = CountingModel()
  variables = model.init(jax.random.key(0), jnp.ones((1, 4), jnp.int32),
                         jnp.ones((1, 3), jnp.int32))
  src = np.array([[5, 6, 2, 0], [3, 2, 0, 0], [4, 4, 4, 2]], np.int32)
  greedy = decoding.decode(model, variables, src, max_extra=8)
  beam = decoding.decode(model, variables, src, beam_size=3, max_extra=8,
                         return_alignments=True)
  np.testing.assert_array_equal(beam.tokens, greedy.tokens)
  assert beam.beams.shape == (3, 3, 24)
  np.testing.assert_allclose(np.asarray(beam.alignments["attention"])[1, 0, :2], [0.5, 0.5])


def special_heavy_tables(seed: int, batch: int) -> np.ndarray:
  """Like :func:`random_tables`, but PAD and BOS take most of the probability."""
  rng = np.random.default_rng(seed)
  logits = rng.normal(size=(batch, V, V, V))
  logits[..., [PAD, BOS]] += 4.0
  return logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)


@pytest.mark.parametrize("alpha", [0.0, 0.6])
def test_searches_never_emit_pad_or_bos_and_keep_true_scores(alpha):
  # An untrained model puts mass on PAD and BOS; fed back, an emitted PAD is a
  # skipped step for the recurrent models. Scores stay the model's own
  # log-probabilities (not renormalised), so they equal brute force's.
  tables = special_heavy_tables(1, 3)
  greedy = run_greedy(tables, max_len=5)
  beam = run_beam(tables, beam_size=64, max_len=4, alpha=alpha)
  for b in range(3):
    want, score = numpy_greedy(tables[b], 5)
    assert strip(greedy.tokens[b]) == tuple(want)
    np.testing.assert_allclose(greedy.scores[b], score, rtol=1e-5)
    # Exhaustive beam: the finished hypotheses are exactly the word sequences
    # ending in EOS, with their true scores.
    finished = np.isfinite(beam.beam_scores[b])
    seqs = [strip(s) for s in beam.beams[b][finished]]
    assert all(PAD not in s[:-1] and BOS not in s for s in seqs)
    reference = sorted(
        ((sequence_logprob(tables[b], (*w, EOS)) / lp(len(w) + 1, alpha), (*w, EOS))
         for n in range(4) for w in itertools.product(WORDS, repeat=n)),
        key=lambda t: -t[0])
    np.testing.assert_allclose(beam.beam_scores[b][finished][:10],
                               [s for s, _ in reference[:10]], rtol=1e-5)
    assert seqs[:10] == [s for _, s in reference[:10]]
