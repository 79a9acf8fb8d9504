"""LSTMN encoder-decoder (Cheng, Dong & Lapata 2016) on Multi30k de->en.

    python -m experiments.run --config experiments/configs/lstmn_mt.py \
        --workdir /tmp/lstmn_mt --config.data.dir=/path/to/multi30k --config.model.fusion=shallow

Intra-attention over each side's own tapes, inter-attention over the encoder,
with deep (default) or shallow fusion.
Arg: ``data`` (multi30k or a synthetic task), ``tiny`` for a smoke run.
"""

from experiments.configs import common
from experiments.configs.rnnsearch_mt import rnn_model, rnn_run


def get_config(arg: str | None = None):
  arg = common.parse_arg(arg, data="multi30k", tiny=False)
  c = common.base_config()
  c.model = rnn_model("lstmn", fusion="deep", max_len=128)
  del c.model["maxout"]
  rnn_run(c, arg, dict(emb_dim=32, hidden_dim=32, max_len=32))
  return c


def get_sweep(add):
  for fusion in ("deep", "shallow"):
    add(**{"model.fusion": fusion})
