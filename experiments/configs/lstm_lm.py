"""Plain stacked-LSTM language model (no attention): the baseline of ``lstmn_lm``.

    python -m experiments.run --config experiments/configs/lstm_lm.py \
        --workdir /tmp/lstm_lm --config.data.path=/path/to/tinyshakespeare.txt

Same data and run settings as ``lstmn_lm``; at its widths (256-d embeddings,
512 units, 2 layers, 65 characters) the model has 3.72M parameters against the
LSTMN's 5.17M; ``--config.model.hidden_dim=608`` gives 5.12M for a matched-size
comparison.

Arg: ``tiny`` for a smoke run (pass ``--config.data.path``).
"""

from experiments.configs import common
from experiments.configs.rnnsearch_mt import rnn_model
from experiments.configs.transformer_lm import lm_data, lm_run


def get_config(arg: str | None = None):
  arg = common.parse_arg(arg, tiny=False)
  c = common.base_config()
  c.model = rnn_model("lstm_lm", num_layers=2)
  del c.model["maxout"]
  c.data = lm_data(arg)
  lm_run(c, arg)
  if arg.tiny:
    c.model.update(emb_dim=32, hidden_dim=32)
  return c


def get_sweep(add):
  for lr in (1e-3, 3e-3):
    add(learning_rate=lr)
