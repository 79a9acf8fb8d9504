"""attention: the classic attention mechanisms as reusable Flax (Linen) modules.

* Vaswani et al. 2017: :func:`dot_product_attention` (xla / chunked / cudnn /
  cpu_flash backends) and :class:`MultiHeadAttention` (drop-in for flax's).
* Bahdanau et al. 2015: :class:`AdditiveAttention`.
* Luong et al. 2015: :class:`LuongAttention` (dot / general / concat;
  global / local-m / local-p).
* Cheng et al. 2016: :class:`LSTMNCell`, :class:`LSTMN` and the shallow / deep
  fusion layers.
* Positions: sinusoidal, learned and rotary.

Masks are boolean and broadcastable to ``[batch, heads, q_len, kv_len]``;
True = attend. Use flax's ``make_attention_mask`` / ``make_causal_mask`` /
``combine_masks`` to build them.
"""

from attention.additive import AdditiveAttention
from attention.core import (
    default_implementation,
    dot_product_attention,
    dot_product_attention_weights,
)
from attention.lstmn import (
    DeepFusionLSTMN,
    DeepFusionLSTMNCell,
    LSTMN,
    LSTMNCell,
    ShallowFusionLSTMN,
    ShallowFusionLSTMNCell,
)
from attention.luong import LuongAttention
from attention.multi_head import MultiHeadAttention
from attention.positional import (
    LearnedPositionalEmbedding,
    SinusoidalPositionalEncoding,
    apply_rotary,
    sinusoidal_table,
)

__all__ = [
    "AdditiveAttention", "DeepFusionLSTMN", "DeepFusionLSTMNCell", "LSTMN",
    "LSTMNCell", "LearnedPositionalEmbedding", "LuongAttention",
    "MultiHeadAttention", "ShallowFusionLSTMN", "ShallowFusionLSTMNCell",
    "SinusoidalPositionalEncoding", "apply_rotary", "default_implementation",
    "dot_product_attention", "dot_product_attention_weights", "sinusoidal_table",
]
