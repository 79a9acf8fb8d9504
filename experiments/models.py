"""Builds the model named by ``config.model.name`` from :mod:`attention.models`."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from attention import models as M

SEQ2SEQ = ("transformer", "rnnsearch", "rnnencdec", "luong", "lstmn")
LM = ("transformer_lm", "lstmn_lm", "lstm_lm")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class ConfigError(ValueError):
  """A config value that cannot work; the message names the field and the fix."""


def _fields(cls) -> set[str]:
  return {f.name for f in dataclasses.fields(cls)}


def model_task(name: str) -> str:
  if name in SEQ2SEQ:
    return "seq2seq"
  if name in LM:
    return "lm"
  raise ConfigError(f"model.name={name!r} is unknown; use one of {SEQ2SEQ + LM}.")


def create_model(model_config: Any, *, src_vocab_size: int, tgt_vocab_size: int,
                 max_len: int):
  """Returns the Linen module for ``model_config`` (a ConfigDict with ``name``).

  Fields the model class does not have are ignored, so one config schema can
  serve several architectures; ``dtype`` is given as a string.
  """
  cfg = dict(model_config.to_dict() if hasattr(model_config, "to_dict") else model_config)
  name = cfg.pop("name")
  model_task(name)
  dtype = cfg.pop("dtype", "float32")
  if dtype not in DTYPES:
    raise ConfigError(f"model.dtype={dtype!r} is unknown; use one of {tuple(DTYPES)}.")
  cfg["dtype"] = DTYPES[dtype]
  if name in ("transformer", "transformer_lm"):
    heads, qkv = cfg.get("num_heads", 8), cfg.get("qkv_dim", 512)
    if qkv % heads:
      raise ConfigError(
          f"model.num_heads={heads} does not divide model.qkv_dim={qkv}; pick num_heads"
          f" from {[h for h in range(1, qkv + 1) if qkv % h == 0][:12]}.")
    if cfg.get("share_embeddings") and src_vocab_size != tgt_vocab_size:
      raise ConfigError("model.share_embeddings=True needs one vocabulary: set"
                        " --config.data.shared_vocab=True.")
    keep = {k: v for k, v in cfg.items() if k in _fields(M.TransformerConfig)}
    keep.update(vocab_size=src_vocab_size, output_vocab_size=tgt_vocab_size,
                max_len=max(int(keep.get("max_len") or 0), max_len))
    tc = M.TransformerConfig(**keep)
    return M.Transformer(tc) if name == "transformer" else M.TransformerLM(tc)
  cls = {"rnnsearch": M.RNNSearch, "rnnencdec": M.RNNEncDec, "luong": M.LuongSeq2Seq,
         "lstmn": M.LSTMNSeq2Seq, "lstmn_lm": M.LSTMNLanguageModel,
         "lstm_lm": getattr(M, "LSTMLanguageModel", None)}[name]
  if cls is None:
    raise ConfigError(f"model.name={name!r} is not available in this version.")
  keep = {k: v for k, v in cfg.items() if k in _fields(cls)}
  keep["vocab_size"] = src_vocab_size
  if "output_vocab_size" in _fields(cls):
    keep["output_vocab_size"] = tgt_vocab_size
  if "max_len" in _fields(cls):
    keep["max_len"] = max(int(keep.get("max_len") or 0), max_len)
  return cls(**keep)
