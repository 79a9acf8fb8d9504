"""Checkpoints (orbax) and the workdir's resolved config.

A checkpoint holds the train state (params, optimizer state, step, RNG) and
the training iterator's position, so a resumed run continues with exactly the
batches an uninterrupted run would see. ``config.json`` is written once; a
resume whose config changes a field that shapes the model or the data is
refused with the name of the field.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import orbax.checkpoint as ocp

from experiments.metric_writers import flatten

# Fields a resumed run may change: they alter neither shapes nor data order.
RESUMABLE_CHANGES = (
    "num_train_steps", "eval_every_steps", "checkpoint_every_steps", "log_every_steps",
    "learning_rate", "schedule", "warmup_steps", "end_learning_rate_factor",
    "max_checkpoints_to_keep", "num_eval_batches", "num_plot_examples", "decode",
    "eval_batch_size", "grad_clip_norm", "weight_decay", "label_smoothing",
)


class ResumeError(ValueError):
  """The workdir holds a run that this config cannot continue."""


def check_and_write_config(config_dict: dict, workdir: Path, step: int | None) -> None:
  """Writes ``config.json`` on a fresh run; on resume checks compatibility.

  A compatible resume with changed fields writes ``config.resume-<step>.json``
  beside it, so the history of a run is never overwritten.
  """
  path = workdir / "config.json"
  new_json = json.dumps(config_dict, indent=2, sort_keys=True, default=str)
  if not path.exists():
    _atomic_write(path, new_json)
    return
  old = flatten(json.loads(path.read_text()))
  new = flatten(json.loads(new_json))
  changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
  fatal = [k for k in changed if k.split(".")[0] not in RESUMABLE_CHANGES]
  if fatal:
    k = fatal[0]
    raise ResumeError(
        f"config/checkpoint mismatch in {workdir}: {k} was {old.get(k)!r}, now {new.get(k)!r}"
        f" (+{len(fatal) - 1} more); use a fresh --workdir or restore the old value.")
  if changed:
    _atomic_write(workdir / f"config.resume-{step or 0}.json", new_json)


def _atomic_write(path: Path, text: str) -> None:
  tmp = path.with_suffix(path.suffix + ".tmp")
  tmp.write_text(text)
  os.replace(tmp, path)


class Checkpointer:
  """Thin wrapper over ``orbax.checkpoint.CheckpointManager``.

  Saves are asynchronous (training continues while files are written) and
  atomic (orbax renames a finished temporary directory), so a ``kill -9`` at
  any moment leaves the previous checkpoint intact.
  """

  def __init__(self, directory: Path, max_to_keep: int):
    self.manager = ocp.CheckpointManager(
        Path(directory).absolute(),
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                             cleanup_tmp_directories=True),
        item_names=("state", "data"),
    )

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, data_state: dict, *, wait: bool = False) -> None:
    if step in self.manager.all_steps():
      return
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)))
    if wait:
      self.manager.wait_until_finished()

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
    try:
      out = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
    except (ValueError, KeyError) as e:
      raise ResumeError(
          f"checkpoint {step} does not match this model ({str(e).splitlines()[0][:160]});"
          " use a fresh --workdir.") from None
    return out["state"], out["data"]

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
