"""Tests for experiments.evaluate: losses, metric sums, BLEU, length buckets, alignments.

Models get random parameters drawn in numpy from ``jax.eval_shape`` of their
``init``: on a small shared CPU, compiling ``init`` would cost more than all
the checks here.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import sacrebleu

from attention import decoding
from attention.models import Transformer, TransformerConfig, TransformerLM
from attention.models.base import PAD
from attention.models.rnnsearch import RNNSearch
from experiments import evaluate
from experiments.data.iterators import eval_lm_batches, eval_seq2seq_batches
from experiments.data.synthetic import make_vocab

VOCAB = make_vocab("copy", 8)          # ids 4..11 are the words "a".."h"
V = VOCAB.size
LENGTHS = (3, 7, 12, 1, 5, 9)


def random_variables(model: nn.Module, *args: Any, seed: int = 0, scale: float = 0.5,
                     **kwargs: Any) -> Any:
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *args, **kwargs))
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: jnp.asarray(rng.normal(0, scale, s.shape), s.dtype), shapes)


def copy_batches(batch_size: int = 4):
  rng = np.random.default_rng(0)
  src = [rng.integers(4, V, size=n) for n in LENGTHS]
  return src, list(eval_seq2seq_batches(src, src, batch_size=batch_size, bucket_step=8))


# --------------------------------------------------------------------------
# Cross-entropy and metric sums.
# --------------------------------------------------------------------------
def reference_loss(logits, targets, weights, eps):
  logits = np.asarray(logits, np.float64)
  logp = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
  v = logits.shape[-1]
  soft = np.full(logits.shape, eps / (v - 1))
  np.put_along_axis(soft, targets[..., None], 1.0 - eps, axis=-1)
  entropy = -np.sum(np.where(soft > 0, soft * np.log(np.where(soft > 0, soft, 1)), 0), -1)
  loss = -np.sum(soft * logp, -1) - entropy
  return np.sum(loss * weights), np.sum(weights)


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_cross_entropy_matches_float64_reference(eps):
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(3, 5, 7)) * 3
  targets = rng.integers(0, 7, size=(3, 5))
  weights = (rng.random((3, 5)) > 0.3).astype(np.float32)
  loss, total = evaluate.cross_entropy_loss(jnp.asarray(logits, jnp.float32),
                                            jnp.asarray(targets), jnp.asarray(weights), eps)
  ref_loss, ref_total = reference_loss(logits, targets, weights, eps)
  np.testing.assert_allclose(float(loss), ref_loss, rtol=1e-5)
  assert float(total) == ref_total


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_cross_entropy_gradient_matches_float64_closed_form(eps):
  # d loss / d logits = w * (softmax(z) - q), q the smoothed target distribution.
  rng = np.random.default_rng(2)
  v = 9
  logits = rng.normal(size=(2, 4, v)) * 3
  targets = rng.integers(0, v, size=(2, 4))
  weights = (rng.random((2, 4)) > 0.3).astype(np.float32)
  grad = jax.jit(jax.grad(lambda z: evaluate.cross_entropy_loss(
      z, jnp.asarray(targets), jnp.asarray(weights), eps)[0]))(jnp.asarray(logits, jnp.float32))
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  q = np.full(logits.shape, eps / (v - 1))
  np.put_along_axis(q, targets[..., None], 1.0 - eps, axis=-1)
  np.testing.assert_allclose(grad, weights[..., None] * (p - q), atol=2e-6)
  # The same as autodiff through the textbook formula.
  def textbook(z):
    logp = jax.nn.log_softmax(z)
    soft = jnp.asarray(q, jnp.float32)
    return jnp.sum(-jnp.sum(soft * logp, -1) * weights)
  np.testing.assert_allclose(grad, jax.grad(textbook)(jnp.asarray(logits, jnp.float32)),
                             atol=2e-6)


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_perfect_prediction_has_zero_loss(eps):
  v, targets = 6, np.array([[2, 4, 5, 0]])
  soft = np.full((1, 4, v), eps / (v - 1) if eps else 1e-12)
  np.put_along_axis(soft, targets[..., None], 1.0 - eps, axis=-1)
  logits = jnp.asarray(np.log(soft), jnp.float32)   # predicts the smoothed target exactly
  loss, total = evaluate.cross_entropy_loss(logits, jnp.asarray(targets), None, eps)
  assert float(total) == 3.0                        # PAD target ignored by default weights
  assert abs(float(loss)) < 1e-4
  # Smoothing penalises a confident one-hot prediction; plain CE does not.
  confident = jnp.asarray(np.where(soft == soft.max(-1, keepdims=True), 30.0, 0.0))
  smoothed = float(evaluate.cross_entropy_loss(confident, jnp.asarray(targets), None, eps)[0])
  assert smoothed > 1.0 if eps else smoothed < 1e-6


def one_hot_logits(pred: np.ndarray, v: int = 5) -> jnp.ndarray:
  return jnp.asarray(np.eye(v)[pred] * 10.0, jnp.float32)


def test_compute_metrics_hand_built():
  targets = np.array([[3, 4, 2, 0],     # all right
                      [3, 3, 4, 2],     # one mistake
                      [4, 2, 0, 0],     # right; the prediction at a PAD slot is ignored
                      [0, 0, 0, 0]])    # padding row of the last eval batch
  pred = np.array([[3, 4, 2, 1],
                   [3, 4, 4, 2],
                   [4, 2, 3, 3],
                   [1, 1, 1, 1]])
  weights = (targets != PAD).astype(np.float32)
  sums = evaluate.compute_metrics(one_hot_logits(pred), jnp.asarray(targets),
                                  jnp.asarray(weights),
                                  row_mask=jnp.array([True, True, True, False]))
  got = {k: float(v) for k, v in sums.items()}
  assert got["weight_sum"] == 9 and got["correct_tokens"] == 8
  assert got["seq_correct"] == 2 and got["seq_count"] == 3
  ref = reference_loss(np.asarray(one_hot_logits(pred)), targets, weights, 0.0)[0]
  np.testing.assert_allclose(got["loss_sum"], ref, rtol=1e-5)
  # A row excluded by row_mask does not count even when its weights are non-zero.
  masked = evaluate.compute_metrics(one_hot_logits(pred), jnp.asarray(targets), None,
                                    row_mask=jnp.array([False, True, True, False]))
  assert float(masked["seq_correct"]) == 1 and float(masked["seq_count"]) == 2
  # Without row_mask, rows with no weight are skipped; smoothing adds its own sum.
  smoothed = evaluate.compute_metrics(one_hot_logits(pred), jnp.asarray(targets),
                                      jnp.asarray(weights), label_smoothing=0.1)
  assert float(smoothed["seq_count"]) == 3
  assert float(smoothed["smoothed_loss_sum"]) > float(smoothed["loss_sum"])

  summary = evaluate.summarize(evaluate.accumulate(evaluate.accumulate(None, sums), sums))
  assert summary["accuracy"] == pytest.approx(8 / 9)
  assert summary["sequence_accuracy"] == pytest.approx(2 / 3)
  assert summary["loss"] == pytest.approx(ref / 9, rel=1e-5)
  assert summary["perplexity"] == pytest.approx(math.exp(ref / 9), rel=1e-5)


def test_summarize_caps_perplexity_and_handles_empty():
  s = evaluate.summarize({"loss_sum": 1e4, "weight_sum": 10.0, "correct_tokens": 0.0,
                          "seq_correct": 0.0, "seq_count": 0.0})
  assert s["loss"] == 1e3 and s["perplexity"] == pytest.approx(math.exp(80.0))
  assert np.isfinite(np.float32(s["perplexity"]))
  assert math.isnan(s["sequence_accuracy"]) and set(s) == {
      "loss", "perplexity", "accuracy", "sequence_accuracy"}
  empty = evaluate.summarize({"loss_sum": 0.0, "weight_sum": 0.0, "correct_tokens": 0.0,
                              "seq_correct": 0.0, "seq_count": 0.0})
  assert math.isnan(empty["loss"]) and math.isnan(empty["perplexity"])


def test_evaluate_lm_batches_matches_direct_metrics():
  cfg = TransformerConfig(vocab_size=V, emb_dim=16, num_heads=2, num_layers=1, qkv_dim=16,
                          mlp_dim=16, max_len=32, deterministic=True)
  model = TransformerLM(cfg)
  stream = np.random.default_rng(3).integers(4, V, size=50).astype(np.int32)
  batches = list(eval_lm_batches(stream, seq_len=8, batch_size=4))
  variables = random_variables(model, jnp.asarray(batches[0]["inputs"]))
  result = evaluate.evaluate(model, variables["params"], batches)
  total = None
  for b in batches:
    logits = model.apply(variables, jnp.asarray(b["inputs"]))
    total = evaluate.accumulate(total, evaluate.compute_metrics(
        logits, jnp.asarray(b["targets"]), jnp.asarray(b["weights"]),
        row_mask=jnp.asarray(b["mask"])))
  assert result["num_tokens"] == 49 == total["weight_sum"]
  for key, value in evaluate.summarize(total).items():
    assert result[key] == pytest.approx(value, rel=1e-5)


# --------------------------------------------------------------------------
# BLEU and length buckets.
# --------------------------------------------------------------------------
def test_bleu_identical_and_known_pair():
  refs = ["the cat sat on the mat", "a quick brown fox jumps"]
  assert evaluate.corpus_bleu(refs, refs) == pytest.approx(100.0)
  hyps = ["the cat sat on a mat", "a quick fox jumps"]
  assert evaluate.corpus_bleu(hyps, refs) == pytest.approx(
      sacrebleu.corpus_bleu(hyps, [refs]).score)
  assert math.isnan(evaluate.corpus_bleu([], []))


def test_bucket_assignment_and_labels():
  edges = evaluate.DEFAULT_BUCKET_EDGES
  lengths = [0, 9, 10, 19, 35, 59, 60, 100]
  assert evaluate.assign_buckets(lengths, edges).tolist() == [0, 0, 1, 1, 3, 5, 6, 6]
  assert evaluate.bucket_labels(edges) == ["0-9", "10-19", "20-29", "30-39", "40-49",
                                           "50-59", "60+"]
  assert evaluate.assign_buckets([1, 3, 4], (2, 4)).tolist() == [0, 0, 1]
  with pytest.raises(ValueError, match="increasing"):
    evaluate.assign_buckets([1], (0, 5, 5))


def test_score_translations_per_bucket():
  hyps = ["a b c", "a b d e", "x y z w v", "p q"]
  refs = ["a b c", "a b c e", "x y z w v", "p r"]
  result = evaluate.score_translations(hyps, refs, [2, 3, 12, 25], edges=(0, 5, 10, 20))
  assert result["num_sentences"] == 4 and result["exact_match"] == 0.5
  assert [b["count"] for b in result["buckets"]] == [2, 0, 1, 1]
  assert [b["label"] for b in result["buckets"]] == ["0-4", "5-9", "10-19", "20+"]
  first, empty, third, last = result["buckets"]
  assert first["bleu"] == pytest.approx(sacrebleu.corpus_bleu(hyps[:2], [refs[:2]]).score)
  assert first["exact_match"] == 0.5 and (first["lo"], first["hi"]) == (0, 5)
  assert math.isnan(empty["bleu"]) and math.isnan(empty["exact_match"])
  assert third["bleu"] == pytest.approx(100.0) and third["exact_match"] == 1.0
  assert last["hi"] is None and last["exact_match"] == 0.0
  scalars = evaluate.decode_scalars(result, prefix="test")
  assert scalars["test/exact_match"] == 0.5
  assert scalars["test_by_length/count_0-4"] == 2.0
  assert not any("5-9" in k for k in scalars)         # empty buckets are not logged


class FakeDecode:
  """A ``decode_fn`` returning each batch's ``tgt_out`` (a perfect copy model)."""

  def __init__(self, batches, wrong_index=None):
    self.by_src = {b["src"].tobytes(): b for b in batches}
    self.wrong_index = wrong_index
    self.calls = []

  def __call__(self, model, variables, src, *, beam_size, alpha, max_extra):
    self.calls.append((beam_size, alpha, max_extra))
    batch = self.by_src[np.asarray(src).tobytes()]
    tokens = np.concatenate([batch["tgt_out"], np.zeros((len(src), 3), np.int32)], 1)
    tokens[batch["index"] == self.wrong_index, 0] = 4   # corrupt one sentence
    tokens[batch["index"] < 0] = 7                      # padding rows must be ignored
    return decoding.DecodeResult(tokens, np.zeros(len(src)), {})


