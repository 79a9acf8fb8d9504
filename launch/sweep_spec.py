"""Sweeps declared inside config files, big_vision style.

A config file may define ``get_sweep(add)`` next to ``get_config(arg)``::

    from launch.sweep_spec import product

    def get_sweep(add):
      for o in product(learning_rate=[1e-3, 3e-3], **{"model.num_heads": [4, 8]}):
        add(**o)

Each ``add(**overrides)`` is one trial; keys are dotted config paths. A
``get_sweep()`` without parameters may instead return or yield the dicts.

The reserved key ``config_arg`` replaces the file's ``:arg`` for that trial, so
one sweep can span what only ``get_config(arg)`` can change (the model family)::

    def get_sweep(add):
      for family in ("rnnsearch", "transformer"):
        add(config_arg=f"family={family}")
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import inspect
import itertools
import os
import re
import sys
from typing import Any, Iterator, Sequence

from launch.runner import format_command

# Long names are cut and completed by a hash, so they stay unique and stay
# usable as a directory name on every filesystem (255 bytes) and in gs:// paths.
MAX_NAME_LEN = 96
_UNSAFE = re.compile(r"[^A-Za-z0-9._=,+-]")
CONFIG_ARG = "config_arg"   # reserved sweep key: the trial's get_config(arg)


class SweepError(ValueError):
  """A sweep that cannot be expanded (missing file, no get_sweep, bad keys)."""


def product(**axes: Sequence[Any]) -> Iterator[dict[str, Any]]:
  """Cartesian product of the axes, the last axis varying fastest.

  Args:
    **axes: config path -> values. Use ``**{"model.num_heads": [...]}`` for dotted paths.

  Yields:
    One override dict per combination, keys in the order given.
  """
  keys = list(axes)
  for values in itertools.product(*(list(axes[k]) for k in keys)):
    yield dict(zip(keys, values))


def zip_(**axes: Sequence[Any]) -> Iterator[dict[str, Any]]:
  """Axes that move together: the i-th override dict takes every axis' i-th value.

  Raises:
    SweepError: if the axes have different lengths (a silent truncation would
      drop trials).
  """
  lengths = {k: len(list(v)) for k, v in axes.items()}
  if len(set(lengths.values())) > 1:
    raise SweepError(f"zip_ axes need equal lengths, got {lengths}.")
  keys = list(axes)
  for values in zip(*(list(axes[k]) for k in keys)):
    yield dict(zip(keys, values))


def format_value(value: Any) -> str:
  """How a value is written in ``--config.key=value`` (ml_collections parses it back)."""
  if isinstance(value, float):
    return repr(value)   # shortest round-trip form: 0.001, 1e-05
  if isinstance(value, (list, tuple)):
    return repr(tuple(value))
  return str(value)


def trial_name(overrides: dict[str, Any]) -> str:
  """Deterministic, filesystem-safe name of a trial, e.g. ``learning_rate=0.001,model.num_heads=4``.

  Keys are sorted, so the same overrides always give the same name (and the same
  workdir, which is what lets a re-run resume instead of starting over). A name
  that had to be sanitised or shortened gets a hash of the exact overrides, so two
  trials never collide.
  """
  if not overrides:
    return "base"
  items = [format_value(overrides[CONFIG_ARG])] if CONFIG_ARG in overrides else []
  items += [f"{k}={format_value(overrides[k])}" for k in sorted(overrides) if k != CONFIG_ARG]
  raw = ",".join(items)
  safe = _UNSAFE.sub("_", raw)
  if safe == raw and len(raw) <= MAX_NAME_LEN and not raw.startswith("."):
    return raw
  digest = hashlib.sha1(raw.encode()).hexdigest()[:10]
  return f"{safe.lstrip('.')[:MAX_NAME_LEN - 11]}-{digest}"


def override_flags(overrides: dict[str, Any]) -> list[str]:
  """``{"model.score": "dot"}`` -> ``["--config.model.score=dot"]`` in the sweep's key order."""
  return [f"--config.{k}={format_value(v)}" for k, v in overrides.items() if k != CONFIG_ARG]


def split_config_arg(config: str) -> tuple[str, str | None]:
  """``"path/x.py:size=tiny"`` -> ``("path/x.py", "size=tiny")``."""
  if ".py:" in config:
    path, arg = config.split(".py:", 1)
    return path + ".py", arg
  return config, None


