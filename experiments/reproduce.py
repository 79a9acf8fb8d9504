"""``python -m experiments.reproduce NAME ...``: the tables and figures of the classic papers.

Each reproduction is trained by a config with a sweep (or by ``experiments.compare``)
and reported by one command here, which reads only the run directories:

fig2 (Bahdanau Fig. 2: quality against source length, every family)::

    python -m experiments.compare --task reverse_long --workdir runs/fig2_reverse
    python -m experiments.compare --task multi30k --data_dir DIR --workdir runs/fig2_multi30k
    python -m experiments.reproduce fig2 runs/fig2_reverse runs/fig2_multi30k

fig3 (Bahdanau Fig. 3: RNNsearch alignments next to a Transformer cross-attention head)::

    python -m experiments.reproduce fig3 --rnnsearch runs/fig2_multi30k/rnnsearch \
        --transformer runs/fig2_multi30k/transformer --data_dir DIR --out runs/fig3

table4 (Luong Table 4: score x global/local-p)::

    python -m launch.sweep --config experiments/configs/luong_table4.py --workdir runs/table4 \
        --extra --config.data.dir=DIR
    python -m experiments.reproduce table4 runs/table4

table3a (Vaswani Table 3 (A): number of heads at fixed compute)::

    python -m launch.sweep --config experiments/configs/vaswani_table3a.py --workdir runs/table3a \
        --extra --config.data.path=tinyshakespeare.txt
    python -m experiments.reproduce table3a runs/table3a

lstmn (Cheng et al.: LSTMN vs LSTM vs Transformer LM at matched parameters)::

    python -m experiments.compare --task text --data_path tinyshakespeare.txt --workdir runs/lm
    python -m experiments.reproduce lstmn runs/lm

Every report prints Markdown and writes it (and its PNGs) next to the runs.
"""

from __future__ import annotations

import argparse
import gzip
import math
import os
import statistics
import sys
from pathlib import Path
from typing import Sequence

from experiments import comparison_report as cr


def _write(path: str, text: str) -> str:
  with open(path, "w") as f:
    f.write(text + "\n")
  print(text, flush=True)  # before the stderr line below
  print(f"wrote {path}", file=sys.stderr)
  return text


def _finished(root: str) -> list[cr.Run]:
  if not os.path.isdir(root):
    raise FileNotFoundError(f"{root}: no such run directory; train it first (see"
                            " `python -m experiments.reproduce --help`).")
  runs = [r for r in cr.find_runs(root) if r.history]
  if not runs:
    raise FileNotFoundError(f"{root}: no run with metrics.jsonl under it; train it first.")
  return runs


def _incomplete_note(runs: Sequence[cr.Run]) -> list[str]:
  """A footnote for the cells marked † (runs whose last eval is before their last step)."""
  late = [f"{r.label} ({r.incomplete})" for r in runs if r.incomplete]
  return [f"† incomplete, its last eval shown: {', '.join(late)}.", ""] if late else []


def _mean_sd(values: Sequence[float | None], digits: int = 3) -> str:
  """``mean ± sd`` (sample standard deviation) over the values logged; the mean alone for one."""
  xs = [v for v in values if v is not None]
  if not xs:
    return "–"
  if len(xs) == 1:
    return cr.fmt(xs[0], digits)
  return f"{cr.fmt(statistics.fmean(xs), digits)} ± {cr.fmt(statistics.stdev(xs), 2)}"


def _seeds_note(runs: Sequence[cr.Run], extra: str = "") -> list[str]:
  """The line saying cells are mean ± sd, when the runs have several seeds."""
  seeds = sorted({str(r.config["seed"]) for r in runs if "seed" in r.config})
  if len(seeds) < 2:
    return []
  return [f"Cells: mean ± sample standard deviation over seeds {', '.join(seeds)}{extra}.", ""]


def fig2(roots: Sequence[str]) -> str:
  """Quality by source length for each directory of family runs."""
  parts = []
  for root in roots:
    runs = _finished(root)
    metric = cr.length_metric(runs)
    name = os.path.basename(os.path.normpath(root))
    png = os.path.join(root, "fig2.png")
    drawn = cr.plot_by_length(runs, metric, png, title=f"Bahdanau Fig. 2 analogue: {name}")
    parts += [f"## {name}", "", cr.length_table(runs, metric), "",
              cr.summary_table(runs, cr.wall_seconds(root)), ""]
    if drawn:   # linked relative to fig2.md, which is written into roots[0]
      parts += [f"![{name}]({os.path.relpath(png, roots[0])})", ""]
  return _write(os.path.join(roots[0], "fig2.md"), "\n".join(parts))


