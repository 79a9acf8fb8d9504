"""A plain flax-linen encoder-decoder Transformer, the peer of our ``Transformer``.

Built only from flax's own layers (``nn.MultiHeadDotProductAttention``,
``nn.Dense``, ``nn.LayerNorm``, ``nn.Embed``) and flax's mask helpers
(``nn.make_attention_mask``, ``nn.make_causal_mask``), with the same dimensions
and semantics as :class:`attention.models.transformer.Transformer` in its
default post-LN form: sinusoidal positions added to embeddings scaled by
``sqrt(emb_dim)``, dropout on embeddings and sublayer outputs, attention
dropout, ``LN(x + sublayer(x))``, optional shared embeddings and logits via the
embedding. It implements ``__call__(src, tgt_in, *, train)`` so the same
train step drives both models. It exists for benchmarks only (no decoding).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

PAD = 0


@dataclasses.dataclass(frozen=True)
class FlaxTransformerConfig:
  """Hyperparameters, named as in ``TransformerConfig``.

  Attributes:
    vocab_size: source vocabulary size.
    output_vocab_size: target vocabulary size (default ``vocab_size``).
    share_embeddings: one table for source and target tokens.
    logits_via_embedding: logits ``x @ E_tgt^T`` instead of a ``Dense``.
    dtype: computation dtype (logits are returned as float32).
    param_dtype: parameter dtype.
    emb_dim: model width.
    num_heads: attention heads.
    num_layers: encoder layers (and decoder layers unless overridden).
    num_decoder_layers: decoder layers (default ``num_layers``).
    qkv_dim: total query/key/value width.
    mlp_dim: feed-forward inner width.
    max_len: longest sequence.
    dropout_rate: embedding and residual dropout.
    attention_dropout_rate: dropout on attention weights.
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

  @classmethod
  def from_ours(cls, cfg: Any) -> "FlaxTransformerConfig":
    """Copies the shared fields of a ``TransformerConfig``."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{n: getattr(cfg, n) for n in names if hasattr(cfg, n)})


def _positions(max_len: int, dim: int) -> np.ndarray:
  """``[max_len, dim]``: sin on even columns, cos on odd ones, timescale 10000."""
  pos = np.arange(max_len, dtype=np.float64)[:, None]
  rate = np.exp(-math.log(10000.0) * np.arange(0, dim, 2, dtype=np.float64) / dim)
  table = np.zeros((max_len, dim), np.float32)
  table[:, 0::2] = np.sin(pos * rate)
  table[:, 1::2] = np.cos(pos * rate)
  return table


class _Block(nn.Module):
  """One post-LN layer: self-attention, optional cross-attention, feed-forward."""

  config: FlaxTransformerConfig
  cross: bool

  def _attention(self, name: str) -> nn.MultiHeadDotProductAttention:
    cfg = self.config
    return nn.MultiHeadDotProductAttention(
        num_heads=cfg.num_heads, qkv_features=cfg.qkv_dim, out_features=cfg.emb_dim,
        dtype=cfg.dtype, param_dtype=cfg.param_dtype, broadcast_dropout=False,
        dropout_rate=cfg.attention_dropout_rate,
        kernel_init=nn.initializers.xavier_uniform(), bias_init=nn.initializers.zeros_init(),
        name=name)

  def _add_norm(self, x: jax.Array, y: jax.Array, name: str, deterministic: bool) -> jax.Array:
    cfg = self.config
    y = nn.Dropout(cfg.dropout_rate)(y, deterministic=deterministic)
    return nn.LayerNorm(dtype=cfg.dtype, param_dtype=cfg.param_dtype, name=name)(x + y)

  @nn.compact
  def __call__(self, x: jax.Array, self_mask: jax.Array, memory: jax.Array | None,
               cross_mask: jax.Array | None, *, deterministic: bool) -> jax.Array:
    """``x [B, T, D]``, masks ``[B, 1, T, T]`` / ``[B, 1, T, S]`` -> ``[B, T, D]``."""
    cfg = self.config
    y = self._attention("self_attention")(x, mask=self_mask, deterministic=deterministic)
    x = self._add_norm(x, y, "self_attention_norm", deterministic)
    if self.cross:
      y = self._attention("cross_attention")(x, memory, mask=cross_mask,
                                             deterministic=deterministic)
      x = self._add_norm(x, y, "cross_attention_norm", deterministic)
    dense = lambda n, name: nn.Dense(n, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                                     kernel_init=nn.initializers.xavier_uniform(), name=name)
    y = dense(cfg.emb_dim, "mlp_out")(nn.relu(dense(cfg.mlp_dim, "mlp_in")(x)))
    return self._add_norm(x, y, "mlp_norm", deterministic)


class FlaxTransformer(nn.Module):
  """Encoder-decoder Transformer from flax's stock layers (benchmark peer)."""

  config: FlaxTransformerConfig

  def setup(self):
    cfg = self.config
    embed = lambda n, name: nn.Embed(
        n, cfg.emb_dim, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
        embedding_init=nn.initializers.normal(stddev=cfg.emb_dim ** -0.5), name=name)
    tgt_vocab = cfg.output_vocab_size or cfg.vocab_size
    if cfg.share_embeddings:
      self.src_embed = self.tgt_embed = embed(cfg.vocab_size, "embedding")
    else:
      self.src_embed = embed(cfg.vocab_size, "src_embedding")
      self.tgt_embed = embed(tgt_vocab, "tgt_embedding")
    self.encoder_layers = [_Block(cfg, cross=False, name=f"encoder_{i}")
                           for i in range(cfg.num_layers)]
    self.decoder_layers = [_Block(cfg, cross=True, name=f"decoder_{i}")
                           for i in range(cfg.num_decoder_layers or cfg.num_layers)]
    if not cfg.logits_via_embedding:
      self.logits_dense = nn.Dense(tgt_vocab, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                                   kernel_init=nn.initializers.xavier_uniform())
    self.dropout = nn.Dropout(cfg.dropout_rate)

  def _inputs(self, embed: nn.Embed, tokens: jax.Array, deterministic: bool) -> jax.Array:
    cfg = self.config
    x = embed(tokens) * jnp.asarray(math.sqrt(cfg.emb_dim), cfg.dtype)
    x = x + jnp.asarray(_positions(cfg.max_len, cfg.emb_dim)[:tokens.shape[1]], x.dtype)
    return self.dropout(x, deterministic=deterministic)

  def __call__(self, src: jax.Array, tgt_in: jax.Array, *, train: bool = False) -> jax.Array:
    """``src [B, S]``, ``tgt_in [B, T]`` int32 -> ``logits [B, T, V]`` float32."""
    deterministic = not train
    src_real = src != PAD
    x = self._inputs(self.src_embed, src, deterministic)
    enc_mask = nn.make_attention_mask(src_real, src_real, dtype=jnp.bool_)
    for layer in self.encoder_layers:
      x = layer(x, enc_mask, None, None, deterministic=deterministic)
    memory = x
    # Causal self-attention only; cross-attention masks padded source keys.
    causal = nn.make_causal_mask(tgt_in, dtype=jnp.bool_)
    cross = nn.make_attention_mask(jnp.ones_like(tgt_in, jnp.bool_), src_real, dtype=jnp.bool_)
    y = self._inputs(self.tgt_embed, tgt_in, deterministic)
    for layer in self.decoder_layers:
      y = layer(y, causal, memory, cross, deterministic=deterministic)
    logits = self.tgt_embed.attend(y) if self.config.logits_via_embedding else self.logits_dense(y)
    return logits.astype(jnp.float32)
