"""Shared fixtures."""

import pytest

from attention import dispatch


@pytest.fixture
def without_cpu_flash(monkeypatch):
  """``implementation=None`` as on a machine where the CPU kernel is unavailable
  (no C++ compiler): the XLA dispatch rules of :mod:`attention.dispatch`."""
  monkeypatch.setattr(dispatch._cpu_flash, "available", lambda: False)
