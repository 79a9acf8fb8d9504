"""RNNsearch (Bahdanau et al. 2015) on Multi30k de->en.

    python -m experiments.run --config experiments/configs/rnnsearch_mt.py \
        --workdir /tmp/rnnsearch_mt --config.data.dir=/path/to/multi30k

Bidirectional GRU encoder, GRU decoder with additive attention, maxout deep
output; emb 256, hidden 512 (the sizes of common Multi30k baselines).
Arg: ``data`` (multi30k or a synthetic task), ``tiny`` for a smoke run.
"""

from ml_collections import config_dict

from experiments.configs import common


def rnn_model(name: str, **fields) -> config_dict.ConfigDict:
  m = config_dict.ConfigDict()
  m.name = name
  m.emb_dim = 256
  m.hidden_dim = 512
  m.num_layers = 1
  m.dropout_rate = 0.2
  m.maxout = True
  m.dtype = "float32"
  m.update(fields)
  return m


def rnn_run(c, arg, tiny_dims: dict) -> None:
  c.data = common.translation_data(arg)
  c.batch_size = 128
  c.num_train_steps = 3000
  c.schedule = "constant"
  c.learning_rate = 1e-3
  c.warmup_steps = 100
  c.label_smoothing = 0.0
  c.grad_clip_norm = 1.0
  c.eval_every_steps = 500
  c.checkpoint_every_steps = 500
  c.decode.beam_size = 4
  if arg.tiny:
    common.tiny_run(c)
    c.model.update(tiny_dims)


def get_config(arg: str | None = None):
  arg = common.parse_arg(arg, data="multi30k", tiny=False)
  c = common.base_config()
  c.model = rnn_model("rnnsearch", attention_dim=512)
  rnn_run(c, arg, dict(emb_dim=32, hidden_dim=32, attention_dim=32))
  return c


def get_sweep(add):
  for lr in (5e-4, 1e-3):
    add(learning_rate=lr)
