"""Long Short-Term Memory-Networks (Cheng, Dong & Lapata, 2016).

An LSTMN replaces the single LSTM memory cell with a growing *tape* of past
hidden states ``h_1..h_{t-1}`` and memories ``c_1..c_{t-1}``. At each step an
additive intra-attention over the tape builds adaptive summaries ``h~_t`` and
``c~_t`` that take the place of ``h_{t-1}`` and ``c_{t-1}`` in the LSTM update
(paper Section 3.1)::

    a_i^t = v^T tanh(W_h h_i + W_x x_t + W_htilde h~_{t-1})      i < t
    s^t   = softmax(a^t);  h~_t = sum_i s_i^t h_i;  c~_t = sum_i s_i^t c_i
    [i, f, o, c^] = [sig, sig, sig, tanh](W_gates_htilde h~_t + W_gates_x x_t + b)
    c_t = f * c~_t + i * c^;  h_t = o * tanh(c_t)

At ``t = 1`` the tape is empty; ``h~_1`` and ``c~_1`` are then zeros (the
attention row is all zeros), so the first step is an LSTM step from a zero
state. Section 4's encoder-decoder *shallow* and *deep* fusion cells are
provided as well.

Tapes have a fixed ``max_len`` so the cells run under ``nn.scan``/``lax`` loops
with static shapes; a boolean ``tape_mask`` marks written, valid slots.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from attention.initializers import orthogonal
from attention.masks import masked_softmax

__all__ = ["LSTMNCarry", "FusionCarry", "EncoderTape", "LSTMNCell",
           "ShallowFusionLSTMNCell", "DeepFusionLSTMNCell", "LSTMN",
           "ShallowFusionLSTMN", "DeepFusionLSTMN"]

Array = jax.Array
Dtype = Any
Initializer = Callable[..., Array]

_default_kernel_init = nn.initializers.lecun_normal()
_default_recurrent_init = orthogonal()


class LSTMNCarry(NamedTuple):
    """Recurrent state of :class:`LSTMNCell` (a pytree of static shape).

    Slot ``i`` of each tape holds step ``i``'s value once a valid step wrote
    it, zeros otherwise.
    """

    h_tape: Array  # [batch, max_len, features]
    c_tape: Array  # [batch, max_len, features]
    h_tape_proj: Array  # [batch, max_len, attention_dim]: cached W_h h_i
    tape_mask: Array  # [batch, max_len] bool: slot written by a valid step
    h_tilde: Array  # [batch, features]: previous adaptive summary h~_{t-1}
    step: Array  # [] int32: slot the next step writes to


class FusionCarry(NamedTuple):
    """Recurrent state of the fusion decoder cells."""

    lstmn: LSTMNCarry  # the decoder's own tapes
    gamma_tilde: Array  # [batch, enc_features]: previous inter context gamma~_{t-1}


class EncoderTape(NamedTuple):
    """Encoder states prepared once per sequence for inter-attention."""

    hidden: Array  # [batch, S, enc_features]: encoder hidden tape gamma
    proj: Array  # [batch, S, attention_dim]: precomputed W_gamma gamma_j
    mask: Array  # [batch, S] bool: True for real source tokens
    memory: Optional[Array] = None  # [batch, S, features]: alpha (deep fusion only)


def _weighted_sum(weights: Array, tape: Array) -> Array:
    """``sum_i w_i tape_i`` in float32, cast back to the tape dtype."""
    out = jnp.einsum("bl,blf->bf", weights, tape.astype(jnp.float32))
    return out.astype(tape.dtype)


def _as_mask(mask: Optional[Array], shape: Tuple[int, ...]) -> Array:
    """``mask`` as bool of ``shape``; all True when None."""
    if mask is None:
        return jnp.ones(shape, bool)
    return jnp.asarray(mask).astype(bool).reshape(shape)


def _mask_outputs(valid: Array, *outs: Array) -> Tuple[Array, ...]:
    """Zeros every per-step output on padded rows."""
    return tuple(jnp.where(valid.reshape((-1,) + (1,) * (o.ndim - 1)), o, 0) for o in outs)


class _LSTMNConfig(nn.Module):
    """Hyper-parameters shared by every cell and layer in this module.

    Attributes:
        features: hidden/memory size.
        attention_dim: size of the additive-attention space (default features).
        dtype: computation and carry dtype (None: the carry in
            ``param_dtype``, promoted compute). Attention softmax is always
            float32.
        param_dtype: parameter dtype.
        kernel_init: initializer for input-side kernels.
        recurrent_kernel_init: initializer for kernels applied to states.
        bias_init: initializer for biases.
    """

    features: int
    attention_dim: Optional[int] = None
    dtype: Optional[Dtype] = None
    param_dtype: Dtype = jnp.float32
    kernel_init: Initializer = _default_kernel_init
    recurrent_kernel_init: Initializer = _default_recurrent_init
    bias_init: Initializer = nn.initializers.zeros_init()

    @property
    def att_dim(self) -> int:
        return self.attention_dim or self.features

    @property
    def carry_dtype(self) -> Dtype:
        return self.dtype or self.param_dtype

    @nn.nowrap
    def _dense(self, n: int, init: Initializer, use_bias: bool = False) -> nn.Dense:
        return nn.Dense(n, use_bias=use_bias, dtype=self.dtype,
                        param_dtype=self.param_dtype, kernel_init=init,
                        bias_init=self.bias_init)

    @nn.nowrap
    def _make_cell(self, cls: type) -> nn.Module:
        return cls(features=self.features, attention_dim=self.attention_dim,
                   dtype=self.dtype, param_dtype=self.param_dtype,
                   kernel_init=self.kernel_init,
                   recurrent_kernel_init=self.recurrent_kernel_init,
                   bias_init=self.bias_init, name="cell")


class LSTMNCell(_LSTMNConfig):
    """One LSTMN step: intra-attention over the tapes, then an LSTM update.

    Parameters (submodule names): attention ``W_h``, ``W_x``, ``W_htilde``
    (all ``-> attention_dim``, no bias) and ``v`` (``-> 1``); gates
    ``W_gates_htilde`` (no bias) and ``W_gates_x`` (holds the bias ``b``),
    both ``-> 4 * features`` in the gate order ``[i, f, o, c^]``. Splitting
    ``W [h~_t; x_t] + b`` into two kernels is the same function and lets
    fusion cells add inputs without reshaping the LSTMN's kernels. Fields:
    see ``_LSTMNConfig``.
    """

    def setup(self) -> None:
        a, f = self.att_dim, self.features
        self.W_h = self._dense(a, self.recurrent_kernel_init)
        self.W_x = self._dense(a, self.kernel_init)
        self.W_htilde = self._dense(a, self.recurrent_kernel_init)
        self.v = self._dense(1, self.kernel_init)
        self.W_gates_htilde = self._dense(4 * f, self.recurrent_kernel_init)
        self.W_gates_x = self._dense(4 * f, self.kernel_init, use_bias=True)

    @nn.nowrap
    def initialize_carry(self, rng: Any, batch_size: int, max_len: int) -> LSTMNCarry:
        """Empty tapes (zeros, ``step == 0``) with room for ``max_len`` steps.

        ``rng`` is unused (the initial state is deterministic) and kept for
        parity with Flax RNN cells. Steps past ``max_len`` still compute but
        are not written, so nothing can attend to them.
        """
        del rng
        dt, b, n = self.carry_dtype, batch_size, max_len
        return LSTMNCarry(
            h_tape=jnp.zeros((b, n, self.features), dt),
            c_tape=jnp.zeros((b, n, self.features), dt),
            h_tape_proj=jnp.zeros((b, n, self.att_dim), dt),
            tape_mask=jnp.zeros((b, n), bool),
            h_tilde=jnp.zeros((b, self.features), dt),
            step=jnp.zeros((), jnp.int32),
        )

    def _intra_attention(self, carry: LSTMNCarry, x_t: Array) -> Tuple[Array, Array, Array]:
        """Returns ``(h~_t [b, F], c~_t [b, F], s^t [b, max_len] f32)``."""
        query = self.W_x(x_t) + self.W_htilde(carry.h_tilde)
        scores = self.v(jnp.tanh(carry.h_tape_proj + query[:, None, :]))[..., 0]
        weights = masked_softmax(scores, carry.tape_mask)
        return (_weighted_sum(weights, carry.h_tape),
                _weighted_sum(weights, carry.c_tape), weights)

    def _gates(self, h_tilde: Array, x_t: Array,
               extra: Optional[Array] = None) -> Tuple[Array, Array, Array, Array]:
        """``(i, f, o, c^)`` from ``[h~_t; x_t]`` plus an optional extra pre-activation."""
        z = self.W_gates_htilde(h_tilde) + self.W_gates_x(x_t)
        if extra is not None:
            z = z + extra
        i, f, o, g = jnp.split(z, 4, axis=-1)
        return nn.sigmoid(i), nn.sigmoid(f), nn.sigmoid(o), jnp.tanh(g)

    def _commit(self, carry: LSTMNCarry, h_t: Array, c_t: Array,
                h_tilde: Array, valid: Array) -> LSTMNCarry:
        """Writes ``h_t, c_t`` to slot ``step`` for valid rows and advances."""
        dt = carry.h_tape.dtype
        h_t, c_t = h_t.astype(dt), c_t.astype(dt)
        max_len = carry.tape_mask.shape[1]
        # One slot is written in place (dynamic_update_slice; a scatter under
        # vmap with a batched `step`). A one-hot select over the whole tape
        # cost six [batch, max_len, features] passes per step, forward and
        # backward: `python -m experiments.run --config
        # experiments/configs/compare.py:family=lstmn,task=text
        # --config.num_train_steps=40` logged 6.3k tokens/s with it and
        # 7.3-7.5k without, on the 2-core CPU. Past max_len the index would
        # clamp onto the last slot, so that slot's old value is written back.
        write_row = valid & (carry.step < max_len)

        def put(tape, value):
            old = jax.lax.dynamic_index_in_dim(tape, carry.step, axis=1, keepdims=False)
            value = jnp.where(write_row[:, None], value.astype(tape.dtype), old)
            return jax.lax.dynamic_update_index_in_dim(tape, value, carry.step, axis=1)

        write = (jnp.arange(max_len) == carry.step)[None, :] & valid[:, None]
        proj = self.W_h(h_t)
        return LSTMNCarry(
            h_tape=put(carry.h_tape, h_t),
            c_tape=put(carry.c_tape, c_t),
            h_tape_proj=put(carry.h_tape_proj, proj),
            tape_mask=carry.tape_mask | write,
            # Padded steps must leave no trace, so the summary is held too.
            h_tilde=jnp.where(valid[:, None], h_tilde.astype(dt), carry.h_tilde),
            step=carry.step + 1,
        )

    def _step(self, carry: LSTMNCarry, x_t: Array, valid: Array,
              gate_extra: Optional[Array] = None,
              memory_term: Optional[Array] = None) -> Tuple[LSTMNCarry, Tuple[Array, Array]]:
        """The LSTMN update; fusion cells feed the encoder in through
        ``gate_extra`` (added to gate pre-activations) and ``memory_term``
        (added to ``c_t``)."""
        h_tilde, c_tilde, weights = self._intra_attention(carry, x_t)
        i, f, o, g = self._gates(h_tilde, x_t, gate_extra)
        c_t = f * c_tilde + i * g
        if memory_term is not None:
            c_t = c_t + memory_term
        h_t = o * jnp.tanh(c_t)
        new = self._commit(carry, h_t, c_t, h_tilde, valid)
        return new, _mask_outputs(valid, h_t.astype(new.h_tape.dtype), weights)

    def __call__(self, carry: LSTMNCarry, x_t: Array, *,
                 valid: Optional[Array] = None) -> Tuple[LSTMNCarry, Tuple[Array, Array]]:
        """Runs one step.

        Args:
            carry: state from :meth:`initialize_carry` or a previous step.
            x_t: ``[batch, in_features]`` input.
            valid: optional ``[batch]`` bool; False rows (padding) are not
                written to the tape, do not update ``h~``, and output zeros.

        Returns:
            ``(new_carry, (h_t [batch, features], s^t [batch, max_len] f32))``.
        """
        return self._step(carry, x_t, _as_mask(valid, x_t.shape[:1]))


class _FusionCellBase(LSTMNCell):
    """Adds inter-attention over an encoder tape (paper Section 4).

    ``alpha_j^t = u^T tanh(W_gamma gamma_j + W_x_inter x_t + W_gammatilde
    gamma~_{t-1})``, ``p^t = softmax(alpha^t)``, ``gamma~_t = sum_j p_j^t
    gamma_j``. ``W_gamma gamma_j`` is computed once per sequence by
    ``prepare_encoder``, not per step. Inter-attention reuses
    ``attention_dim``.
    """

    def setup(self) -> None:
        super().setup()
        a = self.att_dim
        self.W_gamma = self._dense(a, self.kernel_init)
        self.W_x_inter = self._dense(a, self.kernel_init)
        self.W_gammatilde = self._dense(a, self.recurrent_kernel_init)
        self.u = self._dense(1, self.kernel_init)

    @nn.nowrap
    def initialize_carry(self, rng: Any, batch_size: int, max_len: int,  # type: ignore[override]
                         enc_features: Optional[int] = None) -> FusionCarry:
        """Empty decoder tapes and a zero ``gamma~_0`` of size ``enc_features``
        (default ``features``)."""
        d = enc_features or self.features
        return FusionCarry(
            lstmn=super().initialize_carry(rng, batch_size, max_len),
            gamma_tilde=jnp.zeros((batch_size, d), self.carry_dtype))

    def _prepare(self, enc_hidden: Array, enc_mask: Optional[Array],
                 enc_memory: Optional[Array]) -> EncoderTape:
        if enc_mask is None:
            enc_mask = jnp.ones(enc_hidden.shape[:2], bool)
        enc_mask = enc_mask.astype(bool)
        # Zero weight times a NaN or inf in a padded slot would still be NaN.
        keep = enc_mask[..., None]
        enc_hidden = jnp.where(keep, enc_hidden, 0)
        if enc_memory is not None:
            enc_memory = jnp.where(keep, enc_memory, 0)
        return EncoderTape(hidden=enc_hidden, proj=self.W_gamma(enc_hidden),
                           mask=enc_mask, memory=enc_memory)

    def _inter_attention(self, gamma_prev: Array, x_t: Array,
                         enc: EncoderTape) -> Tuple[Array, Array]:
        """Returns ``(gamma~_t [b, enc_features], p^t [b, S] f32)``."""
        query = self.W_x_inter(x_t) + self.W_gammatilde(gamma_prev)
        scores = self.u(jnp.tanh(enc.proj + query[:, None, :]))[..., 0]
        weights = masked_softmax(scores, enc.mask)
        return _weighted_sum(weights, enc.hidden), weights

    def _fusion_terms(self, gamma_tilde: Array, inter: Array, x_t: Array,
                      enc: EncoderTape) -> Tuple[Optional[Array], Optional[Array]]:
        """Hook: ``(gate_extra, memory_term)`` for :meth:`LSTMNCell._step`."""
        raise NotImplementedError

    def __call__(self, carry: FusionCarry, x_t: Array, encoder: EncoderTape, *,
                 valid: Optional[Array] = None) -> Tuple[FusionCarry, Tuple[Array, Array, Array]]:
        """One decoder step.

        Args:
            carry: from :meth:`initialize_carry` or a previous step.
            x_t: ``[batch, in_features]`` (teacher-forced) decoder input.
            encoder: from ``prepare_encoder``.
            valid: optional ``[batch]`` bool; see :meth:`LSTMNCell.__call__`.

        Returns:
            ``(new_carry, (h_t [b, F], intra [b, max_len], inter [b, S]))``,
            weights in float32.
        """
        valid = _as_mask(valid, x_t.shape[:1])
        gamma_tilde, inter = self._inter_attention(carry.gamma_tilde, x_t, encoder)
        lstmn, (h_t, intra) = self._step(
            carry.lstmn, x_t, valid, *self._fusion_terms(gamma_tilde, inter, x_t, encoder))
        prev = carry.gamma_tilde
        gamma_tilde = jnp.where(valid[:, None], gamma_tilde.astype(prev.dtype), prev)
        (inter,) = _mask_outputs(valid, inter)
        return FusionCarry(lstmn, gamma_tilde), (h_t, intra, inter)


class ShallowFusionLSTMNCell(_FusionCellBase):
    """Shallow-fusion decoder step (paper Section 4, Figure 3a).

    The decoder is an LSTMN over its own tapes; the inter-attention context
    ``gamma~_t`` is an extra gate input, i.e. the gates are
    ``W [h~_t; x_t; gamma~_t] + b`` with the new block ``W_gates_ctx`` (no
    bias). The encoder's memory tape is never read. With ``W_gates_ctx = 0``
    this is exactly :class:`LSTMNCell`.
    """

    def setup(self) -> None:
        super().setup()
        self.W_gates_ctx = self._dense(4 * self.features, self.kernel_init)

    def prepare_encoder(self, enc_hidden: Array, enc_mask: Optional[Array] = None) -> EncoderTape:
        """Projects ``enc_hidden [b, S, d]`` once; ``enc_mask [b, S]`` bool."""
        return self._prepare(enc_hidden, enc_mask, None)

    def _fusion_terms(self, gamma_tilde, inter, x_t, enc):
        return self.W_gates_ctx(gamma_tilde), None


class DeepFusionLSTMNCell(_FusionCellBase):
    """Deep-fusion decoder step (paper Section 4, Figure 3b).

    The same inter-attention weights ``p^t`` read both encoder tapes:
    ``gamma~_t = sum_j p_j gamma_j`` and ``alpha~_t = sum_j p_j alpha_j``
    (``alpha`` = encoder memory, which must have ``features`` channels). A
    gate ``r_t = sigmoid(W_r [gamma~_t; x_t])`` (``W_r`` has a bias) injects
    the encoder memory: ``c_t = r_t * alpha~_t + f_t * c~_t + i_t * c^_t``,
    ``h_t = o_t * tanh(c_t)``. The ``[i, f, o, c^]`` gates are the plain
    LSTMN ones, so ``r_t = 0`` recovers :class:`LSTMNCell` exactly.
    """

    def setup(self) -> None:
        super().setup()
        self.W_r = self._dense(self.features, self.kernel_init, use_bias=True)

    def prepare_encoder(self, enc_hidden: Array, enc_memory: Array,
                        enc_mask: Optional[Array] = None) -> EncoderTape:
        """Projects ``enc_hidden [b, S, d]`` once and keeps ``enc_memory
        [b, S, features]``; ``enc_mask [b, S]`` bool."""
        if enc_memory.shape[-1] != self.features:
            raise ValueError(f"enc_memory has {enc_memory.shape[-1]} channels; deep "
                             f"fusion adds it to a {self.features}-wide memory.")
        return self._prepare(enc_hidden, enc_mask, enc_memory)

    def _fusion_terms(self, gamma_tilde, inter, x_t, enc):
        if enc.memory is None:
            raise ValueError("Deep fusion needs the encoder memory tape.")
        alpha_tilde = _weighted_sum(inter, enc.memory)
        r = nn.sigmoid(self.W_r(jnp.concatenate(
            [gamma_tilde, x_t.astype(gamma_tilde.dtype)], axis=-1)))
        return None, r * alpha_tilde


def _scan_cell(cell: nn.Module, carry: Any, inputs: Array, valid: Array,
               *broadcast: Any) -> Tuple[Any, Any]:
    """Scans ``cell`` over axis 1 of ``inputs``/``valid``; ``broadcast`` args
    (e.g. the prepared encoder) are loop-invariant."""

    def body(mdl, c, x_t, valid_t, *rest):
        return mdl(c, x_t, *rest, valid=valid_t)

    scan = nn.scan(body, variable_broadcast="params", split_rngs={"params": False},
                   in_axes=(1, 1) + (nn.broadcast,) * len(broadcast), out_axes=1)
    return scan(cell, carry, inputs, valid, *broadcast)


class LSTMN(_LSTMNConfig):
    """LSTMN over a whole sequence (``nn.scan`` of :class:`LSTMNCell`, params
    under ``cell``). Fields as :class:`LSTMNCell`."""

    @nn.compact
    def __call__(self, inputs: Array, *, mask: Optional[Array] = None,
                 return_weights: bool = False,
                 return_memory: bool = False) -> Union[Array, Tuple[Array, ...]]:
        """Runs the LSTMN from empty tapes.

        Args:
            inputs: ``[batch, T, in_features]``.
            mask: optional ``[batch, T]`` bool, True = real token. Padded steps
                are skipped (never attended to, never change later states) and
                output zeros; padding may sit anywhere, not only at the end.
            return_weights: also return the intra-attention matrix.
            return_memory: also return the memory tape (for deep fusion).

        Returns:
            ``hidden [batch, T, features]``, followed (as a tuple, in this
            order) by ``memory [batch, T, features]`` (the final ``c_tape``,
            zeros at padding) if ``return_memory`` and ``weights [batch, T, T]``
            float32 if ``return_weights``: row ``t`` is ``s^t`` over positions
            ``< t``, so it is strictly lower-triangular and row 0 is zero.
        """
        cell = self._make_cell(LSTMNCell)
        carry = cell.initialize_carry(None, inputs.shape[0], inputs.shape[1])
        final, (hidden, weights) = _scan_cell(cell, carry, inputs, _as_mask(mask, inputs.shape[:2]))
        outs = (hidden,)
        if return_memory:
            outs += (final.c_tape,)
        if return_weights:
            outs += (weights,)
        return outs[0] if len(outs) == 1 else outs


class _FusionLayer(_LSTMNConfig):
    @nn.nowrap
    def _run(self, cell: _FusionCellBase, enc: EncoderTape, inputs: Array,
             mask: Optional[Array], return_weights: bool):
        carry = cell.initialize_carry(None, inputs.shape[0], inputs.shape[1],
                                      enc.hidden.shape[-1])
        _, (hidden, intra, inter) = _scan_cell(
            cell, carry, inputs, _as_mask(mask, inputs.shape[:2]), enc)
        return (hidden, (intra, inter)) if return_weights else hidden


class ShallowFusionLSTMN(_FusionLayer):
    """Teacher-forced shallow-fusion LSTMN decoder (scan of
    :class:`ShallowFusionLSTMNCell`, params under ``cell``)."""

    @nn.compact
    def __call__(self, inputs: Array, enc_hidden: Array, *,
                 mask: Optional[Array] = None, enc_mask: Optional[Array] = None,
                 return_weights: bool = False) -> Union[Array, Tuple[Array, Tuple[Array, Array]]]:
        """Decodes ``inputs [batch, T, in]`` against ``enc_hidden [batch, S, d]``.

        Args:
            inputs: ``[batch, T, in_features]`` shifted target embeddings.
            enc_hidden: ``[batch, S, d]`` encoder hidden states.
            mask: optional ``[batch, T]`` bool target mask.
            enc_mask: optional ``[batch, S]`` bool source mask.
            return_weights: also return attention weights.

        Returns:
            ``hidden [batch, T, features]``, or ``(hidden, (intra [batch, T, T],
            inter [batch, T, S]))`` (float32) if ``return_weights``.
        """
        cell = self._make_cell(ShallowFusionLSTMNCell)
        return self._run(cell, cell.prepare_encoder(enc_hidden, enc_mask), inputs,
                         mask, return_weights)


class DeepFusionLSTMN(_FusionLayer):
    """Teacher-forced deep-fusion LSTMN decoder (scan of
    :class:`DeepFusionLSTMNCell`, params under ``cell``)."""

    @nn.compact
    def __call__(self, inputs: Array, enc_hidden: Array, enc_memory: Array, *,
                 mask: Optional[Array] = None, enc_mask: Optional[Array] = None,
                 return_weights: bool = False) -> Union[Array, Tuple[Array, Tuple[Array, Array]]]:
        """As :meth:`ShallowFusionLSTMN.__call__`, plus ``enc_memory [batch, S,
        features]``: the encoder's memory tape, e.g. from
        ``LSTMN(..., return_memory=True)``."""
        cell = self._make_cell(DeepFusionLSTMNCell)
        return self._run(cell, cell.prepare_encoder(enc_hidden, enc_memory, enc_mask),
                         inputs, mask, return_weights)
