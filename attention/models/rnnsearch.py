"""RNNsearch: Bahdanau, Cho & Bengio (2015), "Neural Machine Translation by
Jointly Learning to Align and Translate".

Encoder: a bidirectional GRU; annotation ``h_j = [h_j^fwd; h_j^bwd]``. The
backward GRU starts at each sentence's true end (``seq_lengths``), so padding
never leaks into an annotation.

Decoder, step ``i`` (``s_{i-1}`` is the previous decoder state)::

    c_i  = sum_j alpha_ij h_j,  alpha_i = softmax_j(v^T tanh(W s_{i-1} + U h_j))
    s_i  = GRU(s_{i-1}, [E y_{i-1}; c_i])
    t~_i = U_o s_{i-1} + V_o E y_{i-1} + C_o c_i,  t_i = maxout(t~_i)
    p(y_i | .) = softmax(W_o t_i)

with ``s_0 = tanh(W_s h_1^bwd)``. The readout uses ``s_{i-1}`` exactly as in
the paper's appendix A.2.2; the new ``s_i`` feeds the next step. ``U h_j``
does not depend on ``i`` and is computed once per sentence in ``encode``.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp
from flax.typing import Array, Dtype

from attention.additive import AdditiveAttention
from attention.models.recurrent import (
    make_cell,
    DeepOutput,
    RNNEncoder,
    cast_tree_like,
    StepDecoderModel,
    source_lengths,
    source_mask,
)

__all__ = ["RNNSearch"]


class _RNNSearchStep(nn.Module):
  """One RNNsearch decoder step; see the module docstring for the equations."""

  output_vocab_size: int
  hidden_dim: int
  num_layers: int
  attention_dim: int
  maxout: bool
  maxout_dim: int
  dropout_rate: float
  dtype: Dtype | None
  param_dtype: Dtype

  def setup(self) -> None:
    # setup() so that encode() can reach the attention's key projection
    # through prepare_memory() while __call__ shares the same submodules.
    self.attention = AdditiveAttention(
        self.attention_dim, dtype=self.dtype, param_dtype=self.param_dtype)
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

  def prepare_memory(self, annotations: Array) -> Array:
    """``[B, S, 2H]`` annotations -> ``[B, S, attention_dim]`` projected keys ``U h_j``."""
    return self.attention.project_keys(annotations)

  def __call__(self, state: dict[str, Any], y_emb: Array, memory: dict[str, Array], *,
               train: bool = False) -> tuple[dict[str, Any], tuple[Array, dict[str, Array]]]:
    """One step.

    Args:
      state: ``{'hidden': tuple of num_layers [N, H]}`` (bottom first).
      y_emb: ``[N, E]`` embedding of ``y_{i-1}``.
      memory: ``{'annotations' [N, S, 2H], 'projected_keys' [N, S, A],
        'mask' [N, S]}``.
      train: Enables dropout.

    Returns:
      ``(new_state, (logits [N, V] float32, {'cross': [N, S]}))``.
    """
    hidden = state["hidden"]
    s_prev = hidden[-1]
    context, weights = self.attention(
        s_prev,
        memory["annotations"],
        mask=memory["mask"],
        projected_keys=memory["projected_keys"],
    )
    y_emb = self.dropout(y_emb, deterministic=not train)
    x = jnp.concatenate([y_emb, context.astype(y_emb.dtype)], axis=-1)
    new_hidden = []
    for layer, cell in enumerate(self.cells):
      if layer > 0:
        x = self.dropout(x, deterministic=not train)
      h, x = cell(hidden[layer], x)
      new_hidden.append(h)
    logits = self.output(s_prev, y_emb, context, train=train)
    new_state = cast_tree_like({"hidden": tuple(new_hidden)}, state)
    return new_state, (logits, {"cross": weights})


class RNNSearch(StepDecoderModel):
  """Bahdanau et al. (2015) attentional encoder-decoder.

  ``num_layers`` stacks both the bidirectional encoder and the decoder GRU
  (the paper uses 1); attention reads the top decoder layer and the top
  encoder layer, and each decoder layer gets its own ``s_0`` projection.

  Attributes:
    vocab_size: Source vocabulary size.
    output_vocab_size: Target vocabulary size.
    emb_dim: Embedding width (paper: 620).
    hidden_dim: GRU units per direction and in the decoder (paper: 1000).
    num_layers: Stacked GRU layers in encoder and decoder.
    dropout_rate: Dropout on embeddings, between layers and on the readout.
    attention_dim: Alignment-MLP width; defaults to ``hidden_dim``.
    maxout: Maxout deep output (paper) or a tanh readout of the same width.
    maxout_dim: Readout width ``l`` (paper: 500); defaults to ``hidden_dim // 2``.
    dtype: Computation dtype (logits and attention weights are float32).
    param_dtype: Parameter dtype.
  """

  vocab_size: int
  output_vocab_size: int
  emb_dim: int = 256
  hidden_dim: int = 512
  num_layers: int = 1
  dropout_rate: float = 0.0
  attention_dim: int | None = None
  maxout: bool = True
  maxout_dim: int | None = None
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32

  decode_collections: tuple = ()

  def setup(self) -> None:
    embed = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.src_embed = nn.Embed(self.vocab_size, self.emb_dim, **embed)
    self.tgt_embed = nn.Embed(self.output_vocab_size, self.emb_dim, **embed)
    self.dropout = nn.Dropout(self.dropout_rate)
    self.encoder = RNNEncoder(
        "gru",
        self.hidden_dim,
        num_layers=self.num_layers,
        bidirectional=True,
        dropout_rate=self.dropout_rate,
        **embed,
    )
    self.init_proj = [nn.Dense(self.hidden_dim, **embed) for _ in range(self.num_layers)]
    self.decoder = _RNNSearchStep(
        output_vocab_size=self.output_vocab_size,
        hidden_dim=self.hidden_dim,
        num_layers=self.num_layers,
        attention_dim=self.attention_dim or self.hidden_dim,
        maxout=self.maxout,
        maxout_dim=self.maxout_dim or max(self.hidden_dim // 2, 1),
        dropout_rate=self.dropout_rate,
        **embed,
    )

  def encode(self, src: Array, *, train: bool = False) -> dict[str, Array]:
    """Encodes ``src`` ``[B, S]`` into ``{'annotations' [B, S, 2H],
    'projected_keys' [B, S, A], 'mask' [B, S] bool}``."""
    x = self.dropout(self.src_embed(src), deterministic=not train)
    annotations, _ = self.encoder(x, source_lengths(src), train=train)
    return {
        "annotations": annotations,
        "projected_keys": self.decoder.prepare_memory(annotations),
        "mask": source_mask(src),
    }

  def init_decode_state(self, memory: dict[str, Array], max_len: int) -> dict[str, Any]:
    """``s_0 = tanh(W_s h_1^bwd)`` per decoder layer; ``max_len`` is unused (no cache)."""
    del max_len
    # The backward half of the first annotation is the backward GRU's final
    # state, i.e. the paper's h_1^bwd.
    backward_first = memory["annotations"][:, 0, self.hidden_dim:]
    hidden = tuple(
        jnp.tanh(proj(backward_first)).astype(jnp.float32) for proj in self.init_proj)
    return {"hidden": hidden}
