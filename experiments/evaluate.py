"""Evaluation: teacher-forced metrics, decoding with BLEU by source length, alignments.

* Pure, jit-compatible metrics: :func:`cross_entropy_loss` (the training
  loss too; defined in :mod:`experiments.loss`) and :func:`compute_metrics`,
  which returns *sums* so that batches, devices and hosts combine by addition;
  :func:`summarize` turns totals into means. :func:`eval_step` / :func:`evaluate` apply them to
  seq2seq (``src``/``tgt_in``/``tgt_out``) or LM (``inputs``/``targets``) batches.
* :func:`decode_and_score`: greedy or beam search (:func:`attention.decoding.decode`)
  for any model of the :mod:`attention.models.base` protocol, scored with
  sacreBLEU and exact match, overall and per source-length bucket
  (Bahdanau et al. 2015, Fig. 2); :func:`score_translations` is the scoring alone.
* :func:`alignment_examples`: teacher-forced attention matrices trimmed to the
  real tokens, for :mod:`experiments.plots` (Fig. 3 of the same paper).

Multi-host: the host loops see this process's rows only. With
``all_processes=True`` (a collective: every process must call) they combine
all processes' sums / decoded rows, so each returns the global result.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import inspect
import itertools
import math
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import sacrebleu

from attention import decoding
from attention.models.base import BOS, EOS, PAD
from experiments.loss import cross_entropy_loss

Array = jax.Array
PyTree = Any
Batch = Mapping[str, Any]

__all__ = [
    "DEFAULT_BUCKET_EDGES", "AlignmentExample", "accumulate", "alignment_examples",
    "assign_buckets", "bucket_labels", "compute_metrics", "corpus_bleu",
    "cross_entropy_loss", "decode_and_score", "decode_scalars", "eval_step", "evaluate",
    "score_translations", "source_lengths", "summarize",
]

# Bahdanau et al. (2015) Fig. 2 plots BLEU against sentence length in words, 0..60+.
DEFAULT_BUCKET_EDGES = (0, 10, 20, 30, 40, 50, 60)
# exp(80) ~ 5.5e34 still fits float32, which TensorBoard stores.
_MAX_LOG_PERPLEXITY = 80.0
# Alignment keys whose columns are the decoder's own (target-side) inputs.
SELF_ATTENTION_KEYS = ("intra", "self")


def _variables(params: PyTree) -> PyTree:
  """Accepts ``{'params': ...}`` variables or a bare parameter tree."""
  return params if isinstance(params, Mapping) and "params" in params else {"params": params}


# --------------------------------------------------------------------------
# Teacher-forced metrics (pure, jit-compatible).
# --------------------------------------------------------------------------
def compute_metrics(logits: Array, targets: Array, weights: Array | None = None,
                    label_smoothing: float = 0.0, row_mask: Array | None = None
                    ) -> dict[str, Array]:
  """Sums for loss and token/sequence accuracy (add over batches, then :func:`summarize`).

  Args:
    logits: ``[B, T, V]``.
    targets: ``[B, T]`` int.
    weights: ``[B, T]``, 0 on padding; None: ``targets != PAD``.
    label_smoothing: If > 0, also return the smoothed training objective.
    row_mask: ``[B]`` bool, False on padding rows; None: rows with any weight.

  Returns:
    float32 scalars ``loss_sum`` (unsmoothed cross-entropy), ``weight_sum``,
    ``correct_tokens``, ``seq_correct`` (counted rows whose weighted tokens
    are all right) and ``seq_count``; plus ``smoothed_loss_sum`` if smoothing.
  """
  weights = (targets != PAD if weights is None else weights).astype(jnp.float32)
  loss_sum, weight_sum = cross_entropy_loss(logits, targets, weights)
  correct = jnp.argmax(logits, axis=-1) == targets
  row_valid = jnp.sum(weights, axis=-1) > 0
  if row_mask is not None:
    row_valid = row_valid & row_mask.astype(jnp.bool_)
  row_correct = jnp.all(correct | (weights == 0), axis=-1) & row_valid
  sums = {"loss_sum": loss_sum, "weight_sum": weight_sum,
          "correct_tokens": jnp.sum(correct * weights),
          "seq_correct": jnp.sum(row_correct.astype(jnp.float32)),
          "seq_count": jnp.sum(row_valid.astype(jnp.float32))}
  if label_smoothing:
    sums["smoothed_loss_sum"] = cross_entropy_loss(logits, targets, weights,
                                                   label_smoothing)[0]
  return sums


def accumulate(total: Mapping[str, float] | None, sums: Mapping[str, Any]) -> dict[str, float]:
  """Adds a batch's sums into host-side float64 totals (``total=None`` starts)."""
  out = dict(total or {})
  for key, value in sums.items():
    out[key] = out.get(key, 0.0) + float(np.asarray(value, np.float64))
  return out


