"""RNNencdec (Cho et al. 2014; Bahdanau's baseline without attention) on Multi30k de->en.

    python -m experiments.run --config experiments/configs/rnnencdec_mt.py \
        --workdir /tmp/rnnencdec_mt --config.data.dir=/path/to/multi30k

The control for the attention models: the whole source is squeezed into one vector.
Arg: ``data`` (multi30k or a synthetic task), ``tiny`` for a smoke run.
"""

from experiments.configs import common
from experiments.configs.rnnsearch_mt import rnn_model, rnn_run


def get_config(arg: str | None = None):
  arg = common.parse_arg(arg, data="multi30k", tiny=False)
  c = common.base_config()
  c.model = rnn_model("rnnencdec")
  rnn_run(c, arg, dict(emb_dim=32, hidden_dim=32))
  c.num_plot_examples = 0           # no attention, nothing to plot
  return c


def get_sweep(add):
  for lr in (5e-4, 1e-3):
    add(learning_rate=lr)
