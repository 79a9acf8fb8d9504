"""Vaswani et al. 2017 Table 3 (A): 1, 4, 8 or 16 heads at a fixed compute budget.

    python -m launch.sweep --config experiments/configs/vaswani_table3a.py --workdir runs/table3a \
        --extra --config.data.path=/path/to/tinyshakespeare.txt
    python -m experiments.reproduce table3a runs/table3a

d_model, layers, batch and steps stay fixed while the heads split d_model into
d_k = d_v = d_model / h, so every trial has the same parameters and FLOPs, as in the
paper's rows (A); each head count runs with three seeds (``SEEDS``), and
``experiments.reproduce table3a`` reports each row's mean ± standard deviation.
Arg: ``task`` (``text``: character LM, the default, pass ``--config.data.path``;
``multi30k``: translation, pass ``--config.data.dir``), ``size`` (small, the
default; tiny for smoke runs).
"""

from experiments.configs import common
from experiments.configs import compare


def get_config(arg: str | None = None):
  arg = common.parse_arg(arg, size="small", task="text")
  return compare.get_config(f"family=transformer,task={arg.task},size={arg.size}")


# Three seeds per head count: single runs differ by about as much as neighbouring
# head counts do, and the report gives each row's mean and spread over them.
SEEDS = (0, 1, 2)


def get_sweep(add):
  for seed in SEEDS:
    for heads in (1, 4, 8, 16):
      add(**{"model.num_heads": heads, "seed": seed})
