"""``train_and_evaluate(config, workdir)``: the training loop behind ``experiments.run``.

One jitted train step with donated state runs over a ``Mesh`` of every local
and global device, with axes ``('data', 'model')``: batches are sharded along
``data``, parameters replicated (the ``model`` axis has size
``config.model_parallelism``, 1 by default, ready for sharded parameters).
Host batches become global arrays through
``jax.make_array_from_process_local_data``, so the same code runs on one CPU,
eight simulated devices, or every host of a TPU pod.
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import sys
import time
from pathlib import Path
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from attention import huge_pages
from attention.dispatch import IMPLEMENTATIONS
from experiments import evaluate, optim
from experiments.checkpoints import Checkpointer, WorkdirLock, check_and_write_config
from experiments.data import DataError, create_datasets
from experiments.metric_writers import MetricWriter, read_metrics
from experiments.models import ConfigError, create_model, model_task
from experiments.progress import Progress

log = logging.getLogger("experiments")


class TrainingDiverged(RuntimeError):
  """The loss became NaN or Inf; the last good checkpoint is kept."""


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array  # raw uint32 key data, so orbax can store it


def make_mesh(model_parallelism: int = 1) -> jax.sharding.Mesh:
  n = jax.device_count()
  if model_parallelism < 1 or n % model_parallelism:
    raise ConfigError(f"model_parallelism={model_parallelism} must divide the"
                      f" device count {n}.")
  # Auto axes: XLA propagates shardings through the model, so modules need no
  # sharding annotations (jax.make_mesh defaults to Explicit axes).
  return jax.make_mesh((n // model_parallelism, model_parallelism), ("data", "model"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)


def _check_workdir(workdir: Path) -> None:
  try:
    workdir.mkdir(parents=True, exist_ok=True)
    probe = workdir / f".write-test-{jax.process_index()}"
    probe.write_text("ok")
    probe.unlink()
  except OSError as e:
    raise ConfigError(f"workdir {workdir} is not writable ({e.strerror}); pass a"
                      " --workdir you can write to.") from None


# Config fields that must be integers >= 1, or None / >= 1 where optional.
_POSITIVE_INTS = ("num_train_steps", "batch_size", "eval_batch_size", "grad_accum_steps",
                  "eval_every_steps", "checkpoint_every_steps", "log_every_steps",
                  "max_checkpoints_to_keep", "decode.beam_size")
_OPTIONAL_POSITIVE_INTS = ("num_eval_batches", "decode.num_batches")
_NON_NEGATIVE = ("learning_rate", "warmup_steps", "grad_clip_norm", "weight_decay",
                 "num_plot_examples", "num_sample_tokens", "decode.max_extra")


def _field(config, dotted: str):
  for part in dotted.split("."):
    config = config.get(part) if hasattr(config, "get") else None
  return config


def check_fields(config) -> None:
  """One-line :class:`ConfigError` for a field whose value no run can use."""
  for name in _POSITIVE_INTS + _OPTIONAL_POSITIVE_INTS:
    value = _field(config, name)
    if value is None and name in _OPTIONAL_POSITIVE_INTS:
      continue
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      none = " or None (all)" if name in _OPTIONAL_POSITIVE_INTS else ""
      raise ConfigError(f"{name}={value!r} must be an integer >= 1{none};"
                        f" set --config.{name}=N.")
  for name in _NON_NEGATIVE:
    value = _field(config, name)
    if value is not None and not value >= 0:
      raise ConfigError(f"{name}={value!r} must be >= 0; set --config.{name}.")
  impl = _field(config, "model.implementation")
  if impl is not None and impl not in IMPLEMENTATIONS:
    raise ConfigError(f"model.implementation={impl!r} is unknown; use one of"
                      f" {IMPLEMENTATIONS} or leave it unset (auto).")
  smoothing = config.get("label_smoothing", 0.0)
  if not 0.0 <= smoothing < 1.0:
    raise ConfigError(f"label_smoothing={smoothing!r} must be in [0, 1).")


def _validate(config, mesh) -> None:
  data_size = mesh.shape["data"]
  for field in ("batch_size", "eval_batch_size"):
    value = config[field]
    if value % data_size:
      raise ConfigError(f"{field}={value} is not divisible by the {data_size} data-parallel"
                        f" devices; use a multiple of {data_size}.")
  if config.batch_size % (data_size * config.grad_accum_steps):
    raise ConfigError(f"batch_size={config.batch_size} must split into grad_accum_steps="
                      f"{config.grad_accum_steps} micro-batches over {data_size} devices.")


def model_inputs(task: str, batch: dict) -> tuple:
  return (batch["src"], batch["tgt_in"]) if task == "seq2seq" else (batch["inputs"],)


def _targets(task: str, batch: dict):
  return batch["tgt_out"] if task == "seq2seq" else batch["targets"]


def make_train_step(model, tx, task: str, config, mesh: jax.sharding.Mesh | None = None):
  """The jit-able ``train_step(state, batch, learning_rate) -> (state, metrics)``.

  With ``grad_accum_steps = k``, micro-batch ``i`` is rows ``i, i + k, i + 2k, ...``
  of the batch. The batch is sharded over ``mesh``'s ``data`` axis in contiguous
  row blocks, so each device finds its rows of every micro-batch in its own block
  (``_validate`` makes ``batch_size / devices`` a multiple of ``k``) and data
  parallelism is kept: contiguous micro-batches (rows ``i·B/k ...``) made XLA
  gather the whole batch onto every device, which then computed every
  micro-batch. Without dropout the update equals one step on the whole batch; with
  dropout each micro-batch draws its own mask (``fold_in(rng, i)``).
  """
  accum, smoothing = int(config.grad_accum_steps), float(config.label_smoothing)
  micro_sharding = None if mesh is None else NamedSharding(mesh, P(None, "data"))

  def micro_batches(x):
    x = jnp.swapaxes(x.reshape((-1, accum) + x.shape[1:]), 0, 1)
    return x if micro_sharding is None else jax.lax.with_sharding_constraint(x, micro_sharding)

  def loss_fn(params, batch, rng):
    logits = model.apply({"params": params}, *model_inputs(task, batch), train=True,
                         rngs={"dropout": rng})
    targets = _targets(task, batch)
    loss_sum, weight_sum = evaluate.cross_entropy_loss(
        logits, targets, (targets != 0).astype(jnp.float32), smoothing)
    return loss_sum, weight_sum

  def train_step(state: TrainState, batch: dict, learning_rate: jax.Array):
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if accum == 1:
      (loss_sum, weight_sum), grads = grad_fn(state.params, batch, rng)
    else:
      # Sum micro-batch gradients, then normalise once by the total weight:
      # the same update as one big batch, at 1/accum of the activation memory.
      micro = jax.tree.map(micro_batches, batch)

      def body(carry, inp):
        i, mb = inp
        (l, w), g = grad_fn(state.params, mb, jax.random.fold_in(rng, i))
        return jax.tree.map(jnp.add, carry, ((l, w), g)), None

      zeros = ((0.0, 0.0), jax.tree.map(jnp.zeros_like, state.params))
      ((loss_sum, weight_sum), grads), _ = jax.lax.scan(body, zeros, (jnp.arange(accum), micro))
    denom = jnp.maximum(weight_sum, 1.0)
    grads = jax.tree.map(lambda g: g / denom, grads)
    opt_state = state.opt_state
    opt_state.hyperparams["learning_rate"] = learning_rate
    updates, opt_state = tx.update(grads, opt_state, state.params)
    params = jax.tree.map(lambda p, u: p + u, state.params, updates)
    metrics = {"loss": loss_sum / denom, "grad_norm": _global_norm(grads),
               "tokens": weight_sum}
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return train_step


def _global_norm(tree) -> jax.Array:
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def make_eval_step(model, task: str):
  def eval_step(params, batch):
    logits = model.apply({"params": params}, *model_inputs(task, batch), train=False)
    return evaluate.compute_metrics(logits, _targets(task, batch), batch["weights"],
                                    row_mask=batch["mask"])
  return eval_step


class _Preemption:
  """Turns SIGTERM or Ctrl-C into a checkpoint-and-exit at the next step boundary.

  Single process: a handler sets a flag; a second Ctrl-C stops at once (the
  checkpointer still finishes a save in flight). Multi-process: every host
  must save together, so JAX's own preemption sync point (the coordination
  service notices SIGTERM on any host) decides, identically everywhere.
  """

  def __init__(self):
    self.reason = ""
    self._old: dict = {}
    self._multi = jax.process_count() > 1

  def __enter__(self):
    if not self._multi:
      for sig in (signal.SIGTERM, signal.SIGINT):
        try:
          self._old[sig] = signal.signal(sig, self._handle)
        except ValueError:  # not the main thread: no handler, periodic saves still apply
          pass
    return self

  def _handle(self, signum, frame):
    del frame
    if signum == signal.SIGINT:
      if self.reason == "Ctrl-C":
        raise KeyboardInterrupt
      print("Ctrl-C: saving a checkpoint after this step, then exiting (Ctrl-C again:"
            " stop now, losing the steps since the last checkpoint).", file=sys.stderr,
            flush=True)
    self.reason = "Ctrl-C" if signum == signal.SIGINT else "SIGTERM"

  def requested(self, step: int) -> bool:
    if self._multi:
      from jax.experimental import multihost_utils
      if multihost_utils.reached_preemption_sync_point(step):
        self.reason = "preemption"
        return True
      return False
    return bool(self.reason)

  def __exit__(self, *exc):
    for sig, old in self._old.items():
      signal.signal(sig, old)


def _to_global(batch: dict, sharding: NamedSharding) -> dict:
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in batch.items()}


def _host(tree):
  """Replicated global arrays -> numpy on this host (works multi-host)."""
  return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), tree)


def train_and_evaluate(config, workdir: str) -> dict:
  """Trains ``config`` in ``workdir``, resuming from its latest checkpoint.

  Returns:
    The last eval metrics (also the last line of ``workdir/metrics.jsonl``).
  """
  if not str(workdir).strip():
    raise ConfigError("--workdir is empty; pass the directory for checkpoints and metrics.")
  for name, path in (("--workdir", workdir), ("data.dir", config.data.get("dir")),
                     ("data.path", config.data.get("path"))):
    if path and "://" in str(path):
      # pathlib would turn gs://b/x into the local directory gs:/b/x.
      raise ConfigError(f"{name} {path}: storage URLs are not supported; pass a local or"
                        " mounted path (e.g. a gcsfuse or NFS mount shared by all hosts).")
  check_fields(config)
  workdir = Path(workdir)
  created = not workdir.exists()
  _check_workdir(workdir)
  primary = jax.process_index() == 0
  try:
    with contextlib.ExitStack() as stack:
      if primary:
        stack.enter_context(WorkdirLock(workdir))
      return _train_and_evaluate(config, workdir, primary)
  except BaseException:
    if created and primary:
      _remove_if_unused(workdir)
    raise


def _remove_if_unused(workdir: Path) -> None:
  """Removes a workdir this run created if the run failed before writing to it."""
  try:
    if {p.name for p in workdir.iterdir()} <= {".lock"}:
      (workdir / ".lock").unlink(missing_ok=True)
      workdir.rmdir()
  except OSError:
    pass  # best effort: another process may have started writing there


def _train_and_evaluate(config, workdir: Path, primary: bool) -> dict:
  task = model_task(config.model.name)
  mesh = make_mesh(config.model_parallelism)
  _validate(config, mesh)
  replicated = NamedSharding(mesh, P())
  data_sharding = NamedSharding(mesh, P("data"))
  # Config mistakes surface before the data pipeline writes to the workdir.
  lr_fn = optim.learning_rate_fn(config)
  create_model(config.model, src_vocab_size=8, tgt_vocab_size=8, max_len=8)

  try:
    ds = create_datasets(config.data, seed=config.seed, batch_size=config.batch_size,
                         eval_batch_size=config.eval_batch_size, workdir=str(workdir),
                         process_index=jax.process_index(), process_count=jax.process_count())
  except DataError:
    raise
  except ValueError as e:  # a data setting no pipeline accepts (the message names it)
    raise DataError(f"data config: {e}") from e
  if ds.task != task:
    raise ConfigError(f"model.name={config.model.name!r} is a {task} model but data.name="
                      f"{config.data.name!r} is a {ds.task} task; pick a matching pair.")
  # An LM's per-eval sample (a prompt token plus num_sample_tokens) must fit too.
  sample_len = int(config.get("num_sample_tokens") or 0) + 2 if task == "lm" else 0
  max_len = int(max(ds.stats.get("eval_max_len", 0) or 0, config.data.get("max_len") or 0,
                    config.data.get("seq_len") or 0, sample_len)) + config.decode.max_extra + 18
  # (+18: decoding pads sources up to a multiple of 16, plus BOS/EOS)
  model = create_model(config.model, src_vocab_size=ds.src_vocab.size,
                       tgt_vocab_size=ds.tgt_vocab.size, max_len=max_len)
  tx = optim.make_optimizer(config)

  def init_state(rng):
    params_rng, state_rng = jax.random.split(rng)
    dummy = (jnp.ones((1, 8), jnp.int32),) * (2 if task == "seq2seq" else 1)
    params = model.init({"params": params_rng}, *dummy, train=False)["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      rng=jax.random.key_data(state_rng))

  abstract = jax.eval_shape(init_state, jax.random.key(config.seed))
  state_sharding = jax.tree.map(lambda _: replicated, abstract)
  # Closing the checkpointer waits for a save still in flight, whatever ends
  # the run (a second Ctrl-C, an error in eval): a save that started completes.
  with Checkpointer(workdir / "checkpoints", config.max_checkpoints_to_keep) as ckpt, \
       _Preemption() as preempt:
    if primary:
      check_and_write_config(config.to_dict(), workdir, ckpt.latest_step())
    abstract_sharded = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, state_sharding)
    restored = ckpt.restore_latest(abstract_sharded, fallback=jax.process_count() == 1)
    latest = None
    if restored is not None:
      latest, state, data_state = restored
      ds.train.set_state(data_state)
      log.info("resumed from %s at step %d", workdir / "checkpoints", latest)
    else:
      state = jax.jit(init_state, out_shardings=state_sharding)(jax.random.key(config.seed))
    num_params = sum(x.size for x in jax.tree.leaves(abstract.params))
    start = int(_host(state.step))

    train_step = jax.jit(make_train_step(model, tx, task, config, mesh), donate_argnums=(0,),
                         in_shardings=(state_sharding, data_sharding, replicated),
                         out_shardings=(state_sharding, replicated))
    eval_step = jax.jit(make_eval_step(model, task), in_shardings=(replicated, data_sharding),
                        out_shardings=replicated)
    writer = MetricWriter(workdir, is_primary=primary, resume_step=start)
    if primary:
      log.info("model %s: %.2fM parameters; %d devices (%s); workdir %s", config.model.name,
               num_params / 1e6, jax.device_count(), mesh.shape, workdir)
      if jax.default_backend() == "cpu":
        log.info("host huge pages: %s (attention/huge_pages.py)",
                 "on" if huge_pages.active() else "off")

    def run_eval(step: int, train_loss: float | None) -> dict:
      from experiments import eval_loop  # local: plots pull in matplotlib
      metrics = eval_loop.evaluate_all(config, model, state.params, ds, eval_step, data_sharding,
                                       workdir, step, writer, task, _host,
                                       final=step == config.num_train_steps,
                                       note=progress.note)
      # Reports (launch.report, experiments.compare) read only metrics.jsonl.
      if train_loss is not None:
        metrics["train/loss"] = train_loss
      metrics["model/num_params"] = float(num_params)
      writer.write_eval(step, metrics)
      return metrics

    last_metrics: dict = {}
    progress = Progress(start, config.num_train_steps, enabled=primary)
    pending: list = []
    last_saved = latest
    step = start
    t_mark, tokens_since = time.perf_counter(), 0.0
    while step < config.num_train_steps:
      batch = next(ds.train)
      lr = np.float32(lr_fn(step))
      state, metrics = train_step(state, _to_global(batch, data_sharding), lr)
      step += 1
      pending.append((step, lr, metrics))
      stop = preempt.requested(step)
      final = step == config.num_train_steps
      boundary = {
          "log": step % config.log_every_steps == 0 or final,
          "eval": step % config.eval_every_steps == 0 or final,
          "ckpt": step % config.checkpoint_every_steps == 0 or final,
      }
      if not (any(boundary.values()) or stop):
        continue
      # One host sync per boundary; the loss is checked before any save so
      # a diverged state never becomes the latest checkpoint.
      rows = [(s, l, {k: float(v) for k, v in _host(m).items()}) for s, l, m in pending]
      pending = []
      bad = [s for s, _, m in rows if not math.isfinite(m["loss"])]
      if bad:
        kept = (f"The last good checkpoint (step {last_saved}) stays in"
                f" {workdir / 'checkpoints'}." if last_saved is not None
                else "No checkpoint was saved before it.")
        raise TrainingDiverged(
            f"loss is {rows[-1][2]['loss']} at step {bad[0]}; stopped. {kept} Lower"
            " learning_rate, raise warmup_steps or set grad_clip_norm.")
      now = time.perf_counter()
      tokens_since += sum(m["tokens"] for _, _, m in rows)
      s, l, m = rows[-1]
      tps = tokens_since / max(now - t_mark, 1e-9)
      writer.write_scalars(s, {"train/loss": m["loss"], "train/learning_rate": float(l),
                               "train/grad_norm": m["grad_norm"], "train/tokens_per_sec": tps})
      progress.update(s, loss=m["loss"], lr=float(l), tokens_per_sec=tps)
      t_mark, tokens_since = now, 0.0
      # Save before evaluating: an eval that fails or is killed must not cost
      # the steps trained since the last checkpoint.
      if boundary["ckpt"] or stop:
        # TensorBoard events are buffered: flush them with each checkpoint so a
        # kill -9 cannot lose the curve up to the step a resumed run restarts at.
        writer.flush()
        ckpt.save(step, state, ds.train.get_state(), wait=stop)
        last_saved = step
      # A stop request skips intermediate evals (a preemption's grace period is
      # short); the final one still runs, as a resume would not repeat it.
      if boundary["eval"] and (final or not stop):
        last_metrics = {"step": step, **run_eval(step, m["loss"])}
        progress.message(step, last_metrics)
      if stop:
        log.warning("%s: saved checkpoint at step %d in %s; re-run the same command to"
                    " resume.", preempt.reason, step, workdir / "checkpoints")
        break
    # The final checkpoint is saved before the final eval, so a run killed
    # between the two resumes at its last step: evaluate then (every host reads
    # the same shared metrics.jsonl, so all take this branch or none).
    if step == config.num_train_steps and not last_metrics and not any(
        r.get("step") == step and "eval/loss" in r for r in read_metrics(workdir)):
      last_metrics = {"step": step, **run_eval(step, None)}
      progress.message(step, last_metrics)
    writer.close()
    progress.close()
  if primary:
    made = [n for n in ("metrics.jsonl", "config.json", "checkpoints/", "plots/")
            if (workdir / n.rstrip("/")).exists()]
    print(f"outputs in {workdir}: {', '.join(made)}, TensorBoard events"
          f" (tensorboard --logdir {workdir})", flush=True)
  if not last_metrics:
    records = read_metrics(workdir)
    last_metrics = records[-1] if records else {}
  return last_metrics