def _pivot(runs: Sequence[cr.Run], row_key: str, col_key: str, cell) -> str:
  def value(r, key):
    node = r.config
    for part in key.split("."):
      node = node.get(part, {}) if isinstance(node, dict) else {}
    return node if node != {} else None
  rows = list(dict.fromkeys(value(r, row_key) for r in runs))
  cols = list(dict.fromkeys(value(r, col_key) for r in runs))
  table: dict = {}   # (row, col) -> its runs, one per seed
  for r in runs:
    table.setdefault((value(r, row_key), value(r, col_key)), []).append(r)
  body = [[str(rv)] + [cell(table[(rv, cv)]) if (rv, cv) in table else "–" for cv in cols]
          for rv in rows]
  return cr.markdown([f"{row_key} \\ {col_key}"] + [str(c) for c in cols], body)


def table4(root: str) -> str:
  """Luong Table 4 analogue: test BLEU (eval perplexity) for score x mode, mean ± sd over seeds."""
  runs = _finished(root)
  metric = "test/bleu" if any(r.get("test/bleu") is not None for r in runs) else "eval/bleu"

  def cell(group):
    ppl = [r.get("eval/perplexity") for r in group if r.get("eval/perplexity") is not None]
    return (f"{_mean_sd([r.get(metric) for r in group])}"
            f"{'†' if any(r.incomplete for r in group) else ''}"
            f" ({cr.fmt(statistics.fmean(ppl)) if ppl else '–'})")

  parts = [f"{metric} (eval perplexity in brackets)", "",
           _pivot(runs, "model.score", "model.mode", cell), ""]
  parts += _seeds_note(runs, "; perplexity: their mean") + _incomplete_note(runs)
  text = "\n".join(parts + [cr.summary_table(runs, cr.wall_seconds(root))])
  return _write(os.path.join(root, "table4.md"), text)



