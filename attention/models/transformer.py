"""The Transformer of Vaswani et al. (2017), "Attention Is All You Need".

``Transformer`` is the encoder-decoder for translation; it implements the
seq2seq protocol of :mod:`attention.models.base` (``encode``,
``init_decode_state``, ``decode_step``, ``__call__``) with its decoder state in
a key/value cache (``decode_collections = ("cache",)``). ``TransformerLM`` is
the decoder alone, a causal language model.

As in the paper: sinusoidal positions added to embeddings scaled by
``sqrt(emb_dim)``, dropout on the embeddings and on every sublayer output
before the residual add, attention dropout, post-LN (``LN(x + sublayer(x))``).
``pre_ln=True`` gives the pre-LN variant (``x + sublayer(LN(x))``, plus a final
LayerNorm on each stack), which trains without warm-up. Dropout masks come
from :mod:`attention.dropout` (16 random bits per element, a quarter of the
RNG work of ``flax.linen.Dropout``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from attention.dropout import Dropout
from attention.models.base import PAD
from attention.multi_head import MultiHeadAttention
from attention.positional import SinusoidalPositionalEncoding
from attention.projection import projection_dot_general

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """Hyperparameters; field names follow flax's ``examples/wmt`` where they overlap.

  Attributes:
    vocab_size: source (and, when shared, target) vocabulary size.
    output_vocab_size: target vocabulary size (default ``vocab_size``).
    share_embeddings: one embedding table for source and target tokens
      (needs equal vocabularies).
    logits_via_embedding: output logits are ``x @ E_tgt^T`` instead of a
      separate ``Dense``; with ``share_embeddings`` all three are one matrix.
    dtype: computation dtype; ``jnp.bfloat16`` gives bf16 compute with
      ``param_dtype`` parameters. Logits are always returned as float32.
    param_dtype: parameter dtype.
    emb_dim: model width ``d_model``.
    num_heads: attention heads.
    num_layers: encoder layers (and decoder layers unless overridden).
    num_decoder_layers: decoder layers (default ``num_layers``).
    qkv_dim: total query/key/value width across heads.
    mlp_dim: inner width of the position-wise feed-forward block.
    max_len: longest sequence (positions table and decode cache limit).
    dropout_rate: embedding and residual dropout.
    attention_dropout_rate: dropout on attention weights.
    deterministic: disable dropout even when called with ``train=True``.
    kernel_init: initialiser of Dense/attention kernels.
    bias_init: initialiser of biases.
    pre_ln: pre-LayerNorm blocks (default: post-LN, as in the paper).
    implementation: attention backend for :func:`attention.dot_product_attention`
      (``"xla"``, ``"chunked"``, ``"cudnn"``, ``"cpu_flash"`` or None = automatic).
  """

  vocab_size: int
  output_vocab_size: int | None = None
  share_embeddings: bool = False
  logits_via_embedding: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  emb_dim: int = 512
  num_heads: int = 8
  num_layers: int = 6
  num_decoder_layers: int | None = None
  qkv_dim: int = 512
  mlp_dim: int = 2048
  max_len: int = 256
  dropout_rate: float = 0.1
  attention_dropout_rate: float = 0.1
  deterministic: bool = False
  kernel_init: Callable = nn.initializers.xavier_uniform()
  bias_init: Callable = nn.initializers.zeros_init()
  pre_ln: bool = False
  implementation: str | None = None

  @property
  def target_vocab_size(self) -> int:
    return self.output_vocab_size or self.vocab_size

  @property
  def decoder_layers(self) -> int:
    return self.num_decoder_layers or self.num_layers

  def replace(self, **changes: Any) -> "TransformerConfig":
    return dataclasses.replace(self, **changes)


def _embed(cfg: TransformerConfig, num: int) -> nn.Embed:
  # std d^-1/2 and a sqrt(d) scale on lookup give unit-variance inputs while
  # keeping the tied output logits x @ E^T of order one.
  return nn.Embed(num, cfg.emb_dim, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                  embedding_init=nn.initializers.normal(stddev=cfg.emb_dim ** -0.5))


class _Sublayers(nn.Module):
  """Shared residual/LayerNorm/attention plumbing of encoder and decoder layers."""

  config: TransformerConfig

  def _norm(self, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(dtype=self.config.dtype, param_dtype=self.config.param_dtype,
                        name=name)

  def _attention_kwargs(self) -> dict[str, Any]:
    cfg = self.config
    return dict(num_heads=cfg.num_heads, qkv_features=cfg.qkv_dim,
                out_features=cfg.emb_dim, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                kernel_init=cfg.kernel_init, bias_init=cfg.bias_init,
                broadcast_dropout=False, dropout_rate=cfg.attention_dropout_rate,
                implementation=cfg.implementation)

  def _residual(self, x: Array, sublayer: Callable[[Array], Array], name: str,
                deterministic: bool) -> Array:
    """Post-LN ``LN(x + drop(f(x)))`` or pre-LN ``x + drop(f(LN(x)))``."""
    drop = Dropout(self.config.dropout_rate)
    if self.config.pre_ln:
      return x + drop(sublayer(self._norm(f"{name}_norm")(x)), deterministic=deterministic)
    return self._norm(f"{name}_norm")(x + drop(sublayer(x), deterministic=deterministic))

  def _mlp(self, x: Array) -> Array:
    cfg = self.config
    dense = functools.partial(nn.Dense, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                              kernel_init=cfg.kernel_init, bias_init=cfg.bias_init,
                              dot_general=projection_dot_general)
    return dense(cfg.emb_dim, name="mlp_out")(nn.relu(dense(cfg.mlp_dim, name="mlp_in")(x)))


class EncoderLayer(_Sublayers):
  """Self-attention then feed-forward, each wrapped in a residual block."""

  @nn.compact
  def __call__(self, x: Array, mask: Array, *, deterministic: bool) -> Array:
    """``x [B, S, D]``, ``mask [B, 1, S, S]`` boolean -> ``[B, S, D]``."""
    attn = MultiHeadAttention(**self._attention_kwargs(), name="self_attention")
    x = self._residual(x, lambda h: attn(h, mask=mask, deterministic=deterministic),
                       "self_attention", deterministic)
    return self._residual(x, self._mlp, "mlp", deterministic)


class DecoderLayer(_Sublayers):
  """Causal self-attention, cross-attention (unless ``memory`` is None), feed-forward."""

  @nn.compact
  def __call__(self, x: Array, memory: Array | None, memory_mask: Array | None, *,
               deterministic: bool, decode: bool = False,
               return_weights: bool = False) -> tuple[Array, Array | None]:
    """Applies the layer.

    Args:
      x: ``[B, T, D]`` decoder inputs (``T`` new tokens when ``decode``).
      memory: ``[B, S, D]`` encoder outputs, or None (decoder-only LM).
      memory_mask: ``[B, S]`` boolean, True at real source tokens.
      deterministic: disables dropout.
      decode: read/extend the key/value cache instead of attending ``x`` alone.
      return_weights: also return cross-attention weights.

    Returns:
      ``([B, T, D], weights [B, heads, T, S] or None)``.
    """
    kwargs = self._attention_kwargs()
    self_attn = MultiHeadAttention(**kwargs, decode=decode, name="self_attention")
    x = self._residual(
        x, lambda h: self_attn(h, deterministic=deterministic, is_causal=not decode),
        "self_attention", deterministic)
    weights = None
    if memory is not None:
      # Key-only mask: every target row (padding included) sees the real
      # source tokens, so decode steps and full passes build the same mask.
      mask = memory_mask[:, None, None, :]
      cross = MultiHeadAttention(**kwargs, name="cross_attention")

      def cross_sublayer(h: Array) -> Array:
        nonlocal weights
        out = cross(h, memory, mask=mask, deterministic=deterministic)
        if return_weights:
          # Re-run the bound layer's parameters in a throw-away apply whose
          # 'intermediates' are mutable: MHA's own sow_weights then gives the
          # exact weights whatever the caller made mutable. Under jit XLA
          # drops the unused value/output projections of this second call.
          detached = MultiHeadAttention(**kwargs, parent=None)
          _, sown = detached.apply({"params": cross.variables["params"]}, h, memory,
                                   mask=mask, deterministic=True, sow_weights=True,
                                   mutable="intermediates")
          weights = sown["intermediates"]["attention_weights"][0]
        return out

      x = self._residual(x, cross_sublayer, "cross_attention", deterministic)
    return self._residual(x, self._mlp, "mlp", deterministic), weights


class Encoder(nn.Module):
  """Embedding, positions and ``num_layers`` encoder layers."""

  config: TransformerConfig
  embed: nn.Module

  @nn.compact
  def __call__(self, src: Array, *, deterministic: bool) -> Array:
    """``src [B, S]`` int -> ``[B, S, emb_dim]``."""
    cfg = self.config
    x = self.embed(src) * jnp.asarray(math.sqrt(cfg.emb_dim), cfg.dtype)
    x = SinusoidalPositionalEncoding(max_len=cfg.max_len)(x)
    x = Dropout(cfg.dropout_rate)(x, deterministic=deterministic)
    real = src != PAD
    mask = nn.make_attention_mask(real, real, dtype=jnp.bool_)
    for i in range(cfg.num_layers):
      x = EncoderLayer(cfg, name=f"layer_{i}")(x, mask, deterministic=deterministic)
    if cfg.pre_ln:
      x = nn.LayerNorm(dtype=cfg.dtype, param_dtype=cfg.param_dtype, name="final_norm")(x)
    return x


class Decoder(nn.Module):
  """Embedding, positions, decoder layers and the output projection.

  With ``decode=True`` the self-attention layers use their key/value caches in
  the ``cache`` collection, and the next position is kept there too, so one
  call may feed one token or a prefix of several.
  """

  config: TransformerConfig
  embed: nn.Module

  @nn.compact
  def __call__(self, tokens: Array, memory: Array | None = None,
               memory_mask: Array | None = None, *, deterministic: bool,
               decode: bool = False, return_weights: bool = False
               ) -> tuple[Array, Array | None]:
    """Maps ``tokens [B, T]`` to logits and cross-attention weights.

    Returns:
      ``(logits [B, T, V] float32, weights [B, layers, heads, T, S] or None)``.
    """
    cfg = self.config
    length = tokens.shape[-1]
    positions = None
    if decode:
      is_init = not self.has_variable("cache", "position")
      position = self.variable("cache", "position", lambda: jnp.zeros((), jnp.int32))
      if not is_init:  # the init pass only shapes the cache; it must not advance it
        positions = position.value + jnp.arange(length, dtype=jnp.int32)
        position.value = position.value + length
    x = self.embed(tokens) * jnp.asarray(math.sqrt(cfg.emb_dim), cfg.dtype)
    x = SinusoidalPositionalEncoding(max_len=cfg.max_len)(x, positions)
    x = Dropout(cfg.dropout_rate)(x, deterministic=deterministic)
    all_weights = []
    for i in range(cfg.decoder_layers):
      x, w = DecoderLayer(cfg, name=f"layer_{i}")(
          x, memory, memory_mask, deterministic=deterministic, decode=decode,
          return_weights=return_weights)
      all_weights.append(w)
    if cfg.pre_ln:
      x = nn.LayerNorm(dtype=cfg.dtype, param_dtype=cfg.param_dtype, name="final_norm")(x)
    if cfg.logits_via_embedding:
      logits = self.embed.attend(x)
    else:
      logits = nn.Dense(cfg.target_vocab_size, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                        kernel_init=cfg.kernel_init, bias_init=cfg.bias_init,
                        dot_general=projection_dot_general, name="logits_dense")(x)
    weights = jnp.stack(all_weights, axis=1) if return_weights and memory is not None else None
    return logits.astype(jnp.float32), weights


def _check_decode_len(cfg: TransformerConfig, max_len: int) -> None:
  if max_len > cfg.max_len:
    raise ValueError(f"decoding {max_len} steps needs config.max_len >= {max_len},"
                     f" got {cfg.max_len}.")


class Transformer(nn.Module):
  """Encoder-decoder Transformer implementing the seq2seq protocol.

  Parameters: ``embedding`` (shared) or ``src_embedding``/``tgt_embedding``,
  ``encoder``, ``decoder`` (which holds ``logits_dense`` unless
  ``logits_via_embedding``).
  """

  config: TransformerConfig
  decode_collections: ClassVar[tuple[str, ...]] = ("cache",)

  def setup(self):
    cfg = self.config
    if cfg.share_embeddings:
      if cfg.target_vocab_size != cfg.vocab_size:
        raise ValueError("share_embeddings needs output_vocab_size == vocab_size, got"
                         f" {cfg.output_vocab_size} and {cfg.vocab_size}.")
      self.embedding = _embed(cfg, cfg.vocab_size)
      src_embed = tgt_embed = self.embedding
    else:
      self.src_embedding = _embed(cfg, cfg.vocab_size)
      self.tgt_embedding = _embed(cfg, cfg.target_vocab_size)
      src_embed, tgt_embed = self.src_embedding, self.tgt_embedding
    self.encoder = Encoder(cfg, src_embed)
    self.decoder = Decoder(cfg, tgt_embed)

  def _deterministic(self, train: bool) -> bool:
    return self.config.deterministic or not train

  def encode(self, src: Array, *, train: bool = False) -> dict[str, Array]:
    """``src [B, S]`` -> ``{'encoded': [B, S, emb_dim], 'mask': [B, S] bool}``."""
    encoded = self.encoder(src, deterministic=self._deterministic(train))
    return {"encoded": encoded, "mask": src != PAD}

  def init_decode_state(self, memory: dict[str, Array], max_len: int) -> None:
    """Creates the ``cache`` collection for ``max_len`` steps (apply with ``mutable=['cache']``).

    Runs the decoder once over ``max_len`` dummy tokens, which is how Flax
    attention layers size their caches; the cache itself is zeros, so under
    jit this pass is dead code and costs nothing.
    """
    _check_decode_len(self.config, max_len)
    batch = memory["encoded"].shape[0]
    self.decoder(jnp.full((batch, max_len), PAD, jnp.int32), memory["encoded"],
                 memory["mask"], deterministic=True, decode=True)

  def decode_step(self, tokens: Array, state: Any, memory: dict[str, Array]
                  ) -> tuple[Array, Any, dict[str, Array]]:
    """One cached decoder step (apply with the cache and ``mutable=['cache']``).

    Args:
      tokens: ``[N]`` int32, the previous output tokens.
      state: unused (the state is the ``cache`` collection); passed through.
      memory: :meth:`encode` output with ``N`` rows.

    Returns:
      ``(logits [N, V] float32, state, {'cross': [N, layers, heads, S]})``.
    """
    logits, weights = self.decoder(tokens[:, None], memory["encoded"], memory["mask"],
                                   deterministic=True, decode=True, return_weights=True)
    return logits[:, 0], state, {"cross": weights[:, :, :, 0]}

  def __call__(self, src: Array, tgt_in: Array, *, train: bool = False,
               return_alignments: bool = False
               ) -> Array | tuple[Array, dict[str, Array]]:
    """Teacher-forced pass.

    Args:
      src: ``[B, S]`` int32 source tokens, ``PAD``-padded.
      tgt_in: ``[B, T]`` int32 ``BOS``-shifted target tokens.
      train: enables dropout (needs a ``'dropout'`` rng).
      return_alignments: also return cross-attention weights.

    Returns:
      ``logits [B, T, V]`` float32, or ``(logits, {'cross': [B, layers, heads, T, S]})``.
      Padded source positions get exactly zero weight.
    """
    memory = self.encode(src, train=train)
    logits, weights = self.decoder(
        tgt_in, memory["encoded"], memory["mask"], deterministic=self._deterministic(train),
        return_weights=return_alignments)
    if return_alignments:
      return logits, {"cross": weights}
    return logits


class TransformerLM(nn.Module):
  """Decoder-only causal language model (the decoder stack without cross-attention).

  Uses ``vocab_size`` for input and output; ``logits_via_embedding`` ties the
  output projection to the embedding.
  """

  config: TransformerConfig
  decode_collections: ClassVar[tuple[str, ...]] = ("cache",)

  def setup(self):
    self.embedding = _embed(self.config, self.config.vocab_size)
    self.decoder = Decoder(self.config.replace(output_vocab_size=self.config.vocab_size),
                           self.embedding)

  def __call__(self, tokens: Array, *, train: bool = False) -> Array:
    """``tokens [B, T]`` int32 -> next-token logits ``[B, T, V]`` float32."""
    logits, _ = self.decoder(tokens, deterministic=self.config.deterministic or not train)
    return logits

  def init_decode_state(self, batch_size: int, max_len: int) -> None:
    """Creates the ``cache`` collection (apply with ``mutable=['cache']``)."""
    _check_decode_len(self.config, max_len)
    self.decoder(jnp.full((batch_size, max_len), PAD, jnp.int32), deterministic=True,
                 decode=True)

  def decode_step(self, tokens: Array, state: Any = None, memory: Any = None
                  ) -> tuple[Array, Any, dict[str, Array]]:
    """Feeds ``tokens [N]`` (one step) or ``[N, n]`` (a prefix) through the cache.

    Apply with the cache and ``mutable=['cache']``. Returns
    ``(logits [N, V] or [N, n, V], state, {})``; ``state`` and ``memory`` are
    unused, so :mod:`attention.decoding`'s searches can drive the LM too.
    """
    one = tokens.ndim == 1
    logits, _ = self.decoder(tokens[:, None] if one else tokens, deterministic=True,
                             decode=True)
    return (logits[:, 0] if one else logits), state, {}