def _ratio(num: float, den: float) -> float:
  return num / den if den > 0 else float("nan")


def summarize(sums: Mapping[str, Any]) -> dict[str, float]:
  """Totals of :func:`compute_metrics` -> ``loss``, ``perplexity``, ``accuracy``,
  ``sequence_accuracy`` (and ``smoothed_loss`` if summed).

  Perplexity is ``exp(loss)`` with the loss capped at 80, so it stays finite
  in float32. Empty denominators give NaN.
  """
  s = {k: float(np.asarray(v, np.float64)) for k, v in sums.items()}
  loss = _ratio(s["loss_sum"], s["weight_sum"])
  out = {"loss": loss,
         "perplexity": loss if math.isnan(loss) else math.exp(min(loss, _MAX_LOG_PERPLEXITY)),
         "accuracy": _ratio(s["correct_tokens"], s["weight_sum"]),
         "sequence_accuracy": _ratio(s["seq_correct"], s["seq_count"])}
  if "smoothed_loss_sum" in s:
    out["smoothed_loss"] = _ratio(s["smoothed_loss_sum"], s["weight_sum"])
  return out


def eval_step(model: Any, variables: PyTree, batch: Batch,
              label_smoothing: float = 0.0) -> dict[str, Array]:
  """:func:`compute_metrics` sums of one seq2seq or LM batch (jit: model static).

  Seq2seq batches call ``model(src, tgt_in)`` and score ``tgt_out``; LM
  batches call ``model(inputs)`` and score ``targets``. ``weights`` and
  ``mask`` are used when present.
  """
  if "src" in batch:
    logits = model.apply(variables, batch["src"], batch["tgt_in"], train=False)
    targets = batch["tgt_out"]
  else:
    logits = model.apply(variables, batch["inputs"], train=False)
    targets = batch["targets"]
  return compute_metrics(logits, targets, batch.get("weights"), label_smoothing,
                         row_mask=batch.get("mask"))


_eval_step_jit = jax.jit(eval_step, static_argnames=("model", "label_smoothing"))
_MODEL_KEYS = ("src", "tgt_in", "tgt_out", "inputs", "targets", "weights", "mask")


def evaluate(model: Any, params: PyTree, batches: Iterable[Batch], *,
             label_smoothing: float = 0.0, max_batches: int | None = None,
             all_processes: bool = False) -> dict[str, float]:
  """Teacher-forced :func:`summarize` metrics over eval batches, plus ``num_tokens``.

  ``params`` may be ``{'params': ...}`` variables or bare parameters;
  ``max_batches`` stops early.
  """
  variables, totals = _variables(params), {}
  for batch in itertools.islice(batches, max_batches):
    inputs = {k: jnp.asarray(batch[k]) for k in _MODEL_KEYS if k in batch}
    totals = accumulate(totals, _eval_step_jit(model, variables, inputs,
                                               label_smoothing=float(label_smoothing)))
  if all_processes and jax.process_count() > 1:
    from jax.experimental import multihost_utils
    keys = sorted(totals)
    gathered = multihost_utils.process_allgather(np.array([totals[k] for k in keys]))
    totals = dict(zip(keys, np.asarray(gathered, np.float64).sum(axis=0).tolist()))
  if not totals:
    raise ValueError("evaluate() got no batches")
  return {**summarize(totals), "num_tokens": totals["weight_sum"]}


