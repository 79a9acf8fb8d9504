"""Sample text from a language-model run's latest checkpoint.

    python -m experiments.generate --workdir runs/lm --prompt "ROMEO:" --length 300 \
        --temperature 0.8 --top_k 40 --num_samples 2 --seed 0

Works for every language model (``transformer_lm``, ``lstmn_lm``, ``lstm_lm`` and
the ``compare.py`` text families) with the run's own vocabulary. Each sample,
prompt included, goes to stdout (or ``--output``), separated by a line of dashes;
the same ``--seed`` gives the same text. ``--temperature 0`` is greedy decoding. An
existing ``--output`` is never replaced unless ``--overwrite`` is given.
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import numpy as np

from experiments.errors import one_line_errors
from experiments.models import ConfigError, model_task
from experiments.translate import load_latest

SEPARATOR = "-" * 40


def generate(workdir: Path, prompt: str, *, length: int, num_samples: int = 1,
             temperature: float = 1.0, top_k: int = 0, seed: int = 0) -> tuple[list[str], int]:
  """``(samples, checkpoint step)``: ``num_samples`` texts, each prompt + ``length`` tokens."""
  import jax
  import jax.numpy as jnp

  from attention.models import BOS, PAD
  from attention.sampling import lm_step_fn, sample
  from experiments.data.tokenizers import UNK

  config, model, params, _, vocab, step = load_latest(workdir, max_len=_max_len(prompt, length))
  if model_task(config.model.name) != "lm":
    raise ConfigError(f"{workdir} holds a {config.model.name} translation model; generate needs"
                      " a language-model run (use experiments.translate).")
  ids = vocab.encode(prompt)
  if not ids:
    raise ConfigError("--prompt encodes to no token; give it some text (default: a newline).")
  if PAD in ids:
    raise ConfigError("--prompt contains the padding token; remove it.")
  state, step_fn = lm_step_fn(model, {"params": params}, batch_size=num_samples,
                              max_len=len(ids) + length)
  # <unk> is no character of the text: never draw it.
  run = jax.jit(functools.partial(sample, step_fn, num_tokens=length, temperature=temperature,
                                  top_k=top_k, exclude=(PAD, BOS, UNK)))
  prompt_ids = jnp.tile(jnp.asarray(ids, jnp.int32)[None], (num_samples, 1))
  tokens = np.asarray(run(state, prompt_ids, jax.random.key(seed)))
  return [vocab.decode(ids + row.tolist()) for row in tokens], step


def _max_len(prompt: str, length: int) -> int:
  # The model's positions must cover prompt + continuation; a token is at
  # least one character for every tokenizer here.
  return len(prompt.encode("utf-8")) + length + 16


@one_line_errors
def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workdir", required=True, type=Path)
  p.add_argument("--prompt", default="\n", help="text to continue (default: a newline)")
  p.add_argument("--length", type=int, default=200, help="tokens to generate after the prompt")
  p.add_argument("--num_samples", type=int, default=1)
  p.add_argument("--temperature", type=float, default=1.0, help="0: greedy")
  p.add_argument("--top_k", type=int, default=0, help="0: sample from every token")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--output", type=Path, default=None, help="default: stdout")
  p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
  args = p.parse_args(argv)
  for name in ("length", "num_samples"):
    if getattr(args, name) < 1:
      raise ConfigError(f"--{name} must be >= 1, got {getattr(args, name)}.")
  if args.temperature < 0 or args.top_k < 0:
    raise ConfigError("--temperature and --top_k must be >= 0.")
  if args.output is not None and args.output.exists() and not args.overwrite:
    raise ConfigError(f"{args.output} exists; pass --overwrite or choose another --output.")
  if args.output is not None and not args.output.parent.is_dir():
    raise ConfigError(f"--output {args.output}: folder {args.output.parent} does not exist.")
  samples, step = generate(args.workdir, args.prompt, length=args.length,
                           num_samples=args.num_samples, temperature=args.temperature,
                           top_k=args.top_k, seed=args.seed)
  text = f"\n{SEPARATOR}\n".join(samples) + "\n"
  if args.output is None:
    sys.stdout.write(text)
  else:
    tmp = args.output.with_name(args.output.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(args.output)
  print(f"{len(samples)} sample(s) of {args.length} tokens from checkpoint step {step}",
        file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())
