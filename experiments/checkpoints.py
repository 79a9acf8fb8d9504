"""Checkpoints (orbax) and the workdir's resolved config.

A checkpoint holds the train state (params, optimizer state, step, RNG) and
the training iterator's position, so a resumed run continues with exactly the
batches an uninterrupted run would see. ``config.json`` is written once; a
resume whose config changes a field that shapes the model or the data is
refused with the name of the field.

Nothing here deletes a user's file except orbax's own ``max_to_keep``
rotation: a checkpoint that cannot be read is moved to
``checkpoints_unreadable/`` when an older one restores, and a ``config.json``
that no checkpoint was saved under is kept as ``config.unused-<n>.json``.
A lock file (``.lock``, ``fcntl.flock``) stops two runs from sharing a workdir.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import orbax.checkpoint as ocp

from experiments.metric_writers import flatten, free_path

# Fields a resumed run may change: they alter neither shapes nor data order.
RESUMABLE_CHANGES = (
    "num_train_steps", "eval_every_steps", "checkpoint_every_steps", "log_every_steps",
    "learning_rate", "schedule", "warmup_steps", "end_learning_rate_factor",
    "max_checkpoints_to_keep", "num_eval_batches", "num_plot_examples", "decode",
    "eval_batch_size", "grad_clip_norm", "weight_decay", "label_smoothing",
    # Eval output only; runs from before the field existed lack it.
    "num_sample_tokens",
)

log = logging.getLogger("experiments")


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
  if step is None:
    # No checkpoint was saved under the old config (e.g. stopped before the
    # first save): this run starts afresh, so its config is the run's config.
    if path.read_text() != new_json:
      keep = free_path(workdir / "config.unused-{}.json")
      os.replace(path, keep)
      log.warning("%s had no checkpoint; its config is kept as %s", path, keep.name)
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


class WorkdirLock:
  """An exclusive ``flock`` on ``workdir/.lock`` for the duration of a run.

  The kernel drops the lock when the process dies, so a crashed run never
  leaves a stale lock behind.
  """

  def __init__(self, workdir: Path):
    self.path = Path(workdir) / ".lock"
    self._file = None

  def __enter__(self) -> "WorkdirLock":
    f = open(self.path, "a+")
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      if e.errno not in (errno.EAGAIN, errno.EACCES):
        # A filesystem without locks (some network mounts): run unlocked.
        log.warning("cannot lock %s (%s); nothing stops a second run on this workdir",
                    self.path, e.strerror)
        f.close()
        return self
      f.seek(0)
      holder = f.read().strip() or "another process"
      f.close()
      raise ResumeError(f"workdir {self.path.parent} is in use by {holder}; wait for that run"
                        " to finish or pass another --workdir.") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {os.uname().nodename}")
    f.flush()
    self._file = f
    return self

  def __exit__(self, *exc) -> None:
    if self._file is not None:
      self._file.close()  # closing releases the flock
      self._file = None


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
    self.directory = Path(directory).absolute()
    self._aside_dir = self.directory.parent / "checkpoints_unreadable"
    self.manager = ocp.CheckpointManager(
        self.directory,
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
    """The train state and iterator state saved at ``step``."""
    out = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
    return out["state"], out["data"]

  def restore_latest(self, abstract_state: Any, fallback: bool = True
                     ) -> tuple[int, Any, dict] | None:
    """``(step, state, data_state)`` of the newest checkpoint that restores, or None.

    A newer checkpoint that fails to restore (truncated or damaged files) is
    moved to ``checkpoints_unreadable/<step>`` once an older one has restored,
    so that the run's next save at that step is not skipped; nothing is
    deleted. If none restores, raises :class:`ResumeError` and moves nothing.
    Without ``fallback`` (several processes, which would race to move it and
    then disagree on which steps exist) the first failure is that error.
    """
    steps = sorted(self.manager.all_steps(), reverse=True)
    failed: list[tuple[int, str]] = []
    for step in steps:
      try:
        state, data = self.restore(step, abstract_state)
      except Exception as e:  # orbax/tensorstore raise many types for bad files
        # The failed read's other shards end as asyncio tasks whose exceptions
        # nobody retrieves; asyncio would log a traceback for each of them.
        logging.getLogger("asyncio").setLevel(logging.CRITICAL)
        failed.append((step, _one_line(e)))
        if not fallback:
          raise ResumeError(
              f"checkpoint {step} in {self.directory} could not be restored ({failed[-1][1]});"
              f" move {self.directory / str(step)} aside to resume from the one before it,"
              " or use a fresh --workdir.") from None
        log.warning("checkpoint %d in %s could not be restored: %s", step, self.directory,
                    failed[-1][1])
        continue
      if failed:
        self._set_aside([s for s, _ in failed])
        log.warning("resuming from the older checkpoint %d; unreadable checkpoints %s were"
                    " moved to %s", step, [s for s, _ in failed], self._aside_dir)
      return step, state, data
    if not failed:
      return None
    step, why = failed[0]
    raise ResumeError(
        f"no checkpoint in {self.directory} restores (step {step}: {why}). They do not match"
        " this model's config or are damaged; nothing was deleted. Restore the config the"
        " run started with, or use a fresh --workdir.")

  def _set_aside(self, steps: list[int]) -> None:
    self.manager.wait_until_finished()
    for step in steps:
      src = self.directory / str(step)
      if src.exists():
        self._aside_dir.mkdir(parents=True, exist_ok=True)
        shutil.move(str(src), str(free_path(self._aside_dir / f"{step}-{{}}")))
    self.manager.reload()

  def close(self) -> None:
    """Waits for any save in flight, then releases orbax's threads."""
    self.manager.wait_until_finished()
    self.manager.close()

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def _one_line(e: BaseException) -> str:
  """``Type: first line`` of an exception, at most 200 characters."""
  text = str(e).strip().splitlines()
  return f"{type(e).__name__}: {text[0] if text else ''}"[:200]
