"""Luong et al. 2015 Table 4: attention score x global / local-p, on Multi30k de->en.

    python -m launch.sweep --config experiments/configs/luong_table4.py --workdir runs/luong_table4 \
        --extra --config.data.dir=/path/to/multi30k
    python -m experiments.reproduce table4 runs/luong_table4

One Luong model (``experiments/configs/compare.py`` family ``luong``) per trial;
the sweep crosses dot / general / concat with global / local-p (window D=10), each
with three seeds (``SEEDS``); the report gives each cell's mean ± standard deviation.
Arg: ``size`` (small: CPU minutes per trial, the default; paper: luong_mt.py's
2-layer 512-unit model; tiny: smoke runs), ``task`` (multi30k or a synthetic task).
"""

from experiments.configs import common
from experiments.configs import compare


def get_config(arg: str | None = None):
  arg = common.parse_arg(arg, size="small", task="multi30k")
  return compare.get_config(f"family=luong,task={arg.task},size={arg.size}")


# Three seeds per cell: at CPU budgets the local-p cells move by several BLEU from
# seed to seed, and the report gives each cell's mean and spread over them.
SEEDS = (0, 1, 2)


def get_sweep(add):
  for seed in SEEDS:
    for score in ("dot", "general", "concat"):
      for mode in ("global", "local-p"):
        add(**{"model.score": score, "model.mode": mode, "seed": seed})
