"""attention: the classic attention mechanisms as reusable Flax (Linen) modules."""
from attention.core import dot_product_attention, dot_product_attention_weights, default_implementation
from attention.multi_head import MultiHeadAttention
from attention.positional import (
    LearnedPositionalEmbedding,
    SinusoidalPositionalEncoding,
    apply_rotary,
    sinusoidal_table,
)
