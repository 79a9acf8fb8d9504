"""LSTMN language model and encoder-decoder (Cheng, Dong & Lapata, 2016).

Both models are built from the cells of :mod:`attention.lstmn`:

* :class:`LSTMNLanguageModel` stacks :class:`~attention.lstmn.LSTMNCell`
  layers, each attending over its own hidden/memory tape (intra-attention),
  and predicts the next token from the top hidden state.
* :class:`LSTMNSeq2Seq` encodes the source with stacked LSTMNs and decodes
  with shallow- or deep-fusion cells (paper Section 4) whose inter-attention
  reads the encoder's tapes. It implements the seq2seq protocol of
  :mod:`attention.models.base`, so :mod:`attention.decoding` can drive it.

Teacher forcing and step-by-step decoding run the *same* cell modules (defined
once in ``setup``): the teacher-forced pass scans each cell over time with
``nn.scan`` and ``decode_step`` calls each cell once, so both read identical
parameter paths and agree by construction.

``PAD`` tokens are skipped by every cell: they are never written to a tape,
never attended to and leave the recurrent state unchanged (their hidden state
is zero). This holds in ``decode_step`` too, which is what lets the searches
feed ``PAD`` to finished hypotheses.

Tapes have a fixed number of slots, ``min(sequence or decode length,
max_len)``. Steps past the last slot still run but are not stored, so nothing
attends to them; ``max_len`` therefore bounds tape memory for long decodes
(the encoder's tapes always hold the whole source).
"""

from __future__ import annotations

from typing import Any, ClassVar, Optional, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.typing import Array, Dtype

from attention.lstmn import (DeepFusionLSTMNCell, EncoderTape, FusionCarry, LSTMN,
                             LSTMNCarry, LSTMNCell, ShallowFusionLSTMNCell)
from attention.models.base import PAD
from attention.projection import projection_dot_general

__all__ = ["LSTMNLanguageModel", "LSTMNSeq2Seq"]

_FUSION_CELLS = {"shallow": ShallowFusionLSTMNCell, "deep": DeepFusionLSTMNCell}


def _scan_cell(cell: nn.Module, carry: Any, inputs: Array, valid: Array,
               *broadcast: Any) -> tuple[Any, Any]:
  """Scans a bound ``cell`` over axis 1 of ``inputs [B, T, d]`` / ``valid [B, T]``.

  Parameters are broadcast, so the scan reads the very variables a direct
  ``cell(carry, x_t, ...)`` call reads; ``broadcast`` arguments (the encoder
  tape) are loop-invariant. Every per-step output gains a time axis 1.
  """

  def body(module, c, x_t, valid_t, *rest):
    return module(c, x_t, *rest, valid=valid_t)

  scan = nn.scan(body, variable_broadcast="params", split_rngs={"params": False},
                 in_axes=(1, 1) + (nn.broadcast,) * len(broadcast), out_axes=1)
  return scan(cell, carry, inputs, valid, *broadcast)


