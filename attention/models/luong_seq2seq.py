"""Luong, Pham & Manning (2015), "Effective Approaches to Attention-based
Neural Machine Translation": stacked-LSTM encoder-decoder with global or local
attention and input feeding.

Decoder, step ``t`` (``h_t`` is the top LSTM layer's output)::

    x_t  = [E y_{t-1}; h~_{t-1}]          (input feeding; E y_{t-1} without it)
    h_t  = StackedLSTM(x_t)
    c_t, a_t = LuongAttention(h_t, encoder top-layer states)
    h~_t = tanh(W_c [c_t; h_t])
    p(y_t | .) = softmax(W_s h~_t)

The decoder LSTMs start from the encoder's final ``(c, h)`` of the same layer,
taken at each sentence's true length. ``h~_0 = 0``. The source is read in its
natural order (attention makes the paper's reversal trick unnecessary, and
``local-m``'s ``p_t = t`` assumes a monotonic, unreversed alignment).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp
from flax.typing import Array, Dtype

from attention.luong import LuongAttention
from attention.models.recurrent import (
    RNNEncoder,
    cast_tree_like,
    make_cell,
    StepDecoderModel,
    source_lengths,
    source_mask,
)
from attention.projection import projection_dot_general

__all__ = ["LuongSeq2Seq"]


class _LuongStep(nn.Module):
  """One Luong decoder step; see the module docstring for the equations."""

  output_vocab_size: int
  hidden_dim: int
  num_layers: int
  score: str
  mode: str
  window: int
  attention_dim: int | None
  input_feeding: bool
  dropout_rate: float
  dtype: Dtype | None
  param_dtype: Dtype

  def setup(self) -> None:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.cells = [make_cell("lstm", self.hidden_dim, **kw) for _ in range(self.num_layers)]
    self.attention = LuongAttention(
        score=self.score, mode=self.mode, window=self.window,
        hidden_dim=self.attention_dim, **kw)
    # The paper's W_c and W_s have no bias terms.
    self.combine = nn.Dense(self.hidden_dim, use_bias=False, **kw)
    self.output = nn.Dense(self.output_vocab_size, use_bias=False,
                           dot_general=projection_dot_general, **kw)
    self.dropout = nn.Dropout(self.dropout_rate)

  def __call__(self, state: dict[str, Any], y_emb: Array, memory: dict[str, Any], *,
               train: bool = False) -> tuple[dict[str, Any], tuple[Array, dict[str, Array]]]:
    """One step.

    Args:
      state: ``{'carry': tuple of num_layers (c [N, H], h [N, H]),
        'step': [N] int32 decoder position t}``, plus ``'feed': h~_{t-1}
        [N, H]`` when input feeding.
      y_emb: ``[N, E]`` embedding of ``y_{t-1}``.
      memory: ``{'annotations' [N, S, H], 'mask' [N, S], ...}``.
      train: Enables dropout.

    Returns:
      ``(new_state, (logits [N, V] float32, {'cross': [N, S]}))``.
    """
    x = self.dropout(y_emb, deterministic=not train)
    if self.input_feeding:
      x = jnp.concatenate([x, state["feed"].astype(x.dtype)], axis=-1)
    new_carry = []
    for layer, cell in enumerate(self.cells):
      if layer > 0:
        x = self.dropout(x, deterministic=not train)
      carry, x = cell(state["carry"][layer], x)
      new_carry.append(carry)
    context, weights = self.attention(
        x, memory["annotations"], mask=memory["mask"], step=state["step"])
    attentional = jnp.tanh(self.combine(jnp.concatenate([context.astype(x.dtype), x], -1)))
    logits = self.output(self.dropout(attentional, deterministic=not train))
    new_state = {"carry": tuple(new_carry), "step": state["step"] + 1}
    if self.input_feeding:
      new_state["feed"] = attentional
    return cast_tree_like(new_state, state), (logits.astype(jnp.float32), {"cross": weights})


class LuongSeq2Seq(StepDecoderModel):
  """Luong et al. (2015) attentional stacked-LSTM encoder-decoder.

  Attributes:
    vocab_size: Source vocabulary size.
    output_vocab_size: Target vocabulary size.
    emb_dim: Embedding width.
    hidden_dim: LSTM units in every layer of encoder and decoder.
    num_layers: Stacked LSTM layers (encoder and decoder alike).
    dropout_rate: Dropout on embeddings, between layers and before ``W_s``.
    score: Attention score, ``"dot"``, ``"general"`` or ``"concat"``.
    mode: ``"global"``, ``"local-m"`` or ``"local-p"``.
    window: Local attention half-width ``D``.
    attention_dim: Width of ``concat``'s ``W_a`` and ``local-p``'s ``W_p``;
      defaults to ``hidden_dim``.
    input_feeding: Concatenate ``h~_{t-1}`` to the next step's input.
    dtype: Computation dtype (logits and attention weights are float32).
    param_dtype: Parameter dtype.
  """

  vocab_size: int
  output_vocab_size: int
  emb_dim: int = 256
  hidden_dim: int = 512
  num_layers: int = 2
  dropout_rate: float = 0.0
  score: str = "general"
  mode: str = "global"
  window: int = 10
  attention_dim: int | None = None
  input_feeding: bool = True
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32

  decode_collections: tuple = ()

  def setup(self) -> None:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.src_embed = nn.Embed(self.vocab_size, self.emb_dim, **kw)
    self.tgt_embed = nn.Embed(self.output_vocab_size, self.emb_dim, **kw)
    self.dropout = nn.Dropout(self.dropout_rate)
    self.encoder = RNNEncoder(
        "lstm", self.hidden_dim, num_layers=self.num_layers,
        dropout_rate=self.dropout_rate, **kw)
    self.decoder = _LuongStep(
        output_vocab_size=self.output_vocab_size,
        hidden_dim=self.hidden_dim,
        num_layers=self.num_layers,
        score=self.score,
        mode=self.mode,
        window=self.window,
        attention_dim=self.attention_dim,
        input_feeding=self.input_feeding,
        dropout_rate=self.dropout_rate,
        **kw,
    )

  def encode(self, src: Array, *, train: bool = False) -> dict[str, Any]:
    """Encodes ``src`` ``[B, S]``.

    Returns:
      ``{'annotations': [B, S, H] top-layer states (zero at padding),
      'mask': [B, S] bool, 'final': tuple of num_layers (c [B, H], h [B, H])}``
      with the final carries taken at each sentence's true length.
    """
    x = self.dropout(self.src_embed(src), deterministic=not train)
    annotations, finals = self.encoder(x, source_lengths(src), train=train)
    return {"annotations": annotations, "mask": source_mask(src), "final": finals}

  def init_decode_state(self, memory: dict[str, Any], max_len: int) -> dict[str, Any]:
    """Decoder LSTMs start from the encoder's final carries; ``max_len`` is unused."""
    del max_len
    carry = tuple((c.astype(jnp.float32), h.astype(jnp.float32)) for c, h in memory["final"])
    batch = memory["mask"].shape[0]
    state = {"carry": carry, "step": jnp.zeros((batch,), jnp.int32)}
    if self.input_feeding:
      state["feed"] = jnp.zeros((batch, self.hidden_dim), jnp.float32)
    return state
