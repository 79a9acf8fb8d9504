"""Default: a small Transformer learns to reverse sequences (built-in synthetic task).

Runs on a laptop CPU in about a minute, with nothing to download:

    python -m experiments.run --workdir /tmp/attention_default

Every other config starts from :func:`base_config` and overrides what it needs.
"""

from __future__ import annotations

from ml_collections import config_dict

from experiments.data import default_config as data_defaults


def base_config() -> config_dict.ConfigDict:
  """Fields shared by every experiment, one comment per field."""
  c = config_dict.ConfigDict()
  c.seed = 0                        # params, dropout and data order all derive from it
  c.num_train_steps = 1000          # optimizer steps
  c.batch_size = 64                 # GLOBAL batch (sentences / windows), split over devices
  c.eval_batch_size = 64            # global eval batch
  c.learning_rate = 1e-3            # peak learning rate
  c.schedule = "rsqrt"              # rsqrt (Noam) | linear | cosine | constant
  c.warmup_steps = 100              # linear warm-up steps
  c.end_learning_rate_factor = 0.0  # linear/cosine: final lr = factor * learning_rate
  c.adam_b1 = 0.9
  c.adam_b2 = 0.98
  c.adam_eps = 1e-9
  c.weight_decay = 0.0              # decoupled (AdamW) weight decay
  c.grad_clip_norm = 1.0            # global-norm clipping; 0 disables
  c.label_smoothing = 0.1
  c.grad_accum_steps = 1            # micro-batches per step (same batch; same update sans dropout)
  c.eval_every_steps = 250
  c.num_eval_batches = config_dict.placeholder(int)  # None: the whole eval set
  c.checkpoint_every_steps = 250
  c.max_checkpoints_to_keep = 2
  c.log_every_steps = 50
  c.model_parallelism = 1           # size of the mesh's 'model' axis (data axis = rest)
  c.num_plot_examples = 3           # alignment heatmaps per eval
  c.num_sample_tokens = 200         # LMs: a sampled continuation per eval (TensorBoard, samples.txt)
  c.decode = config_dict.ConfigDict()
  c.decode.enabled = True           # decode the eval set (BLEU, decoded accuracy)
  c.decode.beam_size = 1
  c.decode.alpha = 0.6              # GNMT length penalty ((5+|Y|)/6)^alpha
  c.decode.max_extra = 10           # max output length = source length + max_extra
  c.decode.num_batches = config_dict.placeholder(int)  # None: the whole eval set
  c.decode.length_buckets = (0, 10, 20, 30, 40, 50, 60)  # source-length buckets (tokens)
  c.model = config_dict.ConfigDict()
  c.data = data_defaults("reverse")
  return c


def transformer_model(size: str = "tiny") -> config_dict.ConfigDict:
  dims = {"tiny": (64, 2, 4, 128), "multi30k": (256, 3, 8, 512), "base": (512, 6, 8, 2048)}
  if size not in dims:
    raise ValueError(f"size={size!r} is unknown; use one of {sorted(dims)}.")
  emb, layers, heads, mlp = dims[size]
  m = config_dict.ConfigDict()
  m.name = "transformer"
  m.emb_dim = emb
  m.qkv_dim = emb
  m.mlp_dim = mlp
  m.num_heads = heads
  m.num_layers = layers
  m.num_decoder_layers = config_dict.placeholder(int)
  m.dropout_rate = 0.1
  m.attention_dropout_rate = 0.1
  m.share_embeddings = False
  m.logits_via_embedding = False
  m.pre_ln = False
  m.max_len = 256
  m.dtype = "float32"               # "bfloat16": bf16 compute, fp32 params
  m.implementation = config_dict.placeholder(str)  # attention backend; None = auto
  return m


def get_config(arg: str | None = None) -> config_dict.ConfigDict:
  del arg
  c = base_config()
  c.model = transformer_model("tiny")
  c.model.dropout_rate = 0.0
  c.model.attention_dropout_rate = 0.0
  c.data.max_len = 12
  c.num_train_steps = 600
  c.learning_rate = 3e-3
  c.warmup_steps = 100
  c.eval_every_steps = 200
  c.checkpoint_every_steps = 200
  return c
