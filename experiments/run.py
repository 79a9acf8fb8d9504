"""Train, evaluate and checkpoint any model of the library from a config file.

    python -m experiments.run --workdir /tmp/run                    # built-in default
    python -m experiments.run --config experiments/configs/transformer_mt.py \
        --workdir /tmp/mt --config.data.dir=/path/to/multi30k --config.batch_size=128

Re-running the same command resumes from the latest checkpoint. Errors in the
user's input print one line (set ATTENTION_DEBUG=1 for the traceback). On Linux the
command first restarts itself once with huge pages for XLA:CPU's buffers
(attention/huge_pages.py; ATTENTION_HUGE_PAGES=0 turns that off).
"""

from __future__ import annotations

import logging
import os
import re
import sys
from typing import NoReturn

from absl import app, flags
from ml_collections import config_flags

_DEFAULT = os.path.join(os.path.dirname(__file__), "configs", "default.py")
FLAGS = flags.FLAGS


def _override_error(e: Exception, argv: list[str]) -> NoReturn:
  """Exits 2 with one line that names the bad ``--config.`` override."""
  # ml_collections reports a bad override as a multi-line KeyError; name the flag.
  detail = str(e).replace("\\'", "'").replace("\\n", " ").replace("\n", " ")
  detail = " ".join(detail.strip("'\" ").split())
  if "Did you mean" in detail:
    detail = detail[detail.index("Did you mean"):]
  bad = [a.split("=")[0] for a in argv if a.startswith("--config.")
         and any(part and part in detail for part in a.split("=")[0].split(".")[1:])]
  where = bad[-1] if bad else "--config"
  print(f"error: {where}: no such config field or bad value ({detail})", file=sys.stderr)
  sys.exit(2)


def _define_flags(argv: list[str]) -> None:
  """Defines the flags; config overrides in ``argv`` are applied (and checked) here."""
  try:
    config_flags.DEFINE_config_file("config", _DEFAULT, "Experiment config file.",
                                    lock_config=True)
  except (KeyError, AttributeError, ValueError, TypeError, flags.Error) as e:
    _override_error(e, argv)
  flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and plots.")
  flags.mark_flags_as_required(["workdir"])


def _maybe_initialize_distributed() -> None:
  """``jax.distributed.initialize`` when the environment asks for it.

  Set by the TPU/Slurm launchers: ``ATTENTION_MULTIHOST=1`` (auto-detect on
  TPU pods and Slurm), or ``JAX_COORDINATOR_ADDRESS`` + ``JAX_NUM_PROCESSES``
  + ``JAX_PROCESS_ID`` for explicit clusters (and the localhost tests).
  """
  import jax
  address = os.environ.get("JAX_COORDINATOR_ADDRESS")
  if not (address or os.environ.get("ATTENTION_MULTIHOST") == "1"):
    return
  # Gloo for cross-process collectives on CPU (the setting only affects the CPU
  # client). Not conditional on jax.default_backend(): querying the backend
  # initialises it, after which jax.distributed.initialize refuses to run.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if address:
    jax.distributed.initialize(address, int(os.environ["JAX_NUM_PROCESSES"]),
                               int(os.environ["JAX_PROCESS_ID"]))
  else:
    jax.distributed.initialize()


def main(argv) -> int:
  del argv
  from experiments.errors import USER_ERRORS
  from experiments.train import TrainingDiverged
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                      stream=sys.stderr)
  for noisy in ("absl", "orbax", "jax"):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  try:
    config = FLAGS.config
  except Exception as e:  # ml_collections defers some load errors to first access
    print(f"error: --config: {_reason(str(e))}", file=sys.stderr)
    return 2
  try:
    _maybe_initialize_distributed()
    from experiments import train
    train.train_and_evaluate(config, FLAGS.workdir)
  except USER_ERRORS as e:
    if os.environ.get("ATTENTION_DEBUG"):
      raise
    print(f"error: {e}", file=sys.stderr)
    return 2
  except TrainingDiverged as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  except KeyboardInterrupt:
    # The second Ctrl-C (the first one saves and exits cleanly).
    print("error: interrupted; re-run the same command to resume from the last checkpoint.",
          file=sys.stderr)
    return 130
  return 0


def _reason(text: str) -> str:
  """The ``SomeError: why`` line of a message that embeds a traceback, else its first line."""
  lines = [line.strip() for line in text.splitlines() if line.strip()]
  errors = [line for line in lines if re.match(r"^[A-Za-z_.]*(Error|Exception)\b", line)]
  return errors[-1] if errors else (lines[0] if lines else text)


def _check_config_file(argv: list[str]) -> None:
  """Exits 2 with one line when ``--config``'s file is missing or is not valid Python."""
  for i, arg in enumerate(argv):
    value = (arg.split("=", 1)[1] if arg.startswith("--config=")
             else argv[i + 1] if arg == "--config" and i + 1 < len(argv) else None)
    if value is None:
      continue
    path = value.split(":", 1)[0]
    try:
      compile(open(path, encoding="utf-8").read(), path, "exec")
    except OSError as e:
      print(f"error: --config {path}: {e.strerror}; pass a config file such as"
            " experiments/configs/transformer_mt.py.", file=sys.stderr)
      sys.exit(2)
    except SyntaxError as e:
      print(f"error: --config {path}, line {e.lineno}: {e.msg}.", file=sys.stderr)
      sys.exit(2)


def _parse(argv):
  """absl parsing, but a bad flag or override is one line, not the usage text."""
  try:
    return FLAGS(argv)
  except flags.Error as e:
    # A config file's own error (e.g. an unknown ``:arg``) arrives with its traceback.
    text = str(e)
    head = text.splitlines()[0]
    reason = _reason(text[len(head):]) if "Traceback" in text else ""
    print(f"error: {head} {reason}".rstrip(), file=sys.stderr)
    sys.exit(2)
  except (KeyError, AttributeError) as e:
    # With an explicit --config file, overrides are applied here: an unknown field
    # is an AttributeError that absl does not wrap in flags.Error.
    _override_error(e, argv)


def run() -> None:
  from attention import huge_pages
  huge_pages.reexec_with_huge_pages()
  _check_config_file(sys.argv)
  _define_flags(sys.argv)
  app.run(main, flags_parser=_parse)


if __name__ == "__main__":
  run()
