"""Transformer (Vaswani et al. 2017) on Multi30k de->en, at the sizes of common Multi30k baselines.

    python -m experiments.run --config experiments/configs/transformer_mt.py \
        --workdir /tmp/transformer_mt --config.data.dir=/path/to/multi30k

d_model 256, 3+3 layers, 8 heads, ff 512, Adam, batch 128, beam 4 with alpha 0.6.
Arg (``transformer_mt.py:size=tiny,data=reverse,tiny``): ``size`` in tiny|multi30k|base,
``data`` multi30k or a synthetic task, ``tiny`` for a seconds-long smoke run.
"""

from experiments.configs import common


def get_config(arg: str | None = None):
  arg = common.parse_arg(arg, size="multi30k", data="multi30k", tiny=False)
  c = common.base_config()
  c.model = common.transformer_model(arg.size)
  c.model.share_embeddings = arg.data == "multi30k"
  c.model.logits_via_embedding = arg.data == "multi30k"
  c.data = common.translation_data(arg)
  c.batch_size = 128
  c.num_train_steps = 2300          # ~10 epochs of Multi30k's 29k pairs
  c.learning_rate = 5e-4 * 4        # rsqrt peak; decays to ~5e-4 by the end
  c.warmup_steps = 300
  c.eval_every_steps = 500
  c.checkpoint_every_steps = 500
  c.decode.beam_size = 4
  c.decode.max_extra = 10
  if arg.tiny:
    common.tiny_run(c)
  return c


def get_sweep(add):
  """Learning rate x warm-up (``python -m launch.sweep`` expands it)."""
  for lr in (1e-3, 2e-3):
    for warmup in (300, 1000):
      add(learning_rate=lr, warmup_steps=warmup)