class LSTMNLanguageModel(nn.Module):
  """Stacked-LSTMN next-token language model (paper Section 5.1).

  ``logits[:, t]`` predicts ``tokens[:, t + 1]`` from ``tokens[:, :t + 1]``;
  the caller shifts the targets. Layer ``l`` reads layer ``l - 1``'s hidden
  states (the embeddings for ``l = 0``) and attends over its own tape only.

  Attributes:
    vocab_size: Vocabulary size ``V``.
    emb_dim: Embedding width.
    hidden_dim: LSTMN hidden/memory size of every layer.
    num_layers: Stacked LSTMN layers.
    dropout_rate: Dropout on the embeddings, between layers and before the
      output projection.
    dtype: Computation dtype (logits and attention weights are float32).
    max_len: Tape slots per layer at most (see the module docstring).
    attention_dim: Intra-attention width (default ``hidden_dim``).
    param_dtype: Parameter dtype.
  """

  vocab_size: int
  emb_dim: int = 256
  hidden_dim: int = 512
  num_layers: int = 1
  dropout_rate: float = 0.0
  dtype: Optional[Dtype] = None
  max_len: int = 512
  attention_dim: Optional[int] = None
  param_dtype: Dtype = jnp.float32

  def setup(self) -> None:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.embed = nn.Embed(self.vocab_size, self.emb_dim, **kw)
    self.cells = [LSTMNCell(self.hidden_dim, attention_dim=self.attention_dim, **kw)
                  for _ in range(self.num_layers)]
    self.dropout = nn.Dropout(self.dropout_rate)
    self.output = nn.Dense(self.vocab_size, dot_general=projection_dot_general, **kw)

  def init_decode_state(self, batch_size: int, max_len: Optional[int] = None
                        ) -> tuple[LSTMNCarry, ...]:
    """Empty tapes, one :class:`~attention.lstmn.LSTMNCarry` per layer.

    Args:
      batch_size: Rows ``N``.
      max_len: Steps to hold (default and cap: the ``max_len`` field).

    Returns:
      Tuple of carries; every leaf is ``[N, ...]`` except the scalar ``step``.
    """
    slots = self.max_len if max_len is None else min(int(max_len), self.max_len)
    return tuple(cell.initialize_carry(None, batch_size, slots) for cell in self.cells)

  def decode_step(self, tokens: Array, state: tuple[LSTMNCarry, ...]
                  ) -> tuple[Array, tuple[LSTMNCarry, ...], dict[str, Array]]:
    """Feeds ``tokens [N]`` int32 (``PAD`` rows are skipped).

    Returns:
      ``(logits [N, V] float32, new_state, {'intra': [N, layers, slots]})``.
    """
    valid = tokens != PAD
    x = self.embed(tokens)
    new_state, weights = [], []
    for cell, carry in zip(self.cells, state):
      carry, (x, w) = cell(carry, x, valid=valid)
      new_state.append(carry)
      weights.append(w)
    logits = self.output(x).astype(jnp.float32)
    return logits, tuple(new_state), {"intra": jnp.stack(weights, axis=1)}

  def __call__(self, tokens: Array, *, train: bool = False, return_alignments: bool = False
               ) -> Union[Array, tuple[Array, dict[str, Array]]]:
    """Teacher-forced pass over ``tokens [B, T]`` int32 (``PAD = 0`` skipped).

    Args:
      tokens: ``[B, T]`` input tokens.
      train: Enables dropout (rng ``'dropout'``).
      return_alignments: Also return ``{'intra': [B, layers, T, slots]}``
        (``slots = min(T, max_len)``), row ``t`` over earlier positions.

    Returns:
      ``logits [B, T, V]`` float32, or ``(logits, alignments)``.
    """
    drop = lambda y: self.dropout(y, deterministic=not train)
    valid = tokens != PAD
    x = drop(self.embed(tokens))
    state = self.init_decode_state(tokens.shape[0], tokens.shape[1])
    weights = []
    for layer, (cell, carry) in enumerate(zip(self.cells, state)):
      if layer > 0:
        x = drop(x)
      _, (x, w) = _scan_cell(cell, carry, x, valid)
      weights.append(w)
    logits = self.output(drop(x)).astype(jnp.float32)
    if return_alignments:
      return logits, {"intra": jnp.stack(weights, axis=1)}
    return logits


