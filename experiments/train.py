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

import json
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
from experiments import evaluate, optim
from experiments.checkpoints import Checkpointer, check_and_write_config
from experiments.data import create_datasets
from experiments.metric_writers import MetricWriter
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


def make_train_step(model, tx, task: str, config):
  accum, smoothing = int(config.grad_accum_steps), float(config.label_smoothing)

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
      micro = jax.tree.map(lambda x: x.reshape((accum, -1) + x.shape[1:]), batch)

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
  """Turns SIGTERM into a checkpoint-and-exit at the next step boundary.

  Single process: a SIGTERM handler sets a flag. Multi-process: every host
  must save together, so JAX's own preemption sync point (the coordination
  service notices SIGTERM on any host) decides, identically everywhere.
  """

  def __init__(self):
    self._flag = False
    self._old = None
    self._multi = jax.process_count() > 1

  def __enter__(self):
    if not self._multi:
      try:
        self._old = signal.signal(signal.SIGTERM, self._handle)
      except ValueError:  # not the main thread: no handler, periodic saves still apply
        self._old = None
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self._flag = True

  def requested(self, step: int) -> bool:
    if self._multi:
      from jax.experimental import multihost_utils
      return multihost_utils.reached_preemption_sync_point(step)
    return self._flag

  def __exit__(self, *exc):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)


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
  workdir = Path(workdir)
  _check_workdir(workdir)
  task = model_task(config.model.name)
  mesh = make_mesh(config.model_parallelism)
  _validate(config, mesh)
  primary = jax.process_index() == 0
  replicated = NamedSharding(mesh, P())
  data_sharding = NamedSharding(mesh, P("data"))

  ds = create_datasets(config.data, seed=config.seed, batch_size=config.batch_size,
                       eval_batch_size=config.eval_batch_size, workdir=str(workdir),
                       process_index=jax.process_index(), process_count=jax.process_count())
  if ds.task != task:
    raise ConfigError(f"model.name={config.model.name!r} is a {task} model but data.name="
                      f"{config.data.name!r} is a {ds.task} task; pick a matching pair.")
  max_len = int(max(ds.stats.get("eval_max_len", 0) or 0, config.data.get("max_len") or 0,
                    config.data.get("seq_len") or 0)) + config.decode.max_extra + 18
  # (+18: decoding pads sources up to a multiple of 16, plus BOS/EOS)
  model = create_model(config.model, src_vocab_size=ds.src_vocab.size,
                       tgt_vocab_size=ds.tgt_vocab.size, max_len=max_len)
  tx = optim.make_optimizer(config)
  lr_fn = optim.learning_rate_fn(config)

  def init_state(rng):
    params_rng, state_rng = jax.random.split(rng)
    dummy = (jnp.ones((1, 8), jnp.int32),) * (2 if task == "seq2seq" else 1)
    params = model.init({"params": params_rng}, *dummy, train=False)["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      rng=jax.random.key_data(state_rng))

  abstract = jax.eval_shape(init_state, jax.random.key(config.seed))
  state_sharding = jax.tree.map(lambda _: replicated, abstract)
  ckpt = Checkpointer(workdir / "checkpoints", config.max_checkpoints_to_keep)
  latest = ckpt.latest_step()
  try:
    if primary:
      check_and_write_config(config.to_dict(), workdir, latest)
    if latest is not None:
      abstract_sharded = jax.tree.map(
          lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract,
          state_sharding)
      state, data_state = ckpt.restore(latest, abstract_sharded)
      ds.train.set_state(data_state)
      log.info("resumed from %s at step %d", workdir / "checkpoints", latest)
    else:
      state = jax.jit(init_state, out_shardings=state_sharding)(jax.random.key(config.seed))
  except BaseException:
    ckpt.close()  # let orbax's background threads finish before the error surfaces
    raise
  num_params = sum(x.size for x in jax.tree.leaves(abstract.params))
  start = int(_host(state.step))

  train_step = jax.jit(make_train_step(model, tx, task, config), donate_argnums=(0,),
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

  def run_eval(step: int, train_loss: float) -> dict:
    from experiments import eval_loop  # local: plots pull in matplotlib
    metrics = eval_loop.evaluate_all(config, model, state.params, ds, eval_step, data_sharding,
                                     workdir, step, writer, task, _host,
                                     final=step == config.num_train_steps)
    # Reports (launch.report, experiments.compare) read only metrics.jsonl.
    metrics.update({"train/loss": train_loss, "model/num_params": float(num_params)})
    writer.write_eval(step, metrics)
    return metrics

  last_metrics: dict = {}
  progress = Progress(start, config.num_train_steps, enabled=primary)
  pending: list = []
  last_saved = latest
  step = start
  t_mark, tokens_since = time.perf_counter(), 0.0
  with _Preemption() as preempt:
    while step < config.num_train_steps:
      batch = next(ds.train)
      lr = np.float32(lr_fn(step))
      state, metrics = train_step(state, _to_global(batch, data_sharding), lr)
      step += 1
      pending.append((step, lr, metrics))
      stop = preempt.requested(step)
      boundary = {
          "log": step % config.log_every_steps == 0 or step == config.num_train_steps,
          "eval": step % config.eval_every_steps == 0 or step == config.num_train_steps,
          "ckpt": step % config.checkpoint_every_steps == 0 or step == config.num_train_steps,
      }
      if any(boundary.values()) or stop:
        # One host sync per boundary; the loss is checked before any save so
        # a diverged state never becomes the latest checkpoint.
        rows = [(s, l, {k: float(v) for k, v in _host(m).items()}) for s, l, m in pending]
        pending = []
        bad = [s for s, _, m in rows if not math.isfinite(m["loss"])]
        if bad:
          ckpt.close()
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
        if boundary["eval"]:
          last_metrics = {"step": step, **run_eval(step, m["loss"])}
          progress.message(step, last_metrics)
        if boundary["ckpt"] or stop:
          # TensorBoard events are buffered: flush them with each checkpoint so a
          # kill -9 cannot lose the curve up to the step a resumed run restarts at.
          writer.flush()
          ckpt.save(step, state, ds.train.get_state(), wait=stop)
          last_saved = step
        if stop:
          log.warning("SIGTERM: saved checkpoint at step %d in %s; exiting.", step,
                      workdir / "checkpoints")
          break
  ckpt.close()
  writer.close()
  progress.close()
  if primary:
    print(f"outputs in {workdir}: metrics.jsonl, config.json, checkpoints/, plots/,"
          f" TensorBoard events (tensorboard --logdir {workdir})", flush=True)
  if not last_metrics and (workdir / "metrics.jsonl").exists():
    lines = (workdir / "metrics.jsonl").read_text().strip().splitlines()
    last_metrics = json.loads(lines[-1]) if lines else {}
  return last_metrics