# --------------------------------------------------------------------------
# Decoding, BLEU and length buckets.
# --------------------------------------------------------------------------
def _content(ids: Iterable[int]) -> tuple[int, ...]:
  """Ids up to the first EOS, without PAD/BOS (what a tokenizer decodes)."""
  ids = [int(i) for i in ids]
  ids = ids[:ids.index(EOS)] if EOS in ids else ids
  return tuple(i for i in ids if i not in (PAD, BOS))


def source_lengths(src: Any) -> np.ndarray:
  """``[B, S]`` source ids -> ``[B]`` lengths in tokens (PAD/BOS/EOS excluded)."""
  src = np.asarray(src)
  return ((src != PAD) & (src != EOS) & (src != BOS)).sum(axis=-1)


def bucket_labels(edges: Sequence[float]) -> list[str]:
  """``(0, 10, 20)`` -> ``["0-9", "10-19", "20+"]`` (half-open buckets)."""
  labels = [f"{lo}-{hi - 1}" if float(lo).is_integer() and float(hi).is_integer()
            else f"{lo}-{hi}" for lo, hi in zip(edges[:-1], edges[1:])]
  return labels + [f"{edges[-1]}+"]


def assign_buckets(lengths: Sequence[float], edges: Sequence[float]) -> np.ndarray:
  """Bucket ``i`` holds ``[edges[i], edges[i+1])``, the last is open; below ``edges[0]``: 0."""
  if not edges or any(a >= b for a, b in zip(edges[:-1], edges[1:])):
    raise ValueError(f"bucket edges must be strictly increasing, got {edges}")
  return np.array([max(bisect.bisect_right(edges, x) - 1, 0) for x in lengths], np.int64)


def corpus_bleu(hypotheses: Sequence[str], references: Sequence[str],
                tokenize: str = "13a") -> float:
  """sacreBLEU corpus BLEU with one reference per sentence (NaN if empty)."""
  if len(hypotheses) != len(references):
    raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
  if not hypotheses:
    return float("nan")
  return float(sacrebleu.corpus_bleu(list(hypotheses), [list(references)],
                                     tokenize=tokenize).score)


def score_translations(hypotheses: Sequence[str], references: Sequence[str],
                       lengths: Sequence[float], *,
                       edges: Sequence[float] = DEFAULT_BUCKET_EDGES,
                       matches: Sequence[bool] | None = None,
                       tokenize: str = "13a") -> dict[str, Any]:
  """BLEU and exact match, overall and per source-length bucket.

  Args:
    hypotheses: Detokenised outputs.
    references: One reference per hypothesis.
    lengths: Source length of each sentence (the bucketing key).
    edges: Bucket edges (see :func:`assign_buckets`).
    matches: Per-sentence exact-match flags; default ``hyp == ref``.
    tokenize: sacreBLEU tokenizer (``13a``, ``intl``, ``char``, ``none``, ...).

  Returns:
    ``{"bleu", "exact_match", "num_sentences", "buckets"}``, ``buckets`` a list
    of ``{"label", "lo", "hi" (None: open), "count", "bleu", "exact_match"}``
    (NaN metrics when empty).
  """
  n = len(hypotheses)
  if matches is None:
    matches = [h == r for h, r in zip(hypotheses, references)]
  matches = np.asarray(matches, bool).reshape(n)
  ids = assign_buckets(lengths, edges)
  buckets = []
  for b, label in enumerate(bucket_labels(edges)):
    members = np.flatnonzero(ids == b)
    buckets.append({
        "label": label, "lo": edges[b], "hi": edges[b + 1] if b + 1 < len(edges) else None,
        "count": int(len(members)),
        "bleu": corpus_bleu([hypotheses[i] for i in members],
                            [references[i] for i in members], tokenize),
        "exact_match": float(matches[members].mean()) if len(members) else float("nan")})
  return {"bleu": corpus_bleu(hypotheses, references, tokenize),
          "exact_match": float(matches.mean()) if n else float("nan"),
          "num_sentences": n, "buckets": buckets}