def test_decode_and_score_with_injected_decoder():
  src, batches = copy_batches()
  texts = [VOCAB.decode(s) for s in src]
  fake = FakeDecode(batches)
  result = evaluate.decode_and_score(None, {}, batches, VOCAB, beam_size=3, alpha=0.2,
                                     max_extra=7, length_buckets=(0, 4, 8),
                                     decode_fn=fake)
  assert fake.calls == [(3, 0.2, 7)] * 2
  assert result["bleu"] == pytest.approx(100.0) and result["exact_match"] == 1.0
  assert result["indices"] == list(range(len(LENGTHS)))
  assert result["hypotheses"] == texts == result["references"]
  assert result["source_lengths"] == list(LENGTHS) and result["sources"] is None
  # LENGTHS = 3, 7, 12, 1, 5, 9 -> [0, 4): 2, [4, 8): 2, 8+: 2
  assert [b["count"] for b in result["buckets"]] == [2, 2, 2]

  # One wrong sentence; references and sources given as strings; lengths in words.
  wrong = 2
  sources = [f"w{i} " * (i + 1) for i in range(len(LENGTHS))]
  result = evaluate.decode_and_score(
      None, {}, batches, VOCAB, references=texts, sources=sources, length_unit="words",
      length_buckets=(0, 3), decode_fn=FakeDecode(batches, wrong_index=wrong))
  assert result["exact_match"] == pytest.approx(5 / 6)
  assert result["source_lengths"] == [1, 2, 3, 4, 5, 6]
  assert [b["count"] for b in result["buckets"]] == [2, 4]
  assert result["hypotheses"][wrong] != texts[wrong] and result["sources"] == sources
  assert result["bleu"] == pytest.approx(
      sacrebleu.corpus_bleu(result["hypotheses"], [texts]).score)
  with pytest.raises(ValueError, match="words"):
    evaluate.decode_and_score(None, {}, batches, VOCAB, length_unit="words",
                              decode_fn=fake)


