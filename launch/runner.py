"""Command runners: the one seam between the launchers and the outside world.

The TPU and Slurm launchers never call ``subprocess`` directly; they hand argv lists
to a runner. Tests inject a fake one, and ``--dry-run`` uses :class:`DryRunRunner`,
which prints the exact commands instead of running them.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from typing import Callable, Protocol, Sequence, TextIO


def format_command(argv: Sequence[str]) -> str:
  """The shell line equivalent to ``argv`` (copy-pasteable)."""
  return shlex.join(argv)


class Runner(Protocol):
  """Anything with ``run(argv) -> (returncode, stdout, stderr)``."""

  def run(self, argv: Sequence[str]) -> tuple[int, str, str]:
    ...


class SubprocessRunner:
  """Runs commands for real.

  Args:
    stream: predicate on argv (or a bool for all commands): when true, the
      command's output goes straight to this process's stdout/stderr (long ssh
      sessions stay visible) and the returned stderr only holds its tail, for
      error classification.
  """

  def __init__(self, stream: bool | Callable[[Sequence[str]], bool] = False):
    self.stream = stream if callable(stream) else (lambda argv: bool(stream))

  def run(self, argv: Sequence[str]) -> tuple[int, str, str]:
    if not self.stream(argv):
      res = subprocess.run(list(argv), capture_output=True, text=True, check=False)
      return res.returncode, res.stdout, res.stderr
    # Stream stdout live but keep stderr too: preemption is recognised from it.
    proc = subprocess.Popen(list(argv), stderr=subprocess.PIPE, text=True)
    tail: list[str] = []
    assert proc.stderr is not None
    for line in proc.stderr:
      sys.stderr.write(line)
      tail = (tail + [line])[-200:]
    return proc.wait(), "", "".join(tail)


class DryRunRunner:
  """Prints each command on its own line and pretends it succeeded."""

  def __init__(self, out: TextIO | None = None):
    self.out = out
    self.commands: list[list[str]] = []

  def run(self, argv: Sequence[str]) -> tuple[int, str, str]:
    self.commands.append(list(argv))
    print(format_command(argv), file=self.out or sys.stdout, flush=True)
    return 0, "", ""
