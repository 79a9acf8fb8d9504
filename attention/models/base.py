"""Token conventions and the sequence-to-sequence model protocol.

Every model in :mod:`attention.models` (Transformer, the RNN encoder-decoders)
implements the same four methods, so that training, evaluation and
:mod:`attention.decoding` never need to know which architecture they drive.

Token conventions (the whole project):

* ``PAD = 0``, ``BOS = 1``, ``EOS = 2``.
* Sources ``src [B, S]`` int32, right-padded with ``PAD``.
* Target input ``tgt_in [B, T]`` int32: the target shifted right by one with
  ``BOS`` in front (``[BOS, y_1, ..., y_{T-1}]``), ``PAD`` after the end. The
  loss target is ``[y_1, ..., y_T]`` with ``EOS`` after the last word.

The protocol (``Seq2SeqModel``), for a Flax module ``model`` called through
``model.apply(variables, ..., method=...)``:

``encode(self, src, *, train=False) -> memory``
  ``src [B, S]``. ``memory`` is any pytree whose leaves all have a leading
  batch axis ``B`` (e.g. encoder states ``[B, S, D]`` and the source mask
  ``[B, S]``). Decoding repeats it along that axis for beams.

``init_decode_state(self, memory, max_len: int) -> state``
  The decoder state before the first step, for at most ``max_len`` steps.
  ``state`` is a pytree whose non-scalar leaves have a leading batch axis
  ``B``; scalar (ndim 0) leaves are shared by the whole batch and are never
  gathered or repeated for beams (e.g. a step counter).

``decode_step(self, tokens, state, memory) -> (logits, new_state, aux)``
  One decoder step for ``N`` rows (``N = B`` for greedy search,
  ``B * beam_size`` for beam search, beams of sentence ``b`` in rows
  ``b * beam_size ... b * beam_size + beam_size - 1``). ``tokens [N]`` int32
  is the previous output token (``BOS`` at the first step); ``memory`` has
  been repeated to ``N`` rows. Returns ``logits [N, V]`` (float32, unnormalised),
  the new state (same structure and shapes) and ``aux``: a dict of this step's
  alignment weights, each ``[N, ..., S]`` with source positions last (e.g.
  ``{'cross': [N, layers, heads, S]}`` or ``{'attention': [N, S]}``); ``{}`` if
  the model has none.

``__call__(self, src, tgt_in, *, train=False, return_alignments=False)``
  Teacher-forced forward pass: ``logits [B, T, V]`` (float32), or
  ``(logits, alignments)`` with ``alignments`` a dict of arrays
  ``[B, ..., T, S]``, with the same keys as ``decode_step``'s ``aux``.

``decode_collections: tuple[str, ...] = ()`` (class attribute, optional)
  Names of mutable Flax collections the decode methods keep their state in,
  e.g. ``("cache",)`` for a Transformer's key/value cache. When non-empty,
  the state lives in those collections instead of being passed explicitly:
  ``init_decode_state`` is applied with ``mutable=decode_collections`` (its
  return value is ignored, it only has to create the variables) and ``state``
  *is* the resulting dict ``{collection: variables}``; ``decode_step`` is
  applied with ``{**variables, **state}`` and ``mutable=decode_collections``,
  receives ``state=None`` and should return ``None`` as ``new_state``; the
  mutated collections become the new state. Models with explicit state (the
  RNNs) leave it empty. :func:`attention.decoding.make_decode_fns` hides the
  difference.

Dropout: ``train=True`` needs a ``'dropout'`` PRNG stream in ``apply``.
Decoding always runs without dropout.
"""

from __future__ import annotations

from typing import Any, ClassVar, Protocol, runtime_checkable

import jax
import jax.numpy as jnp

Array = jax.Array
PyTree = Any

PAD = 0
BOS = 1
EOS = 2
# Long-form aliases, for code that prefers them.
PAD_ID, BOS_ID, EOS_ID = PAD, BOS, EOS


@runtime_checkable
class Seq2SeqModel(Protocol):
  """Structural type of the encoder-decoder models (see the module docstring)."""

  decode_collections: ClassVar[tuple[str, ...]]

  def encode(self, src: Array, *, train: bool = False) -> PyTree:
    ...

  def init_decode_state(self, memory: PyTree, max_len: int) -> PyTree:
    ...

  def decode_step(
      self, tokens: Array, state: PyTree, memory: PyTree
  ) -> tuple[Array, PyTree, dict[str, Array]]:
    ...

  def __call__(
      self, src: Array, tgt_in: Array, *, train: bool = False,
      return_alignments: bool = False,
  ) -> Array | tuple[Array, dict[str, Array]]:
    ...


def decode_collections(model: Any) -> tuple[str, ...]:
  """The model's ``decode_collections``, ``()`` when it does not declare any."""
  return tuple(getattr(model, "decode_collections", ()))


def padding_mask(tokens: Array) -> Array:
  """``[B, L]`` boolean, True at real (non-``PAD``) tokens."""
  return tokens != PAD


def shift_right(targets: Array) -> Array:
  """``[y_1, ..., y_T]`` -> ``[BOS, y_1, ..., y_{T-1}]`` (padding stays padding).

  Args:
    targets: ``[B, T]`` int target tokens, ``PAD`` after the sequence.

  Returns:
    ``[B, T]`` int32 decoder input.
  """
  targets = jnp.asarray(targets, jnp.int32)
  shifted = jnp.concatenate(
      [jnp.full(targets.shape[:-1] + (1,), BOS, jnp.int32), targets[..., :-1]], axis=-1)
  # Where the target is padding, the input is padding too (not the shifted EOS).
  return jnp.where(targets == PAD, PAD, shifted)
