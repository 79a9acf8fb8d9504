"""Building blocks shared by the recurrent seq2seq models.

:mod:`attention.models.rnn_encdec`, :mod:`attention.models.rnnsearch` and
:mod:`attention.models.luong_seq2seq` all follow the same recipe:

* an :class:`RNNEncoder` (stacked, optionally bidirectional, padding-aware)
  turns the embedded source into per-position states and final carries;
* a *step module* computes one decoder step
  ``(state, y_emb, memory) -> (state, (logits, aux))``;
* :func:`scan_decoder` runs that very step module over the teacher-forced
  targets with :func:`flax.linen.scan`, while the model's ``decode_step``
  calls it once. Both paths execute the same module with the same
  parameters, so teacher forcing and step-by-step decoding agree by
  construction rather than by keeping two code paths in sync.

Sources are right-padded with ``PAD_ID``; a sequence's true length is its
number of non-pad tokens.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.typing import Array, Dtype

from attention.initializers import orthogonal
from attention.models.base import PAD_ID
from attention.projection import projection_dot_general

__all__ = [
    "source_mask",
    "source_lengths",
    "cast_tree_like",
    "make_cell",
    "RNNEncoder",
    "DeepOutput",
    "scan_decoder",
]


def source_mask(src: Array) -> Array:
  """``[B, S]`` int tokens -> ``[B, S]`` bool, True at real (non-pad) tokens."""
  return src != PAD_ID


def source_lengths(src: Array) -> Array:
  """``[B, S]`` right-padded int tokens -> ``[B]`` int32 true lengths."""
  return jnp.sum(source_mask(src), axis=-1).astype(jnp.int32)


def cast_tree_like(new: Any, old: Any) -> Any:
  """Casts every leaf of ``new`` to the dtype of the matching leaf of ``old``.

  Recurrent carries must keep a fixed dtype across ``scan`` iterations; with a
  reduced-precision ``dtype`` a cell can return a carry of a different dtype
  than the float32 one it was given.
  """
  return jax.tree_util.tree_map(lambda n, o: n.astype(o.dtype), new, old)


def make_cell(cell_type: str, features: int, dtype: Dtype | None = None,
              param_dtype: Dtype = jnp.float32, **kwargs: Any) -> nn.RNNCellBase:
  """Builds a ``"gru"`` or ``"lstm"`` flax cell; ``kwargs`` go to the cell.

  The recurrent kernel is orthogonal as in flax, drawn in float32 so that any
  ``param_dtype`` initialises.
  """
  kwargs.setdefault("recurrent_kernel_init", orthogonal())
  if cell_type == "gru":
    return nn.GRUCell(features, dtype=dtype, param_dtype=param_dtype, **kwargs)
  if cell_type == "lstm":
    return nn.OptimizedLSTMCell(features, dtype=dtype, param_dtype=param_dtype, **kwargs)
  raise ValueError(f"cell_type must be 'gru' or 'lstm', got {cell_type!r}")


class RNNEncoder(nn.Module):
  """Stacked, optionally bidirectional, padding-aware RNN encoder.

  Each layer is an ``nn.RNN`` (or an ``nn.Bidirectional`` pair) run with
  ``seq_lengths``, so the forward final carry is the state at each sequence's
  true last token and the backward direction starts at each sequence's true
  end rather than in the padding. Outputs at padded positions are set to zero.

  Attributes:
    cell_type: ``"gru"`` or ``"lstm"``.
    hidden_dim: Units per direction.
    num_layers: Number of stacked layers.
    bidirectional: Whether each layer runs both directions (outputs are
      ``[forward; backward]``, ``2 * hidden_dim`` wide).
    dropout_rate: Dropout between layers.
    dtype: Computation dtype.
    param_dtype: Parameter dtype.
  """

  cell_type: str
  hidden_dim: int
  num_layers: int = 1
  bidirectional: bool = False
  dropout_rate: float = 0.0
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, inputs: Array, lengths: Array, *, train: bool = False
               ) -> tuple[Array, tuple[Any, ...]]:
    """Encodes a batch of embedded, right-padded sequences.

    Args:
      inputs: ``[B, S, E]`` embedded source.
      lengths: ``[B]`` int true lengths.
      train: Enables dropout (rng ``'dropout'``).

    Returns:
      ``(outputs, finals)``: outputs ``[B, S, D]`` with ``D = hidden_dim``
      (times 2 if bidirectional), zero at padded positions; ``finals`` holds
      one final carry per layer (bottom first), each the cell's carry
      (``[B, H]`` for a GRU, ``(c, h)`` for an LSTM), or a
      ``(forward, backward)`` pair of them if bidirectional. The backward
      carry is the backward state at position 0.
    """
    # parent=None leaves a submodule unbound, so that the module it is handed
    # to adopts it (params under layer_i/.../cell) rather than this one.
    cell = lambda: make_cell(self.cell_type, self.hidden_dim, self.dtype, self.param_dtype,
                             parent=None)
    x = inputs
    finals = []
    for layer in range(self.num_layers):
      if layer > 0:
        x = nn.Dropout(self.dropout_rate)(x, deterministic=not train)
      if self.bidirectional:
        rnn = nn.Bidirectional(
            nn.RNN(cell(), parent=None), nn.RNN(cell(), parent=None), name=f"layer_{layer}")
      else:
        rnn = nn.RNN(cell(), name=f"layer_{layer}")
      carry, x = rnn(x, seq_lengths=lengths, return_carry=True)
      finals.append(carry)
    valid = jnp.arange(x.shape[1])[None, :] < lengths[:, None]
    # Padded positions hold whatever the forward RNN computed past the end;
    # zeroing them keeps the memory independent of how much padding there is.
    x = jnp.where(valid[..., None], x, jnp.zeros((), x.dtype))
    return x, tuple(finals)


class DeepOutput(nn.Module):
  """Deep output layer of Cho et al. (2014) / Bahdanau et al. (2015).

  ``t~ = U_o s + V_o E y + C_o c`` (one ``Dense`` over the concatenated parts,
  which is the same linear map), then either maxout over adjacent pairs
  (``t_j = max(t~_{2j-1}, t~_{2j})``, ``t~`` twice ``readout_dim`` wide) or,
  with ``maxout=False``, ``t = tanh(t~)``; finally ``logits = W_o t``.

  Attributes:
    vocab_size: Output vocabulary size.
    readout_dim: Width ``l`` of ``t``.
    maxout: Maxout (paper) or tanh readout.
    dropout_rate: Dropout on ``t`` before ``W_o``.
    dtype: Computation dtype.
    param_dtype: Parameter dtype.
  """

  vocab_size: int
  readout_dim: int
  maxout: bool = True
  dropout_rate: float = 0.0
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, *parts: Array, train: bool = False) -> Array:
    """Maps ``parts`` (each ``[N, d_k]``) to float32 logits ``[N, vocab_size]``."""
    width = 2 * self.readout_dim if self.maxout else self.readout_dim
    pre = nn.Dense(width, dtype=self.dtype, param_dtype=self.param_dtype, name="readout")(
        jnp.concatenate(parts, axis=-1))
    if self.maxout:
      readout = jnp.max(pre.reshape(pre.shape[:-1] + (self.readout_dim, 2)), axis=-1)
    else:
      readout = jnp.tanh(pre)
    readout = nn.Dropout(self.dropout_rate)(readout, deterministic=not train)
    logits = nn.Dense(self.vocab_size, dtype=self.dtype, param_dtype=self.param_dtype,
                      dot_general=projection_dot_general, name="logits")(readout)
    return logits.astype(jnp.float32)


def scan_decoder(
    step: nn.Module,
    state: Any,
    inputs: Array,
    memory: Any,
    *,
    train: bool,
) -> tuple[Any, Any]:
  """Runs a decoder step module over time with :func:`flax.linen.scan`.

  Parameters are broadcast (one set shared by all steps, the same set
  ``decode_step`` uses); dropout rngs are split so every step draws a fresh
  mask.

  Args:
    step: Bound step module, called as
      ``step(state, y_emb [B, E], memory, train=train) -> (state, outputs)``.
    state: Initial decoder state (pytree, batch-leading leaves).
    inputs: ``[B, T, E]`` embedded teacher-forcing inputs.
    memory: Encoder memory pytree, broadcast to every step.
    train: Forwarded to the step module.

  Returns:
    ``(final_state, outputs)``; every leaf of ``outputs`` gains a time axis
    at position 1 (e.g. logits ``[B, T, V]``).
  """

  def body(module: nn.Module, carry: Any, y_emb: Array, mem: Any) -> tuple[Any, Any]:
    return module(carry, y_emb, mem, train=train)

  scanned: Callable[..., tuple[Any, Any]] = nn.scan(
      body,
      variable_broadcast="params",
      split_rngs={"params": False, "dropout": True},
      in_axes=(1, nn.broadcast),
      out_axes=1,
  )
  return scanned(step, state, inputs, memory)


class StepDecoderModel(nn.Module):
  """Teacher-forced and step-by-step paths shared by the RNN encoder-decoders.

  A subclass defines ``encode``, ``init_decode_state`` and, in ``setup``,
  ``tgt_embed`` and a step module ``decoder`` (``(state, y_emb, memory, *,
  train) -> (state, (logits, aux))``). Training scans that same step module,
  so teacher forcing equals decoding token by token by construction.
  """

  def decode_step(self, tokens: Array, state: dict[str, Any], memory: dict[str, Any]
                  ) -> tuple[Array, dict[str, Any], dict[str, Array]]:
    """One inference step: ``tokens [N]`` -> ``(logits [N, V], state, aux)``."""
    state, (logits, aux) = self.decoder(state, self.tgt_embed(tokens), memory, train=False)
    return logits, state, aux

  def __call__(self, src: Array, tgt_in: Array, *, train: bool = False,
               return_alignments: bool = False) -> Array | tuple[Array, dict[str, Array]]:
    """Teacher-forced forward pass.

    Args:
      src: ``[B, S]`` int32 source, 0 = pad.
      tgt_in: ``[B, T]`` int32 BOS-shifted target.
      train: Enables dropout (rng ``'dropout'``).
      return_alignments: Also return the alignments, e.g. ``{'cross': [B, T, S]}``
        (``{}`` for a model without attention).

    Returns:
      float32 logits ``[B, T, V]``, or ``(logits, alignments)``.
    """
    memory = self.encode(src, train=train)
    state = self.init_decode_state(memory, tgt_in.shape[1])
    _, (logits, aux) = scan_decoder(
        self.decoder, state, self.tgt_embed(tgt_in), memory, train=train)
    return (logits, aux) if return_alignments else logits