def decode_and_score(model: Any, params: PyTree, batches: Iterable[Batch], tgt_vocab: Any,
                     *, beam_size: int = 1, alpha: float = 0.6,
                     max_extra: int = decoding.DEFAULT_MAX_EXTRA,
                     references: Sequence[str] | None = None, src_vocab: Any = None,
                     sources: Sequence[str] | None = None,
                     length_buckets: Sequence[float] = DEFAULT_BUCKET_EDGES,
                     length_unit: str = "tokens", bleu_tokenize: str = "13a",
                     max_batches: int | None = None, all_processes: bool = False,
                     decode_fn: Callable[..., Any] = decoding.decode) -> dict[str, Any]:
  """Decodes eval batches and scores them with BLEU and exact match, also by length.

  Args:
    model: A seq2seq model of the :mod:`attention.models.base` protocol.
    params: Its ``{'params': ...}`` variables or bare parameters.
    batches: Eval batches with ``src [B, S]``, ``index [B]`` (-1: padding row)
      and ``tgt_out`` (optional when ``references`` is given).
    tgt_vocab: Target tokenizer (``decode(ids) -> str``).
    beam_size, alpha, max_extra: Search settings (``beam_size=1``: greedy).
    references: Reference strings by example index (``Datasets.eval_references``);
      default: the detokenised ``tgt_out``.
    src_vocab: Source tokenizer, to detokenise sources if ``sources`` is None.
    sources: Source strings by example index (``Datasets.eval_sources``).
    length_buckets: Bucket edges (see :func:`assign_buckets`).
    length_unit: ``"tokens"`` (source ids without EOS) or ``"words"``
      (whitespace words of the source text, as in Bahdanau et al.).
    bleu_tokenize: sacreBLEU tokenizer name.
    max_batches: Stop after this many batches (None: all).
    all_processes: Gather all processes' rows (see the module docstring).
    decode_fn: Replaces :func:`attention.decoding.decode` (same keywords;
      returns an object with ``tokens [B, L]``), e.g. in tests.

  Returns:
    :func:`score_translations`'s keys, ``exact_match`` comparing decoded ids
    with ``tgt_out``'s (strings without ``tgt_out``), plus, in example-index
    order, ``indices``, ``hypotheses``, ``references``, ``sources`` (None
    without ``sources``/``src_vocab``) and ``source_lengths``.
  """
  if length_unit not in ("tokens", "words"):
    raise ValueError(f"length_unit must be 'tokens' or 'words', got {length_unit!r}")
  if length_unit == "words" and sources is None and src_vocab is None:
    raise ValueError("length_unit='words' needs sources or src_vocab")
  variables, rows, have_ids = _variables(params), {}, True
  for batch in itertools.islice(batches, max_batches):
    src, index = np.asarray(batch["src"], np.int32), np.asarray(batch["index"], np.int64)
    tokens = np.asarray(decode_fn(model, variables, src, beam_size=beam_size, alpha=alpha,
                                  max_extra=max_extra).tokens)
    have_ids &= "tgt_out" in batch
    refs = np.asarray(batch["tgt_out"]) if "tgt_out" in batch else np.zeros((len(src), 1))
    if all_processes and jax.process_count() > 1:
      from jax.experimental import multihost_utils
      # Processes decode to different lengths; pad to one bound for the gather.
      width = decoding.bucket_length(src.shape[1]) + max_extra
      tokens = np.pad(tokens, ((0, 0), (0, width - tokens.shape[1])), constant_values=PAD)
      src, index, tokens, refs = (np.asarray(multihost_utils.process_allgather(a, tiled=True))
                                  for a in (src, index, tokens, refs))
    for row in np.flatnonzero(index >= 0):
      rows[int(index[row])] = (_content(tokens[row]), _content(refs[row]), src[row])
  order = sorted(rows)
  hyp_ids = [rows[i][0] for i in order]
  hypotheses = [tgt_vocab.decode(ids) for ids in hyp_ids]
  if references is not None:
    refs_text = [references[i] for i in order]
  elif have_ids:
    refs_text = [tgt_vocab.decode(rows[i][1]) for i in order]
  else:
    raise ValueError("decode_and_score needs batches with tgt_out or references")
  # Ids rather than strings when we have them: detokenisation may normalise
  # (SentencePiece spacing, UNK) and make different outputs look equal.
  matches = ([h == rows[i][1] for h, i in zip(hyp_ids, order)] if have_ids
             else [h == r for h, r in zip(hypotheses, refs_text)])
  srcs_text = ([sources[i] for i in order] if sources is not None
               else [src_vocab.decode(rows[i][2]) for i in order] if src_vocab is not None
               else None)
  lengths = ([len(s.split()) for s in srcs_text] if length_unit == "words"
             else [int(source_lengths(rows[i][2])) for i in order])
  scores = score_translations(hypotheses, refs_text, lengths, edges=length_buckets,
                              matches=matches, tokenize=bleu_tokenize)
  return {**scores, "indices": order, "hypotheses": hypotheses, "references": refs_text,
          "sources": srcs_text, "source_lengths": lengths}


