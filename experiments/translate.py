"""Translate a text file with a run's latest checkpoint.

    python -m experiments.translate --workdir /tmp/mt --input src.de --output hyp.en --beam_size 4

One sentence per line in, one translation per line out, in the same order.
The run's own vocabulary (``workdir/vocab``) and config are used, so the
command needs nothing but the workdir. An existing output file is never
overwritten unless ``--overwrite`` is given.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from ml_collections import ConfigDict

from experiments.checkpoints import ResumeError
from experiments.errors import one_line_errors
from experiments.data import DataError, load_vocabs
from experiments.models import ConfigError, create_model, model_task


def load_latest(workdir: Path, max_len: int = 512):
  """Returns ``(config, model, params, src_vocab, tgt_vocab, step)`` of a run's latest checkpoint."""
  import orbax.checkpoint as ocp

  cfg_path = workdir / "config.json"
  if not cfg_path.is_file():
    raise ResumeError(f"{cfg_path} not found: --workdir must be a directory written by"
                      " `python -m experiments.run`.")
  config = ConfigDict(json.loads(cfg_path.read_text()))
  src_vocab, tgt_vocab = load_vocabs(workdir)
  model = create_model(config.model, src_vocab_size=src_vocab.size,
                       tgt_vocab_size=tgt_vocab.size, max_len=max_len)
  manager = ocp.CheckpointManager((workdir / "checkpoints").absolute(), item_names=("state", "data"))
  step = manager.latest_step()
  if step is None:
    raise ResumeError(f"no checkpoint in {workdir / 'checkpoints'}; train first.")
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  state = restored["state"]
  params = state["params"] if isinstance(state, dict) else state.params
  manager.close()
  return config, model, params, src_vocab, tgt_vocab, step


def translate_lines(lines, model, params, src_vocab, tgt_vocab, *, beam_size: int, alpha: float,
                    max_extra: int, batch_size: int, progress=None) -> list[str]:
  from attention import decoding
  from attention.models import EOS
  out: list[str] = []
  # Sorting by length keeps padding (and the number of compiled buckets) small.
  order = sorted(range(len(lines)), key=lambda i: len(lines[i]))
  hyps: dict[int, str] = {}
  for start in range(0, len(order), batch_size):
    idx = order[start:start + batch_size]
    ids = [src_vocab.encode(lines[i]) + [EOS] for i in idx]
    src = np.zeros((len(ids), max(map(len, ids))), np.int32)
    for row, seq in enumerate(ids):
      src[row, :len(seq)] = seq
    res = decoding.decode(model, {"params": params}, src, beam_size=beam_size, alpha=alpha,
                          max_extra=max_extra)
    for row, i in enumerate(idx):
      hyps[i] = tgt_vocab.decode(np.asarray(res.tokens[row]).tolist())
    if progress:
      progress(min(start + batch_size, len(order)), len(order))
  out = [hyps[i] for i in range(len(lines))]
  return out


@one_line_errors
def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workdir", required=True, type=Path)
  p.add_argument("--input", required=True, type=Path)
  p.add_argument("--output", required=True, type=Path)
  p.add_argument("--beam_size", type=int, default=4)
  p.add_argument("--alpha", type=float, default=0.6)
  p.add_argument("--max_extra", type=int, default=10)
  p.add_argument("--batch_size", type=int, default=64)
  p.add_argument("--overwrite", action="store_true")
  args = p.parse_args(argv)
  if args.output.exists() and not args.overwrite:
    raise ConfigError(f"{args.output} exists; pass --overwrite or choose another --output.")
  try:
    raw = args.input.read_bytes()
  except OSError as e:
    raise DataError(f"cannot read --input {args.input}: {e.strerror}.") from None
  try:
    # "\n" only: str.splitlines() also breaks at \x0c, \x85, \u2028, ...,
    # which would give more output lines than input lines.
    lines = [line.strip() for line in raw.decode("utf-8").split("\n")]
    if lines and not lines[-1]:
      lines.pop()
  except UnicodeDecodeError as e:
    line = raw[:e.start].count(b"\n") + 1
    raise DataError(f"{args.input} line {line} is not valid UTF-8; re-encode the file as"
                    " UTF-8.") from None
  config, model, params, src_vocab, tgt_vocab, step = load_latest(args.workdir)
  if model_task(config.model.name) != "seq2seq":
    raise ConfigError(f"{args.workdir} holds a {config.model.name} language model; translate"
                      " needs a translation run.")
  def progress(done, total):
    print(f"\rtranslated {done}/{total}", end="", file=sys.stderr, flush=True)
  hyps = translate_lines(lines, model, params, src_vocab, tgt_vocab, beam_size=args.beam_size,
                         alpha=args.alpha, max_extra=args.max_extra,
                         batch_size=args.batch_size, progress=progress)
  tmp = args.output.with_name(args.output.name + ".tmp")
  tmp.write_text("".join(h + "\n" for h in hyps), encoding="utf-8")
  tmp.replace(args.output)
  print(f"\nwrote {len(hyps)} lines to {args.output} (checkpoint step {step})", file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())
