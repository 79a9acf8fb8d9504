"""RNN encoder-decoder without attention: Cho et al. (2014), "Learning Phrase
Representations using RNN Encoder-Decoder for Statistical Machine
Translation", the ``RNNencdec`` baseline of Bahdanau et al. (2015).

The encoder GRU reads the source; its state at each sentence's true last
token, ``h_N``, is summarised as ``c = tanh(V h_N)``. The decoder never sees
the source again except through ``c``::

    h'_0 = tanh(V' c)
    h'_t = GRU(h'_{t-1}, [E y_{t-1}; c])
    t~_t = O_h h'_t + O_y E y_{t-1} + O_c c,   t_t = maxout(t~_t)
    p(y_t | .) = softmax(G t_t)

Feeding ``c`` as part of the GRU input gives it its own weights in both gates
and the candidate, as in the paper; the one difference is that flax's
``GRUCell`` applies the reset gate after the recurrent matmul and does not
gate ``C c`` with it.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp
from flax.typing import Array, Dtype

from attention.models.recurrent import (
    make_cell,
    DeepOutput,
    RNNEncoder,
    cast_tree_like,
    StepDecoderModel,
    source_lengths,
    source_mask,
)

__all__ = ["RNNEncDec"]


class _RNNEncDecStep(nn.Module):
  """One decoder step of the Cho et al. encoder-decoder."""

  output_vocab_size: int
  hidden_dim: int
  num_layers: int
  maxout: bool
  maxout_dim: int
  dropout_rate: float
  dtype: Dtype | None
  param_dtype: Dtype

  def setup(self) -> None:
    self.cells = [
        make_cell("gru", self.hidden_dim, self.dtype, self.param_dtype)
        for _ in range(self.num_layers)
    ]
    self.dropout = nn.Dropout(self.dropout_rate)
    self.output = DeepOutput(
        self.output_vocab_size,
        self.maxout_dim,
        maxout=self.maxout,
        dropout_rate=self.dropout_rate,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
    )

  def __call__(self, state: dict[str, Any], y_emb: Array, memory: dict[str, Array], *,
               train: bool = False) -> tuple[dict[str, Any], tuple[Array, dict[str, Array]]]:
    """One step.

    Args:
      state: ``{'hidden': tuple of num_layers [N, H]}`` (bottom first).
      y_emb: ``[N, E]`` embedding of ``y_{t-1}``.
      memory: ``{'summary': [N, H], ...}``; only the summary ``c`` is read.
      train: Enables dropout.

    Returns:
      ``(new_state, (logits [N, V] float32, {}))``: no attention, so no
      alignments.
    """
    summary = memory["summary"]
    y_emb = self.dropout(y_emb, deterministic=not train)
    x = jnp.concatenate([y_emb, summary.astype(y_emb.dtype)], axis=-1)
    new_hidden = []
    for layer, cell in enumerate(self.cells):
      if layer > 0:
        x = self.dropout(x, deterministic=not train)
      h, x = cell(state["hidden"][layer], x)
      new_hidden.append(h)
    logits = self.output(x, y_emb, summary, train=train)
    return cast_tree_like({"hidden": tuple(new_hidden)}, state), (logits, {})


class RNNEncDec(StepDecoderModel):
  """Cho et al. (2014) GRU encoder-decoder with a fixed-length summary ``c``.

  With ``num_layers > 1`` encoder and decoder are stacked GRUs; ``c`` summarises
  the top encoder layer, is fed to the bottom decoder layer at every step and
  initialises every decoder layer through its own ``tanh(V'_l c)``.

  Attributes:
    vocab_size: Source vocabulary size.
    output_vocab_size: Target vocabulary size.
    emb_dim: Embedding width.
    hidden_dim: GRU units (encoder, decoder and summary ``c``).
    num_layers: Stacked GRU layers in encoder and decoder.
    dropout_rate: Dropout on embeddings, between layers and on the readout.
    maxout: Maxout deep output (paper) or a tanh readout of the same width.
    maxout_dim: Readout width; defaults to ``hidden_dim // 2``.
    dtype: Computation dtype (logits are float32).
    param_dtype: Parameter dtype.
  """

  vocab_size: int
  output_vocab_size: int
  emb_dim: int = 256
  hidden_dim: int = 512
  num_layers: int = 1
  dropout_rate: float = 0.0
  maxout: bool = True
  maxout_dim: int | None = None
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32

  decode_collections: tuple = ()

  def setup(self) -> None:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.src_embed = nn.Embed(self.vocab_size, self.emb_dim, **kw)
    self.tgt_embed = nn.Embed(self.output_vocab_size, self.emb_dim, **kw)
    self.dropout = nn.Dropout(self.dropout_rate)
    self.encoder = RNNEncoder(
        "gru", self.hidden_dim, num_layers=self.num_layers,
        dropout_rate=self.dropout_rate, **kw)
    self.summary_proj = nn.Dense(self.hidden_dim, **kw)
    self.init_proj = [nn.Dense(self.hidden_dim, **kw) for _ in range(self.num_layers)]
    self.decoder = _RNNEncDecStep(
        output_vocab_size=self.output_vocab_size,
        hidden_dim=self.hidden_dim,
        num_layers=self.num_layers,
        maxout=self.maxout,
        maxout_dim=self.maxout_dim or max(self.hidden_dim // 2, 1),
        dropout_rate=self.dropout_rate,
        **kw,
    )

  def encode(self, src: Array, *, train: bool = False) -> dict[str, Array]:
    """Encodes ``src`` ``[B, S]`` into ``{'summary' c [B, H], 'mask' [B, S] bool}``.

    ``c`` is computed from the encoder state at each sentence's true length, so
    it does not depend on how much padding follows.
    """
    x = self.dropout(self.src_embed(src), deterministic=not train)
    _, finals = self.encoder(x, source_lengths(src), train=train)
    summary = jnp.tanh(self.summary_proj(finals[-1]))
    return {"summary": summary, "mask": source_mask(src)}

  def init_decode_state(self, memory: dict[str, Array], max_len: int) -> dict[str, Any]:
    """``h'_0 = tanh(V'_l c)`` per decoder layer; ``max_len`` is unused (no cache)."""
    del max_len
    summary = memory["summary"]
    return {"hidden": tuple(
        jnp.tanh(proj(summary)).astype(jnp.float32) for proj in self.init_proj)}
