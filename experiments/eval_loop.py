"""One evaluation pass of the trainer: metrics, decoding with BLEU, alignment plots, LM samples."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np

from experiments import evaluate, plots


def _sum_metrics(eval_step, params, batches, to_global) -> dict[str, float]:
  total: dict[str, float] = {}
  for batch in batches:
    sums = eval_step(params, to_global(batch))
    for k, v in sums.items():
      total[k] = total.get(k, 0.0) + float(np.asarray(v.addressable_data(0)))
  return total


def evaluate_all(config, model, params, ds, eval_step: Callable, data_sharding, workdir: Path,
                 step: int, writer, task: str, host: Callable, final: bool = False,
                 note: Callable[[str], None] = lambda text: None) -> dict:
  """Runs the eval set and returns ``{"eval/loss": ..., "eval/accuracy": ..., ...}``.

  With ``final`` the test split (if the data has one) is decoded and scored
  too, as ``test/bleu`` etc., with the run's beam settings. ``note`` gets a
  line as each phase starts, since decoding a large eval set takes a while.

  Teacher-forced metrics and decoding run on every host (the eval step is a
  collective; decoded rows are gathered); plots are drawn by process 0, from
  a host copy of the parameters.
  """
  def to_global(batch):
    return {k: jax.make_array_from_process_local_data(data_sharding, np.asarray(v))
            for k, v in batch.items()}

  note(f"eval @ {step}: teacher-forced metrics")
  batches = ds.eval()
  if config.num_eval_batches:
    batches = itertools.islice(batches, config.num_eval_batches)
  metrics = {f"eval/{k}": v for k, v in
             evaluate.summarize(_sum_metrics(eval_step, params, batches, to_global)).items()}
  host_params = host(params)
  if task == "seq2seq" and config.decode.enabled:
    # Every process decodes its own share of rows; all_processes gathers them
    # so BLEU covers the whole eval set on every host count.
    note(f"eval @ {step}: decoding the eval set (beam {config.decode.beam_size})")
    batches = ds.eval()
    if config.decode.num_batches:
      batches = itertools.islice(batches, config.decode.num_batches)
    scored = evaluate.decode_and_score(
        model, host_params, batches, ds.tgt_vocab, beam_size=config.decode.beam_size,
        alpha=config.decode.alpha, max_extra=config.decode.max_extra,
        references=ds.eval_references, sources=ds.eval_sources,
        length_buckets=tuple(config.decode.length_buckets), all_processes=True)
    metrics.update(evaluate.decode_scalars(scored))
    if final and ds.test is not None:
      note(f"eval @ {step}: decoding the test set (beam {config.decode.beam_size})")
      test = evaluate.decode_and_score(
          model, host_params, ds.test(), ds.tgt_vocab, beam_size=config.decode.beam_size,
          alpha=config.decode.alpha, max_extra=config.decode.max_extra,
          references=ds.test_references, sources=ds.test_sources,
          length_buckets=tuple(config.decode.length_buckets), all_processes=True)
      metrics.update(evaluate.decode_scalars(test, prefix="test"))
    if jax.process_index() == 0:
      plots.plot_metric_vs_length(scored["buckets"],
                                  workdir / "plots" / f"by_length_step{step:08d}.png",
                                  title=f"{config.model.name} @ {step}")
  if task == "lm" and jax.process_index() == 0 and config.get("num_sample_tokens", 0):
    note(f"eval @ {step}: sampling {config.num_sample_tokens} tokens")
    text = lm_sample_text(model, host_params, ds.tgt_vocab, ds.eval, config.num_sample_tokens,
                          seed=config.seed)
    # Fenced: TensorBoard renders text summaries as Markdown.
    writer.write_texts(step, {"samples/lm": f"```\n{text}\n```"})
    with open(workdir / "samples.txt", "a", encoding="utf-8") as f:
      f.write(f"=== step {step} ===\n{text}\n")
  if jax.process_index() == 0 and config.num_plot_examples:
    first = next(iter(ds.eval()))
    examples = evaluate.alignment_examples(model, host_params, first, ds.src_vocab,
                                           ds.tgt_vocab, config.num_plot_examples, task=task)
    plots.save_alignment_plots(examples, workdir / "plots", step)
    for i, ex in enumerate(examples):
      for name, matrix in ex.matrices.items():
        writer.write_image(step, f"alignments/{i}/{name}", plots.heatmap_image(
            matrix, ex.columns.get(name, ex.src_tokens), ex.tgt_tokens, title=name))
  return metrics


_SAMPLERS: dict[tuple[int, int, int], tuple[Any, Callable]] = {}


def _sampler(model: Any, prompt_len: int, num_tokens: int) -> Callable:
  """One jitted ``(params, prompt [1, P], key) -> tokens`` per model and lengths.

  Kept across evals, so the sampling loop compiles once per run.
  """
  from attention.sampling import lm_step_fn, sample
  from experiments.data.tokenizers import BOS, PAD, UNK

  cache_key = (id(model), prompt_len, num_tokens)
  if cache_key in _SAMPLERS and _SAMPLERS[cache_key][0] is model:
    return _SAMPLERS[cache_key][1]
  if len(_SAMPLERS) >= 8:   # one process can train many runs (tests, sweeps in-process)
    _SAMPLERS.clear()

  def run(params, prompt, key):
    state, step_fn = lm_step_fn(model, {"params": params}, batch_size=1,
                                max_len=prompt_len + num_tokens)
    return sample(step_fn, state, prompt, key, num_tokens=num_tokens, temperature=1.0,
                  exclude=(PAD, BOS, UNK))

  _SAMPLERS[cache_key] = (model, jax.jit(run))
  return _SAMPLERS[cache_key][1]


def lm_sample_text(model, params, vocab, eval_batches: Callable, num_tokens: int,
                   seed: int) -> str:
  """A sampled continuation (temperature 1, fixed ``seed``) of a newline, for the eval log.

  The prompt is a newline where the vocabulary has one (running text), else the
  first token of the eval set. The same seed at every eval shows how the text
  changes as the model trains.
  """
  from experiments.data.tokenizers import UNK
  prompt = [i for i in vocab.encode("\n") if i != UNK]
  if not prompt:
    prompt = [int(np.asarray(next(iter(eval_batches()))["inputs"])[0, 0])]
  tokens = _sampler(model, len(prompt), num_tokens)(
      params, np.asarray([prompt], np.int32), jax.random.key(seed))
  return vocab.decode(prompt + np.asarray(tokens)[0].tolist())
