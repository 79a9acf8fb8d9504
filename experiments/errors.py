"""The exceptions that mean "the user's input is wrong": printed as one line, no traceback."""

import functools
import sys
from typing import Callable

from experiments.checkpoints import ResumeError
from experiments.data import DataError
from experiments.models import ConfigError

USER_ERRORS = (ConfigError, DataError, ResumeError)


def one_line_errors(main: Callable[..., int]) -> Callable[..., int]:
  """Wraps a command's ``main``: a :data:`USER_ERRORS` prints as ``error: ...`` and exits 2."""

  @functools.wraps(main)
  def wrapped(*args, **kwargs) -> int:
    try:
      return main(*args, **kwargs)
    except USER_ERRORS as e:
      print(f"error: {e}", file=sys.stderr)
      return 2

  return wrapped