def table3a(root: str) -> str:
  """Vaswani Table 3 (A) analogue: one row per head count, mean ± sd over its seeds."""
  runs = _finished(root)
  by_heads: dict = {}
  for r in runs:
    by_heads.setdefault(r.config.get("model", {}).get("num_heads", 0), []).append(r)
  lm = all(r.is_lm for r in runs)
  header = ["h", "d_k = d_v", "params", "steps", "seeds", "eval loss", "eval ppl"]
  header += ["bits/token"] if lm else ["eval BLEU", "test BLEU"]
  rows = []
  for h, group in sorted(by_heads.items()):
    d = group[0].config.get("model", {}).get("qkv_dim")
    steps = sorted({str(r.final.get("step")) for r in group})
    seeds = sorted(str(r.config.get("seed", "–")) for r in group)
    losses = [r.get("eval/loss") for r in group]
    row = [f"{h}{'†' if any(r.incomplete for r in group) else ''}",
           str(d // h if h and d else "–"), cr.fmt(group[0].get("model/num_params")),
           "/".join(steps), ",".join(seeds), _mean_sd(losses, 4),
           _mean_sd([r.get("eval/perplexity") for r in group], 4)]
    row += [_mean_sd([v / math.log(2) if v is not None else None for v in losses], 4)] if lm \
        else [_mean_sd([r.get("eval/bleu") for r in group]),
              _mean_sd([r.get("test/bleu") for r in group])]
    rows.append(row)
  cr.plot_curves(runs, "eval/loss", os.path.join(root, "table3a.png"), title="heads")
  return _write(os.path.join(root, "table3a.md"),
                "\n".join([cr.markdown(header, rows), ""] + _seeds_note(runs)
                          + _incomplete_note(runs)).rstrip())


def lstmn(root: str) -> str:
  """LSTMN vs LSTM vs Transformer language models."""
  runs = _finished(root)
  cr.plot_curves(runs, "eval/loss", os.path.join(root, "lstmn.png"), title="character LM")
  return _write(os.path.join(root, "lstmn.md"), cr.summary_table(runs, cr.wall_seconds(root)))


def _read_pairs(data_dir: str, split: str, src: str, tgt: str, n: int, max_words: int
                ) -> list[tuple[str, str]]:
  def lines(lang):
    for name in (f"{split}.{lang}", f"{split}.{lang}.gz"):
      path = os.path.join(data_dir, name)
      if os.path.exists(path):
        opener = gzip.open if name.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8") as f:
          return f.read().splitlines()
    raise FileNotFoundError(f"{data_dir}: no {split}.{lang}[.gz]; --data_dir must hold the"
                            " Multi30k files.")
  pairs = [(s, t) for s, t in zip(lines(src), lines(tgt)) if 8 <= len(s.split()) <= max_words]
  if n < 1 or not pairs:
    raise ValueError(f"--num {n}: need at least 1" if n < 1 else
                     f"{data_dir}: no {split}.{src} sentence has 8-{max_words} words.")
  return pairs[:n]


def fig3(rnnsearch: str, transformer: str, data_dir: str, out: str, num: int = 3,
         split: str = "val", head: int | None = None, max_words: int = 14) -> str:
  """Teacher-forced alignment heatmaps, RNNsearch beside one Transformer cross-attention head.

  The Transformer head shown is ``head`` of the last decoder layer, or (default)
  the head whose rows put the most weight on one source token on average: the
  most alignment-like head, which is what Bahdanau's figure is compared with.
  """
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import numpy as np

  from attention.models import BOS, EOS, PAD
  from experiments import evaluate
  from experiments.translate import load_latest

  loaded = [load_latest(Path(wd)) for wd in (rnnsearch, transformer)]
  cfg = loaded[0][0]
  pairs = _read_pairs(data_dir, split, cfg.data.source_lang, cfg.data.target_lang, num,
                      max_words)

  def batch_for(src_vocab, tgt_vocab):
    src = [src_vocab.encode(s) + [EOS] for s, _ in pairs]
    tgt = [tgt_vocab.encode(t) for _, t in pairs]
    s_len, t_len = max(map(len, src)), max(len(t) + 1 for t in tgt)
    b = {k: np.full((len(pairs), n), PAD, np.int32)
         for k, n in (("src", s_len), ("tgt_in", t_len), ("tgt_out", t_len))}
    for i, (s, t) in enumerate(zip(src, tgt)):
      b["src"][i, :len(s)] = s
      b["tgt_in"][i, :len(t) + 1] = [BOS] + t
      b["tgt_out"][i, :len(t) + 1] = t + [EOS]
    return b

  examples = []
  for (_, model, params, src_vocab, tgt_vocab, _) in loaded:
    examples.append(evaluate.alignment_examples(model, params, batch_for(src_vocab, tgt_vocab),
                                                src_vocab, tgt_vocab, num, per_head=True,
                                                task="seq2seq"))
  for flag, wd, ex in (("--rnnsearch", rnnsearch, examples[0]),
                       ("--transformer", transformer, examples[1])):
    if not ex or "cross" not in ex[0].matrices:
      raise ValueError(f"{flag} {wd}: its model has no cross-attention to plot.")
  heads = sorted(k for k in examples[1][0].matrices if k.startswith("cross/head"))
  if not heads:
    raise ValueError(f"--transformer {transformer}: a {loaded[1][0].model.name} run has no"
                     " per-head cross-attention; pass a Transformer run.")
  if head is None:
    peak = [np.mean([ex.matrices[k].max(axis=-1).mean() for ex in examples[1]]) for k in heads]
    chosen = heads[int(np.argmax(peak))]
  else:
    chosen = f"cross/head{head}"
    if chosen not in heads:
      raise ValueError(f"--head {head}: the Transformer has heads 0..{len(heads) - 1}.")
  os.makedirs(out, exist_ok=True)
  fig, axes = plt.subplots(len(pairs), 2, figsize=(12, 5.2 * len(pairs)), squeeze=False)
  for i in range(len(pairs)):
    for j, (ex, key, title) in enumerate(((examples[0][i], "cross", "RNNsearch (additive)"),
                                          (examples[1][i], chosen,
                                           f"Transformer last layer, {chosen[6:]}"))):
      ax = axes[i, j]
      ax.imshow(ex.matrices[key], cmap="gray", vmin=0.0, vmax=1.0, aspect="auto")
      ax.set_xticks(range(len(ex.src_tokens)), ex.src_tokens, rotation=90, fontsize=8)
      ax.set_yticks(range(len(ex.tgt_tokens)), ex.tgt_tokens, fontsize=8)
      ax.set_title(title, fontsize=10)
  fig.tight_layout()
  png = os.path.join(out, "fig3.png")
  fig.savefig(png, dpi=100)
  plt.close(fig)
  text = "\n".join([f"Bahdanau Fig. 3 analogue: {len(pairs)} {split} sentences "
                    f"({cfg.data.source_lang}->{cfg.data.target_lang}), teacher-forced on the"
                    f" reference; Transformer {chosen}.", "", "![fig3](fig3.png)"])
  return _write(os.path.join(out, "fig3.md"), text)


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="python -m experiments.reproduce", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = p.add_subparsers(dest="name", required=True)
  sub.add_parser("fig2").add_argument("dirs", nargs="+")
  f3 = sub.add_parser("fig3")
  f3.add_argument("--rnnsearch", required=True)
  f3.add_argument("--transformer", required=True)
  f3.add_argument("--data_dir", required=True)
  f3.add_argument("--out", required=True)
  f3.add_argument("--num", type=int, default=3)
  f3.add_argument("--split", default="val")
  f3.add_argument("--head", type=int, default=None)
  for name in ("table4", "table3a", "lstmn"):
    sub.add_parser(name).add_argument("dir")
  args = p.parse_args(argv)
  try:
    if args.name == "fig2":
      fig2(args.dirs)
    elif args.name == "fig3":
      fig3(args.rnnsearch, args.transformer, args.data_dir, args.out, args.num, args.split,
           args.head)
    else:
      {"table4": table4, "table3a": table3a, "lstmn": lstmn}[args.name](args.dir)
  except (FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  from attention import huge_pages
  huge_pages.reexec_with_huge_pages()
  sys.exit(main())
