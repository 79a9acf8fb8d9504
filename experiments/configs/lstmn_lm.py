"""LSTMN language model (Cheng et al. 2016) on a text file (character level by default).

    python -m experiments.run --config experiments/configs/lstmn_lm.py \
        --workdir /tmp/lstmn_lm --config.data.path=/path/to/tinyshakespeare.txt

Arg: ``tiny`` for a smoke run (pass ``--config.data.path``).
"""

from experiments.configs import common
from experiments.configs.rnnsearch_mt import rnn_model
from experiments.configs.transformer_lm import lm_data, lm_run


def get_config(arg: str | None = None):
  arg = common.parse_arg(arg, tiny=False)
  c = common.base_config()
  c.model = rnn_model("lstmn_lm", num_layers=2, max_len=256)
  del c.model["maxout"]
  c.data = lm_data(arg)
  lm_run(c, arg)
  if arg.tiny:
    c.model.update(emb_dim=32, hidden_dim=32, max_len=40)
  return c


def get_sweep(add):
  for lr in (1e-3, 3e-3):
    add(learning_rate=lr)