def _import_config(path: str):
  if not os.path.isfile(path):
    raise SweepError(f"--config {path}: no such file.")
  # A unique module name per path: two configs with the same basename must not
  # shadow each other in sys.modules.
  name = "_sweep_config_" + hashlib.sha1(os.path.abspath(path).encode()).hexdigest()[:12]
  spec = importlib.util.spec_from_file_location(name, path)
  assert spec is not None and spec.loader is not None
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module
  spec.loader.exec_module(module)
  return module


def load_sweep(config: str, extra: Sequence[str] = ()) -> list[dict[str, Any]]:
  """Imports the config file and collects its trials.

  Args:
    config: ``path/to/config.py`` with an optional ``:arg``; ``get_sweep`` receives
      the arg when it has a parameter named ``arg``.
    extra: ``--config.key=value`` overrides for every trial; their keys are
      checked like the swept ones, so a typo fails before any trial starts.

  Returns:
    The override dicts, in the order the config produced them.

  Raises:
    SweepError: no ``get_sweep``, no trials, duplicate trials, or a key that is
      not a field of ``get_config(arg)``.
  """
  path, arg = split_config_arg(config)
  module = _import_config(path)
  fn = getattr(module, "get_sweep", None)
  if fn is None:
    raise SweepError(f"{path} has no get_sweep(add); define one to sweep it.")
  params = inspect.signature(fn).parameters
  kwargs = {"arg": arg} if "arg" in params else {}
  trials: list[dict[str, Any]] = []
  add = lambda **overrides: trials.append(dict(overrides))  # noqa: E731
  if len(params) - len(kwargs) >= 1:
    returned = fn(add, **kwargs)
  else:
    returned = fn(**kwargs)
  if returned is not None:
    trials.extend(dict(t) for t in returned)
  if not trials:
    raise SweepError(f"{path}: get_sweep produced no trials.")
  seen: dict[str, dict] = {}
  for t in trials:
    name = trial_name(t)
    if name in seen:
      raise SweepError(f"{path}: trial {name!r} appears twice in the sweep.")
    seen[name] = t
  if hasattr(module, "get_config"):
    configs: dict[Any, Any] = {}
    for t in trials:
      trial_arg = t.get(CONFIG_ARG, arg)
      if trial_arg not in configs:
        try:
          configs[trial_arg] = module.get_config(trial_arg)
        except ValueError as e:
          raise SweepError(f"{path}: get_config({trial_arg!r}) failed: {e}") from None
      _check_keys(configs[trial_arg], [t], path)
      extra_keys = {e.split("=", 1)[0][len("--config."):]: None for e in extra
                    if e.startswith("--config.")}
      _check_keys(configs[trial_arg], [extra_keys], path, what="--extra override")
  return trials


def _check_keys(cfg, trials: list[dict[str, Any]], path: str,
                what: str = "swept field") -> None:
  """Fails before anything is launched when a swept (or overridden) field does not exist."""
  for t in trials:
    for key in t:
      if key == CONFIG_ARG:
        continue
      node = cfg
      for part in key.split("."):
        try:
          node = node[part]
        except (KeyError, TypeError, AttributeError):
          raise SweepError(f"{path}: {what} {key!r} is not in the config.") from None


@dataclasses.dataclass
class Trial:
  """One point of a sweep and the command that trains it."""
  name: str
  overrides: dict[str, Any]
  workdir: str
  argv: list[str]

  @property
  def command(self) -> str:
    return format_command(self.argv)


def join_workdir(root: str, name: str) -> str:
  """``root/name`` that also works for ``gs://`` roots (no os.path normalisation)."""
  return root.rstrip("/") + "/" + name if "://" in root else os.path.join(root, name)


def make_trials(config: str, trials: list[dict[str, Any]], workdir: str, extra: Sequence[str],
                python: str = sys.executable) -> list[Trial]:
  """Attaches a workdir and an ``experiments.run`` command to every override set.

  ``extra`` overrides are appended to every trial; one that sets a swept field is
  refused, since it would silently make the swept values identical.
  """
  extra = list(extra)
  extra_keys = {e.split("=", 1)[0][len("--config."):] for e in extra if e.startswith("--config.")}
  out = []
  for overrides in trials:
    clash = sorted(extra_keys & set(overrides))
    if clash:
      raise SweepError(f"extra override(s) {clash} would replace swept values; drop them.")
    name = trial_name(overrides)
    wd = join_workdir(workdir, name)
    trial_config = (split_config_arg(config)[0] + ":" + str(overrides[CONFIG_ARG])
                    if CONFIG_ARG in overrides else config)
    argv = [python, "-m", "experiments.run", "--config", trial_config, "--workdir", wd,
            *override_flags(overrides), *extra]
    out.append(Trial(name, overrides, wd, argv))
  return out
