"""Luong et al. 2015 attention seq2seq on Multi30k de->en.

    python -m experiments.run --config experiments/configs/luong_mt.py \
        --workdir /tmp/luong_mt --config.data.dir=/path/to/multi30k \
        --config.model.score=dot --config.model.mode=local-p

2-layer LSTMs, attentional hidden state tanh(W_c[c;h]), input feeding.
Arg: ``data`` (multi30k or a synthetic task), ``tiny`` for a smoke run.
The sweep is Luong Table 4: score x {global, local-p}.
"""

from experiments.configs import common
from experiments.configs.rnnsearch_mt import rnn_model, rnn_run


def get_config(arg: str | None = None):
  arg = common.parse_arg(arg, data="multi30k", tiny=False)
  c = common.base_config()
  c.model = rnn_model("luong", num_layers=2, score="general", mode="global", window=10,
                      input_feeding=True)
  del c.model["maxout"]
  rnn_run(c, arg, dict(emb_dim=32, hidden_dim=32))
  return c


def get_sweep(add):
  for score in ("dot", "general", "concat"):
    for mode in ("global", "local-p"):
      add(**{"model.score": score, "model.mode": mode})
