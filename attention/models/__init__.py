"""Sequence models built from the attention modules, sharing one seq2seq protocol.

See :mod:`attention.models.base` for the protocol and the token conventions.
"""
from attention.models.base import (
    BOS,
    BOS_ID,
    EOS,
    EOS_ID,
    PAD,
    PAD_ID,
    Seq2SeqModel,
    decode_collections,
    padding_mask,
    shift_right,
)
from attention.models.lstm_lm import LSTMLanguageModel
from attention.models.lstmn import LSTMNLanguageModel, LSTMNSeq2Seq
from attention.models.luong_seq2seq import LuongSeq2Seq
from attention.models.rnn_encdec import RNNEncDec
from attention.models.rnnsearch import RNNSearch
from attention.models.transformer import Transformer, TransformerConfig, TransformerLM