def decode_scalars(result: Mapping[str, Any], prefix: str = "eval") -> dict[str, float]:
  """Flat scalars of a :func:`decode_and_score` result, for a metric writer.

  ``{prefix}/bleu``, ``{prefix}/exact_match`` and, per non-empty bucket,
  ``{prefix}_by_length/{bleu,exact_match,count}_{label}`` (one TensorBoard
  section for the length breakdown).
  """
  out = {f"{prefix}/bleu": result["bleu"], f"{prefix}/exact_match": result["exact_match"]}
  for b in result["buckets"]:
    if b["count"]:
      out.update({f"{prefix}_by_length/{key}_{b['label']}": float(b[key])
                  for key in ("bleu", "exact_match", "count")})
  return out


# --------------------------------------------------------------------------
# Alignment matrices for plots.
# --------------------------------------------------------------------------
@dataclasses.dataclass
class AlignmentExample:
  """One sentence's attention matrices, trimmed to its real tokens.

  Unpacks and indexes like the tuple ``(src_tokens, tgt_tokens, matrices)``.

  Attributes:
    src_tokens: ``S`` source token strings (LM: the input tokens).
    tgt_tokens: ``T`` target token strings; row ``t`` predicts token ``t``.
    matrices: ``{name: float32 [T, S_name]}`` (``S_name = S`` for source attention).
    columns: ``{name: x-axis tokens}``: the source tokens, or for self-attention
      (``intra``) the decoder's own inputs.
  """

  src_tokens: list[str]
  tgt_tokens: list[str]
  matrices: dict[str, np.ndarray]
  columns: dict[str, list[str]] = dataclasses.field(default_factory=dict)

  def _tuple(self) -> tuple:
    return (self.src_tokens, self.tgt_tokens, self.matrices)

  def __iter__(self):
    return iter(self._tuple())

  def __getitem__(self, i: int) -> Any:
    return self._tuple()[i]

  def __len__(self) -> int:
    return 3


