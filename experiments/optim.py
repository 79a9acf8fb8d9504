"""Optimizer and learning-rate schedules, from the config.

The learning rate is an ``optax.inject_hyperparams`` hyperparameter that the
trainer feeds into the jitted step as an array, so a schedule (or a changed
``learning_rate`` on resume) never triggers a recompile.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import optax

from experiments.models import ConfigError

SCHEDULES = ("rsqrt", "linear", "cosine", "constant")


def learning_rate_fn(config: Any) -> Callable[[int], float]:
  """Host-side schedule ``step -> learning rate`` (a plain Python float).

  * ``rsqrt``: the Transformer's "Noam" schedule, linear warm-up then
    ``lr * sqrt(warmup / step)``; peak ``learning_rate`` at the 0-based steps
    ``warmup_steps - 1`` (the warm-up's last, ``(step + 1) / warmup``) and
    ``warmup_steps`` (the decay's first).
  * ``linear`` / ``cosine``: linear warm-up to ``learning_rate`` then linear
    or cosine decay to ``end_learning_rate_factor * learning_rate`` at
    ``num_train_steps``.
  * ``constant``: linear warm-up, then constant.
  """
  name, peak = config.schedule, float(config.learning_rate)
  warmup, total = int(config.warmup_steps), int(config.num_train_steps)
  end = peak * float(config.get("end_learning_rate_factor", 0.0))
  if name not in SCHEDULES:
    raise ConfigError(f"schedule={name!r} is unknown; use one of {SCHEDULES}.")

  def fn(step: int) -> float:
    step = int(step)
    if warmup and step < warmup:
      return peak * (step + 1) / warmup
    if name == "constant":
      return peak
    if name == "rsqrt":
      return peak * float(np.sqrt(max(warmup, 1) / max(step, 1)))
    frac = min(max(step - warmup, 0) / max(total - warmup, 1), 1.0)
    if name == "linear":
      return peak + (end - peak) * frac
    return end + 0.5 * (peak - end) * (1 + float(np.cos(np.pi * frac)))

  return fn


def make_optimizer(config: Any) -> optax.GradientTransformation:
  """AdamW (or Adam when ``weight_decay == 0``) with global-norm clipping.

  The learning rate is injected (``opt_state.hyperparams['learning_rate']``).
  """

  # Always the same chain, so the optimizer state has one structure and a
  # resumed run may change grad_clip_norm (0 = an infinite norm: no clipping).
  clip = float(config.grad_clip_norm) or float("inf")

  def build(learning_rate):
    return optax.chain(
        optax.clip_by_global_norm(clip),
        optax.adamw(learning_rate, b1=config.adam_b1, b2=config.adam_b2,
                    eps=config.adam_eps, weight_decay=config.weight_decay))

  return optax.inject_hyperparams(build)(learning_rate=float(config.learning_rate))
