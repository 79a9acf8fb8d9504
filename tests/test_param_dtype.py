"""Every recurrent model initialises with ``param_dtype=bfloat16`` (pure bf16 training).

flax's orthogonal initializer runs a QR decomposition that has no bfloat16
kernel; the recurrent kernels use :func:`attention.initializers.orthogonal`,
which draws in float32 and casts, so they are exactly the float32 ones rounded.
(Other initializers draw in bf16 directly, so their values differ.)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention.initializers import orthogonal
from attention.models.base import BOS, EOS
from attention.models.lstm_lm import LSTMLanguageModel
from attention.models.lstmn import LSTMNLanguageModel, LSTMNSeq2Seq
from attention.models.luong_seq2seq import LuongSeq2Seq
from attention.models.rnn_encdec import RNNEncDec
from attention.models.rnnsearch import RNNSearch

V, E, H = 9, 8, 8
# Recurrent kernels: flax's GRU and LSTM cells, the LSTMN cells.
RECURRENT = {"hr", "hz", "hn", "hi", "hf", "hg", "ho", "W_h", "W_htilde",
             "W_gates_htilde", "W_gammatilde"}
SRC = jnp.array([[4, 5, 6, EOS], [7, EOS, 0, 0]], jnp.int32)
TGT_IN = jnp.array([[BOS, 6, 5, 4], [BOS, 7, 0, 0]], jnp.int32)

MODELS = {
    "rnn_encdec": (lambda **kw: RNNEncDec(V, V, emb_dim=E, hidden_dim=H, **kw), (SRC, TGT_IN)),
    "rnnsearch": (lambda **kw: RNNSearch(V, V, emb_dim=E, hidden_dim=H, **kw), (SRC, TGT_IN)),
    "luong": (lambda **kw: LuongSeq2Seq(V, V, emb_dim=E, hidden_dim=H, **kw), (SRC, TGT_IN)),
    "lstmn_seq2seq": (lambda **kw: LSTMNSeq2Seq(V, V, emb_dim=E, hidden_dim=H, **kw),
                      (SRC, TGT_IN)),
    "lstmn_lm": (lambda **kw: LSTMNLanguageModel(V, emb_dim=E, hidden_dim=H, **kw), (TGT_IN,)),
    "lstm_lm": (lambda **kw: LSTMLanguageModel(V, emb_dim=E, hidden_dim=H, **kw), (TGT_IN,)),
}


def test_orthogonal_is_flax_draw_cast():
  key = jax.random.key(3)
  want = jax.nn.initializers.orthogonal()(key, (6, 6), jnp.float32)
  got = orthogonal()(key, (6, 6), jnp.bfloat16)
  assert got.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want.astype(jnp.bfloat16)))
  np.testing.assert_allclose(np.asarray(want.T @ want), np.eye(6), atol=1e-5)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_bf16_init_and_recurrent_kernels_are_the_float32_ones_rounded(name):
  make, args = MODELS[name]
  key = jax.random.key(0)
  f32 = make().init(key, *args)["params"]
  bf16 = make(param_dtype=jnp.bfloat16).init(key, *args)["params"]
  assert jax.tree.structure(f32) == jax.tree.structure(bf16)
  recurrent = 0
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(f32), jax.tree.leaves(bf16)):
    assert b.dtype == jnp.bfloat16
    if RECURRENT & {getattr(k, "key", None) for k in path}:
      recurrent += 1
      np.testing.assert_array_equal(np.asarray(b), np.asarray(a.astype(jnp.bfloat16)))
  assert recurrent > 0
  logits = make(param_dtype=jnp.bfloat16, dtype=jnp.bfloat16).apply({"params": bf16}, *args)
  assert np.all(np.isfinite(np.asarray(logits, np.float32)))