TINY_TRANSFORMER = TransformerConfig(vocab_size=V, emb_dim=16, num_heads=2, num_layers=2,
                                     qkv_dim=16, mlp_dim=16, max_len=64, deterministic=True)


@pytest.mark.parametrize("name,beam", [("transformer", 2), ("rnnsearch", 1)])
def test_decode_and_score_end_to_end(name, beam):
  model = (Transformer(TINY_TRANSFORMER) if name == "transformer"
           else RNNSearch(V, V, emb_dim=8, hidden_dim=16))
  src, batches = copy_batches(batch_size=8)   # one batch: 6 real rows, 2 padding rows
  variables = random_variables(model, jnp.asarray(batches[0]["src"][:, :4]),
                               jnp.asarray(batches[0]["tgt_in"][:, :4]))
  result = evaluate.decode_and_score(model, variables["params"], batches, VOCAB,
                                     beam_size=beam, max_extra=4, src_vocab=VOCAB,
                                     length_buckets=(0, 5, 10))
  direct = decoding.decode(model, variables, batches[0]["src"], beam_size=beam,
                           max_extra=4)
  assert np.asarray(direct.tokens).shape[1] == 16 + 4     # source bucket + max_extra
  assert result["hypotheses"] == [VOCAB.decode(t) for t in np.asarray(direct.tokens)[:6]]
  assert result["num_sentences"] == 6 and result["indices"] == list(range(6))
  assert result["sources"] == [VOCAB.decode(s) for s in src]
  assert result["source_lengths"] == list(LENGTHS)
  assert [b["count"] for b in result["buckets"]] == [2, 3, 1]
  assert 0.0 <= result["bleu"] <= 100.0 and 0.0 <= result["exact_match"] <= 1.0