def _reduce(name: str, a: np.ndarray, per_head: bool) -> dict[str, np.ndarray]:
  """One example's ``[..., T, S]`` weights -> named ``[T, S]`` matrices."""
  if a.ndim == 2:
    return {name: a}
  if a.ndim == 3:  # [layers, T, S]: the top layer feeds the output
    extra = {f"{name}/layer{l}": a[l] for l in range(len(a))} if per_head else {}
    return {name: a[-1], **extra}
  top = a.reshape((-1,) + a.shape[-3:])[-1]  # [heads, T, S] of the last layer
  extra = {f"{name}/head{h}": top[h] for h in range(len(top))} if per_head else {}
  return {name: top.mean(axis=0), **extra}


@functools.partial(jax.jit, static_argnames=("model",))
def _forced_alignments(model: Any, variables: PyTree, inputs: tuple[Array, ...]
                       ) -> dict[str, Array]:
  return model.apply(variables, *inputs, train=False, return_alignments=True)[1]


def alignment_examples(model: Any, params: PyTree, batch: Batch, src_vocab: Any,
                       tgt_vocab: Any, num_examples: int = 4, *, per_head: bool = False,
                       task: str | None = None) -> list[AlignmentExample]:
  """Teacher-forced attention matrices of a batch's first real rows.

  Transformer ``cross [B, layers, heads, T, S]`` gives the last layer's mean
  over heads as ``cross`` (``cross/head{h}`` too with ``per_head``);
  ``[B, layers, T, S]`` gives the top layer (``name/layer{l}``);
  ``[B, T, S]`` is kept (RNNsearch/Luong ``cross``, LSTMN ``inter``/``intra``).

  Args:
    model: Seq2seq model (``src``/``tgt_in``/``tgt_out`` batches) or LM
      (``inputs``/``targets``) taking ``return_alignments=True``; others
      (e.g. TransformerLM), and models with no alignments, give ``[]``.
    params: Its variables or bare parameters.
    batch: One eval batch; rows with ``mask`` False are skipped.
    src_vocab, tgt_vocab: Tokenizers (``tokens(ids)`` gives the labels).
    num_examples: How many rows at most.
    per_head: Also return per-head (or per-layer) matrices.
    task: ``"seq2seq"`` or ``"lm"``; None: inferred from the batch keys.

  Returns:
    :class:`AlignmentExample` items with ``[T_real, S_real]`` matrices:
    real target tokens (EOS included) by real source tokens (EOS included)
    or, for self-attention, real decoder inputs.
  """
  if "return_alignments" not in inspect.signature(type(model).__call__).parameters:
    return []
  seq2seq = task == "seq2seq" if task else "src" in batch
  keys = ("src", "tgt_in") if seq2seq else ("inputs",)
  targets = np.asarray(batch["tgt_out" if seq2seq else "targets"])
  real = np.asarray(batch["mask"], bool) if "mask" in batch else np.ones(len(targets), bool)
  rows = np.flatnonzero(real & (targets != PAD).any(axis=-1))[:num_examples]
  if not len(rows):
    return []
  inputs = tuple(jnp.asarray(np.asarray(batch[k])[rows]) for k in keys)
  aligns = jax.device_get(_forced_alignments(model, _variables(params), inputs))
  src, dec_in, targets = (np.asarray(batch[keys[0]])[rows], np.asarray(batch[keys[-1]])[rows],
                          targets[rows])
  examples = []
  for j in range(len(rows) if aligns else 0):
    t_len, s_len = int((targets[j] != PAD).sum()), int((src[j] != PAD).sum())
    src_tokens = (src_vocab if seq2seq else tgt_vocab).tokens(src[j, :s_len])
    matrices, columns = {}, {}
    for key, value in aligns.items():
      self_attention = not seq2seq or key in SELF_ATTENTION_KEYS
      for name, m in _reduce(key, np.asarray(value[j], np.float32), per_head).items():
        cols = min(m.shape[-1], t_len) if self_attention else s_len
        matrices[name] = m[:t_len, :cols]
        columns[name] = tgt_vocab.tokens(dec_in[j, :cols]) if self_attention else src_tokens
    examples.append(AlignmentExample(src_tokens, tgt_vocab.tokens(targets[j, :t_len]),
                                     matrices, columns))
  return examples
