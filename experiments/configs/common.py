"""Helpers shared by the experiment configs (big_vision-style ``file.py:arg`` parsing)."""

from __future__ import annotations

from ml_collections import config_dict

from experiments.configs.default import base_config, transformer_model  # noqa: F401
from experiments.data import default_config as data_defaults


_TRUE, _FALSE = ("1", "true", "yes"), ("0", "false", "no")


def parse_arg(arg: str | None, **defaults) -> config_dict.ConfigDict:
  """``"size=tiny,data=reverse,flag"`` -> ConfigDict over ``defaults``.

  A bare word sets a boolean ``True``; values keep the type of the default.
  """
  out = dict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, _, value = item.partition("=")
    if key not in defaults:
      raise ValueError(f"config arg {key!r} is unknown; use {sorted(defaults)}.")
    default = defaults[key]
    if not value:
      out[key] = True
    elif isinstance(default, bool):
      if value.lower() not in _TRUE + _FALSE:
        raise ValueError(f"config arg {key}={value!r} is not a boolean; use {key}=true or"
                         f" {key}=false.")
      out[key] = value.lower() in _TRUE
    elif isinstance(default, (int, float)):
      try:
        out[key] = type(default)(value)
      except ValueError:
        raise ValueError(f"config arg {key}={value!r} is not a {type(default).__name__}.")
    else:
      out[key] = value
  return config_dict.ConfigDict(out)


def translation_data(arg) -> config_dict.ConfigDict:
  """Multi30k de->en (``data.dir`` must point at it), or a synthetic task for smoke runs."""
  if arg.data == "multi30k":
    d = data_defaults("multi30k")
    d.source_lang, d.target_lang = "de", "en"
    d.tokenizer = "sentencepiece"
    d.vocab_size = 8000
    d.shared_vocab = True
    return d
  d = data_defaults(arg.data)
  d.max_len = 12
  return d


def tiny_run(c: config_dict.ConfigDict) -> None:
  """Shrinks a config to a seconds-long CPU smoke run (used by the tests)."""
  c.num_train_steps = 10
  c.batch_size = 16
  c.eval_batch_size = 16
  c.warmup_steps = 5
  c.eval_every_steps = 10
  c.checkpoint_every_steps = 5
  c.log_every_steps = 5
  c.num_eval_batches = 2
  c.decode.num_batches = 1
  c.num_plot_examples = 1
  c.num_sample_tokens = 16
  if "num_eval" in c.data:
    c.data.num_eval = 32