# --------------------------------------------------------------------------
# Alignment examples.
# --------------------------------------------------------------------------
class FakeAligner(nn.Module):
  """Uniform attention over real positions, in Transformer and LSTMN layouts."""

  @nn.compact
  def __call__(self, src, tgt_in, *, train=False, return_alignments=False):
    bias = self.param("bias", nn.initializers.zeros, (V,))
    b, t = tgt_in.shape
    logits = jnp.zeros((b, t, V)) + bias
    src_real = (src != PAD).astype(jnp.float32)
    cross = jnp.broadcast_to((src_real / src_real.sum(-1, keepdims=True))[:, None, None, None],
                             (b, 2, 3, t, src.shape[1]))
    # Head h of the last layer puts weight h + 1 everywhere, so the mean is 2 * uniform.
    cross = cross * (jnp.arange(3.0) + 1)[:, None, None]
    intra = jnp.tril(jnp.ones((t, t)))[None] * (tgt_in != PAD)[:, None, :]
    return logits, {"cross": cross, "intra": jnp.broadcast_to(intra, (b, t, t))}


def test_alignment_examples_trim_and_reduce():
  _, batches = copy_batches(batch_size=8)
  batch = dict(batches[0])
  batch["mask"] = batch["mask"].copy()
  batch["mask"][0] = False                    # skipped like a padding row
  model = FakeAligner()
  variables = {"params": {"bias": jnp.zeros(V)}}
  examples = evaluate.alignment_examples(model, variables, batch, VOCAB, VOCAB, 3,
                                         per_head=True)
  assert len(examples) == 3
  for j, ex in zip((1, 2, 3), examples):
    n = LENGTHS[j] + 1                        # words + EOS on both sides
    src_tokens, tgt_tokens, matrices = ex     # unpacks as a 3-tuple
    assert src_tokens == VOCAB.tokens(batch["src"][j, :n]) and src_tokens[-1] == "</s>"
    assert tgt_tokens == VOCAB.tokens(batch["tgt_out"][j, :n])
    assert set(matrices) == {"cross", "cross/head0", "cross/head1", "cross/head2", "intra"}
    np.testing.assert_allclose(matrices["cross"], np.full((n, n), 2.0 / n), rtol=1e-6)
    np.testing.assert_allclose(matrices["cross/head2"], np.full((n, n), 3.0 / n), rtol=1e-6)
    assert matrices["intra"].shape == (n, n)
    np.testing.assert_array_equal(matrices["intra"], np.tril(np.ones((n, n))))
    assert ex.columns["cross"] == src_tokens
    assert ex.columns["intra"] == VOCAB.tokens(batch["tgt_in"][j, :n])
    assert ex.columns["intra"][0] == "<s>"