class LSTMNSeq2Seq(nn.Module):
  """LSTMN encoder-decoder with shallow or deep fusion (paper Section 4).

  Encoder: ``num_layers`` stacked :class:`~attention.lstmn.LSTMN` layers over
  the embedded source. Decoder: ``num_layers`` stacked fusion cells over the
  embedded ``BOS``-shifted target; decoder layer ``l`` inter-attends over
  encoder layer ``l``'s hidden tape (and, for deep fusion, also reads its
  memory tape), so each depth fuses with the encoder states of the same
  depth, as in the paper's one-layer Figure 3. ``fusion="shallow"`` feeds the
  inter-attention context into the decoder's gates and never reads the
  encoder memory; ``fusion="deep"`` gates the attended encoder memory into
  the decoder memory ``c_t``.

  Output: ``logits = W_o h_t + b`` from the top decoder hidden state (the
  paper). With ``readout_context=True`` the top layer's inter-attention
  context ``gamma~_t = sum_j p_j^t gamma_j`` is concatenated first,
  ``W_o [h_t; gamma~_t]``, giving the softmax direct access to the source.

  Attributes:
    vocab_size: Source vocabulary size.
    output_vocab_size: Target vocabulary size ``V``.
    emb_dim: Embedding width (source and target).
    hidden_dim: LSTMN size of every encoder and decoder layer (deep fusion
      adds encoder memories to decoder memories, so they must match).
    num_layers: Encoder and decoder depth.
    fusion: ``"deep"`` or ``"shallow"``.
    dropout_rate: Dropout on embeddings, between layers and before the output.
    dtype: Computation dtype (logits and attention weights are float32).
    max_len: Decoder tape slots at most (see the module docstring).
    readout_context: Concatenate the inter-attention context to ``h_t``
      before the output projection.
    attention_dim: Intra/inter-attention width (default ``hidden_dim``).
    param_dtype: Parameter dtype.
  """

  vocab_size: int
  output_vocab_size: int
  emb_dim: int = 256
  hidden_dim: int = 512
  num_layers: int = 1
  fusion: str = "deep"
  dropout_rate: float = 0.0
  dtype: Optional[Dtype] = None
  max_len: int = 512
  readout_context: bool = False
  attention_dim: Optional[int] = None
  param_dtype: Dtype = jnp.float32

  decode_collections: ClassVar[tuple[str, ...]] = ()

  def setup(self) -> None:
    if self.fusion not in _FUSION_CELLS:
      raise ValueError(f"fusion must be 'deep' or 'shallow', got {self.fusion!r}")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    cell_kw = dict(attention_dim=self.attention_dim, **kw)
    self.src_embed = nn.Embed(self.vocab_size, self.emb_dim, **kw)
    self.tgt_embed = nn.Embed(self.output_vocab_size, self.emb_dim, **kw)
    self.encoder = [LSTMN(self.hidden_dim, **cell_kw) for _ in range(self.num_layers)]
    # Cells, not sequence layers: encode() needs their prepare_encoder and
    # decode_step calls them once per token.
    self.decoder = [_FUSION_CELLS[self.fusion](self.hidden_dim, **cell_kw)
                    for _ in range(self.num_layers)]
    self.dropout = nn.Dropout(self.dropout_rate)
    self.output = nn.Dense(self.output_vocab_size, dot_general=projection_dot_general, **kw)

  def encode(self, src: Array, *, train: bool = False) -> dict[str, Any]:
    """Encodes ``src [B, S]`` int32 (``PAD`` skipped).

    Returns:
      ``{'tapes': tuple of num_layers EncoderTape, 'mask': [B, S] bool}``.
      Each :class:`~attention.lstmn.EncoderTape` holds ``hidden [B, S, H]``,
      the precomputed inter-attention keys ``proj [B, S, A]``, ``mask [B, S]``
      and, for deep fusion, ``memory [B, S, H]`` (``None`` for shallow).
      Padded positions hold zeros and are masked.
    """
    mask = src != PAD
    x = self.dropout(self.src_embed(src), deterministic=not train)
    tapes = []
    for layer, (enc, dec) in enumerate(zip(self.encoder, self.decoder)):
      if layer > 0:
        x = self.dropout(x, deterministic=not train)
      hidden, memory = enc(x, mask=mask, return_memory=True)
      if self.fusion == "deep":
        tapes.append(dec.prepare_encoder(hidden, memory, mask))
      else:
        tapes.append(dec.prepare_encoder(hidden, mask))
      x = hidden
    return {"tapes": tuple(tapes), "mask": mask}

  def init_decode_state(self, memory: dict[str, Any], max_len: int
                        ) -> tuple[FusionCarry, ...]:
    """Empty decoder tapes for ``min(max_len, self.max_len)`` steps.

    Returns:
      One :class:`~attention.lstmn.FusionCarry` per decoder layer; every leaf
      is ``[B, ...]`` except the scalar ``step``, which is the same for all
      rows because every row advances it once per step.
    """
    batch = memory["mask"].shape[0]
    slots = min(int(max_len), self.max_len)
    return tuple(cell.initialize_carry(None, batch, slots, self.hidden_dim)
                 for cell in self.decoder)

  def _logits(self, h: Array, inter: Array, tape: EncoderTape, train: bool) -> Array:
    """``h [B, (T,) H]`` and top-layer ``inter [B, (T,) S]`` -> float32 logits."""
    if self.readout_context:
      # Recomputed from the weights rather than read from the carry: the
      # carry holds gamma~ only for the last step, and padded rows must get
      # a zero context in both paths (their weights are zero).
      context = jnp.einsum("b...s,bsd->b...d", inter, tape.hidden.astype(jnp.float32))
      h = jnp.concatenate([h, context.astype(h.dtype)], axis=-1)
    h = self.dropout(h, deterministic=not train)
    return self.output(h).astype(jnp.float32)

  def decode_step(self, tokens: Array, state: tuple[FusionCarry, ...],
                  memory: dict[str, Any]
                  ) -> tuple[Array, tuple[FusionCarry, ...], dict[str, Array]]:
    """One decoder step for ``tokens [N]`` int32 (``PAD`` rows are skipped).

    Returns:
      ``(logits [N, V] float32, new_state, {'inter': [N, S], 'intra': [N,
      slots]})``, the top decoder layer's attention weights.
    """
    valid = tokens != PAD
    x = self.tgt_embed(tokens)
    new_state = []
    for cell, carry, tape in zip(self.decoder, state, memory["tapes"]):
      carry, (x, intra, inter) = cell(carry, x, tape, valid=valid)
      new_state.append(carry)
    logits = self._logits(x, inter, memory["tapes"][-1], train=False)
    return logits, tuple(new_state), {"inter": inter, "intra": intra}

  def forced_decode(self, memory: dict[str, Any], tgt_in: Array, *, train: bool = False,
                    return_alignments: bool = False
                    ) -> Union[Array, tuple[Array, dict[str, Array]]]:
    """Teacher-forced decoder over ``tgt_in [B, T]`` given ``encode``'s memory.

    Returns:
      As :meth:`__call__`.
    """
    drop = lambda y: self.dropout(y, deterministic=not train)
    valid = tgt_in != PAD
    x = drop(self.tgt_embed(tgt_in))
    state = self.init_decode_state(memory, tgt_in.shape[1])
    for layer, (cell, carry, tape) in enumerate(zip(self.decoder, state, memory["tapes"])):
      if layer > 0:
        x = drop(x)
      _, (x, intra, inter) = _scan_cell(cell, carry, x, valid, tape)
    logits = self._logits(x, inter, memory["tapes"][-1], train)
    if return_alignments:
      return logits, {"inter": inter, "intra": intra}
    return logits

  def __call__(self, src: Array, tgt_in: Array, *, train: bool = False,
               return_alignments: bool = False
               ) -> Union[Array, tuple[Array, dict[str, Array]]]:
    """Teacher-forced forward pass.

    Args:
      src: ``[B, S]`` int32 source, ``PAD``-padded.
      tgt_in: ``[B, T]`` int32 ``BOS``-shifted target, ``PAD``-padded.
      train: Enables dropout (rng ``'dropout'``).
      return_alignments: Also return the top decoder layer's weights
        ``{'inter': [B, T, S], 'intra': [B, T, slots]}`` (``slots =
        min(T, max_len)``); padded source positions get exactly zero weight.

    Returns:
      ``logits [B, T, V]`` float32, or ``(logits, alignments)``.
    """
    memory = self.encode(src, train=train)
    return self.forced_decode(memory, tgt_in, train=train,
                              return_alignments=return_alignments)
