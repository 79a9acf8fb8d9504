"""Plain stacked-LSTM language model: the no-attention baseline of the LSTMN LM.

:class:`LSTMLanguageModel` has the interface of
:class:`~attention.models.lstmn.LSTMNLanguageModel` (fields, ``__call__``,
``init_decode_state`` and ``decode_step``), with each LSTMN layer replaced by
a flax :class:`~flax.linen.OptimizedLSTMCell`, so the two (and
``TransformerLM``) can be swapped in the same experiment config.

As in the LSTMN LM, teacher forcing scans the very cell modules that
``decode_step`` calls once per token (``nn.scan`` with broadcast parameters),
so both paths read identical parameters and agree by construction; and
``PAD`` tokens are skipped: they leave every layer's ``(c, h)`` unchanged and
their outputs (hence the next layer's inputs) are zero.

Per layer the cell computes, with ``x`` the layer input and ``h, c`` the
previous state (flax's gate order ``i, f, g, o``; input kernels ``ii..io``
have no bias, recurrent ones ``hi..ho`` do)::

    i = sigmoid(x W_ii + h W_hi + b_hi)    f = sigmoid(x W_if + h W_hf + b_hf)
    g = tanh(x W_ig + h W_hg + b_hg)       o = sigmoid(x W_io + h W_ho + b_ho)
    c' = f * c + i * g                     h' = o * tanh(c')

Parameters: ``V E`` (embedding) ``+ sum_l 4 H (in_l + H + 1)`` (``in_0 = E``,
``in_l = H`` above) ``+ (H + 1) V`` (output), e.g. 3,724,097 for ``V = 65``,
``E = 256``, ``H = 512`` and two layers.
"""

from __future__ import annotations

from typing import Optional, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.typing import Array, Dtype

from attention.initializers import orthogonal
from attention.models.base import PAD
from attention.projection import projection_dot_general

__all__ = ["LSTMLanguageModel", "LSTMCarry"]

LSTMCarry = tuple[Array, Array]
"""One layer's ``(c, h)``, each ``[N, H]`` in ``param_dtype``."""


def _masked_step(cell: nn.Module, carry: LSTMCarry, x: Array, valid: Array
                 ) -> tuple[LSTMCarry, Array]:
  """One ``cell`` step on ``x [N, d]``; rows with ``valid [N]`` False are skipped.

  Skipped rows keep ``carry`` and output zeros. The new carry is cast to the
  old one's dtype so a reduced-precision ``dtype`` keeps ``scan`` carries fixed.
  """
  new_carry, h = cell(carry, x)
  keep = valid[:, None]
  new_carry = jax.tree_util.tree_map(
      lambda new, old: jnp.where(keep, new.astype(old.dtype), old), new_carry, carry)
  return new_carry, jnp.where(keep, h, jnp.zeros_like(h))


def _scan_cell(cell: nn.Module, carry: LSTMCarry, inputs: Array, valid: Array
               ) -> tuple[LSTMCarry, Array]:
  """Scans a bound ``cell`` over axis 1 of ``inputs [B, T, d]`` / ``valid [B, T]``.

  Returns:
    ``(final carry, outputs [B, T, H])``.
  """
  scan = nn.scan(_masked_step, variable_broadcast="params", split_rngs={"params": False},
                 in_axes=1, out_axes=1)
  return scan(cell, carry, inputs, valid)


class LSTMLanguageModel(nn.Module):
  """Stacked-LSTM next-token language model (no attention).

  ``logits[:, t]`` predicts ``tokens[:, t + 1]`` from ``tokens[:, :t + 1]``;
  the caller shifts the targets. Layer ``l`` reads layer ``l - 1``'s hidden
  states (the embeddings for ``l = 0``).

  Attributes:
    vocab_size: Vocabulary size ``V``.
    emb_dim: Embedding width.
    hidden_dim: LSTM hidden/memory size of every layer.
    num_layers: Stacked LSTM layers.
    dropout_rate: Dropout on the embeddings, between layers and before the
      output projection.
    dtype: Computation dtype (logits are float32; carries are kept in
      ``param_dtype``).
    param_dtype: Parameter dtype.
  """

  vocab_size: int
  emb_dim: int = 256
  hidden_dim: int = 512
  num_layers: int = 1
  dropout_rate: float = 0.0
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32

  def setup(self) -> None:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.embed = nn.Embed(self.vocab_size, self.emb_dim, **kw)
    self.cells = [nn.OptimizedLSTMCell(self.hidden_dim, recurrent_kernel_init=orthogonal(), **kw)
                  for _ in range(self.num_layers)]
    self.dropout = nn.Dropout(self.dropout_rate)
    self.output = nn.Dense(self.vocab_size, dot_general=projection_dot_general, **kw)

  def init_decode_state(self, batch_size: int, max_len: Optional[int] = None
                        ) -> tuple[LSTMCarry, ...]:
    """Zero ``(c, h)`` for every layer.

    Args:
      batch_size: Rows ``N``.
      max_len: Ignored (an LSTM's state does not grow); kept for the
        interface of :class:`~attention.models.lstmn.LSTMNLanguageModel`.

    Returns:
      Tuple of ``num_layers`` carries ``(c [N, H], h [N, H])``.
    """
    del max_len
    zeros = jnp.zeros((batch_size, self.hidden_dim), self.param_dtype)
    return tuple((zeros, zeros) for _ in range(self.num_layers))

  def decode_step(self, tokens: Array, state: tuple[LSTMCarry, ...]
                  ) -> tuple[Array, tuple[LSTMCarry, ...], dict[str, Array]]:
    """Feeds ``tokens [N]`` int32 (``PAD`` rows are skipped).

    Returns:
      ``(logits [N, V] float32, new_state, {})`` (there are no alignments).
    """
    valid = tokens != PAD
    x = self.embed(tokens)
    new_state = []
    for cell, carry in zip(self.cells, state):
      carry, x = _masked_step(cell, carry, x, valid)
      new_state.append(carry)
    logits = self.output(x).astype(jnp.float32)
    return logits, tuple(new_state), {}

  def __call__(self, tokens: Array, *, train: bool = False, return_alignments: bool = False
               ) -> Union[Array, tuple[Array, dict[str, Array]]]:
    """Teacher-forced pass over ``tokens [B, T]`` int32 (``PAD = 0`` skipped).

    Args:
      tokens: ``[B, T]`` input tokens.
      train: Enables dropout (rng ``'dropout'``).
      return_alignments: Also return an empty alignments dict (the model has
        no attention; the evaluation code then plots nothing).

    Returns:
      ``logits [B, T, V]`` float32, or ``(logits, {})``.
    """
    drop = lambda y: self.dropout(y, deterministic=not train)
    valid = tokens != PAD
    x = drop(self.embed(tokens))
    state = self.init_decode_state(tokens.shape[0])
    for layer, (cell, carry) in enumerate(zip(self.cells, state)):
      if layer > 0:
        x = drop(x)
      _, x = _scan_cell(cell, carry, x, valid)
    logits = self.output(drop(x)).astype(jnp.float32)
    if return_alignments:
      return logits, {}
    return logits