@pytest.mark.parametrize("name", ["transformer", "rnnsearch"])
def test_alignment_examples_real_models(name):
  model = (Transformer(TINY_TRANSFORMER) if name == "transformer"
           else RNNSearch(V, V, emb_dim=8, hidden_dim=16))
  _, batches = copy_batches(batch_size=4)
  batch = batches[1]                          # 2 real rows (lengths 5, 9), 2 padding rows
  variables = random_variables(model, jnp.asarray(batch["src"][:, :4]),
                               jnp.asarray(batch["tgt_in"][:, :4]))
  examples = evaluate.alignment_examples(model, variables["params"], batch, VOCAB, VOCAB, 4)
  assert len(examples) == 2
  for ex, words in zip(examples, (5, 9)):
    assert list(ex.matrices) == ["cross"]
    assert ex.matrices["cross"].shape == (words + 1, words + 1)
    # Padding gets no attention, so each trimmed row is still a distribution.
    np.testing.assert_allclose(ex.matrices["cross"].sum(-1), 1.0, rtol=1e-5)
    assert len(ex.src_tokens) == len(ex.tgt_tokens) == words + 1


def test_alignment_examples_without_alignments_or_rows():
  class NoAlign(nn.Module):
    @nn.compact
    def __call__(self, src, tgt_in, *, train=False, return_alignments=False):
      return jnp.zeros(tgt_in.shape + (V,)), {}

  _, batches = copy_batches()
  assert evaluate.alignment_examples(NoAlign(), {"params": {}}, batches[0],
                                     VOCAB, VOCAB, 2) == []
  empty = dict(batches[1], mask=np.zeros(4, bool))
  assert evaluate.alignment_examples(FakeAligner(), {"params": {"bias": jnp.zeros(V)}},
                                     empty, VOCAB, VOCAB, 2) == []
