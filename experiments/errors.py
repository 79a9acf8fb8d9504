"""The exceptions that mean "the user's input is wrong": printed as one line, no traceback."""

from experiments.checkpoints import ResumeError
from experiments.data import DataError
from experiments.models import ConfigError

USER_ERRORS = (ConfigError, DataError, ResumeError)
