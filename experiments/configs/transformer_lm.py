"""Decoder-only Transformer language model on a text file (character level by default).

    python -m experiments.run --config experiments/configs/transformer_lm.py \
        --workdir /tmp/transformer_lm --config.data.path=/path/to/tinyshakespeare.txt

Arg: ``size`` (tiny|multi30k|base widths), ``tiny`` for a smoke run on a generated file
(pass ``--config.data.path``).
"""

from experiments.configs import common


def lm_data(arg):
  d = common.data_defaults("text")
  d.tokenizer = "char"
  d.seq_len = 32 if arg.tiny else 256
  return d


def lm_run(c, arg) -> None:
  c.batch_size = 64
  c.num_train_steps = 5000
  c.learning_rate = 1e-3
  c.schedule = "cosine"
  c.warmup_steps = 200
  c.label_smoothing = 0.0
  c.eval_every_steps = 500
  c.checkpoint_every_steps = 500
  c.num_eval_batches = 20
  c.decode.enabled = False
  if arg.tiny:
    common.tiny_run(c)


def get_config(arg: str | None = None):
  arg = common.parse_arg(arg, size="multi30k", tiny=False)
  c = common.base_config()
  c.model = common.transformer_model("tiny" if arg.tiny else arg.size)
  c.model.name = "transformer_lm"
  c.data = lm_data(arg)
  lm_run(c, arg)
  return c


def get_sweep(add):
  for heads in (1, 4, 8, 16):
    add(**{"model.num_heads": heads})
