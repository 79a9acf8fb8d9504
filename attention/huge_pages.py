"""Transparent huge pages for XLA:CPU's buffers, via a glibc tunable and a re-exec.

XLA:CPU allocates its large buffers afresh on every call, through glibc ``malloc``.
glibc serves blocks over 32 MiB with ``mmap`` and unmaps them on ``free``, so each
training step page-faults its whole working set again, one 4 KiB page at a time.
On this repo's 2-core machine (``python -m benchmarks.huge_pages``), a flax
attention forward+backward at B=4, T=1024 takes about 195k page faults (800 MB)
per call, and a bare ``x * 2`` over 128 MiB takes 51 ms, 32769 faults.

glibc 2.35 and later have a tunable, ``glibc.malloc.hugetlb=1``, that makes ``malloc``
``madvise(MADV_HUGEPAGE)`` the memory it maps. One fault then maps 2 MiB. On a
kernel whose transparent huge pages are in ``madvise`` mode (the Debian/Ubuntu
default), the same ``x * 2`` takes 23 ms, 65 faults. The speed-ups in benchmarks/RESULTS.md
come from this.

glibc reads its tunables once, at process start. So ``reexec_with_huge_pages()``
restarts the interpreter with the same arguments and the tunable added. This repo's
entry points (``experiments.run``, ``experiments.compare``, the benchmarks) call it
first; call it at the top of your own ``main`` to get the same, or start Python with
``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``. ``dot_product_attention``'s backend rule
reads :func:`active`, since the tiled backend gains less from huge pages than "xla".
It does nothing when the tunable is already set, the kernel's mode is ``always`` or
``never``, glibc is older or absent, or ``ATTENTION_HUGE_PAGES=0``.
"""

from __future__ import annotations

import functools
import os
import sys
from typing import Mapping

SWITCH = "ATTENTION_HUGE_PAGES"
TUNABLE = "glibc.malloc.hugetlb"
_THP_ENABLED = "/sys/kernel/mm/transparent_hugepage/enabled"


@functools.lru_cache(maxsize=None)
def thp_mode(path: str = _THP_ENABLED) -> str | None:
  """The kernel's transparent-huge-page mode (``always``/``madvise``/``never``), or None."""
  try:
    with open(path) as f:
      text = f.read()
  except OSError:
    return None
  if "[" not in text:
    return None
  return text[text.index("[") + 1:text.index("]")]


@functools.lru_cache(maxsize=None)
def glibc_version() -> tuple[int, ...] | None:
  """The running glibc's version, e.g. ``(2, 36)``; None on other C libraries."""
  try:
    lib, version = os.confstr("CS_GNU_LIBC_VERSION").split()
    return tuple(int(p) for p in version.split(".")) if lib == "glibc" else None
  except (AttributeError, OSError, ValueError):  # no confstr, or not glibc's answer
    return None


def huge_pages_environ(environ: Mapping[str, str], *, glibc: tuple[int, ...] | None,
                       thp: str | None) -> dict[str, str] | None:
  """The environment to re-execute under, or None when re-executing would not help.

  Args:
    environ: the current environment.
    glibc: the glibc version (``glibc_version()``).
    thp: the kernel's transparent-huge-page mode (``thp_mode()``).

  Returns:
    ``environ`` with ``glibc.malloc.hugetlb=1`` appended to ``GLIBC_TUNABLES``;
    None if the switch is off, the tunable is set already (so a re-executed process
    never loops), glibc is older than 2.35 or absent, or the kernel's mode is not
    ``madvise`` (``always`` already gives huge pages; ``never`` cannot).
  """
  if environ.get(SWITCH, "1") == "0":
    return None
  tunables = environ.get("GLIBC_TUNABLES", "")
  if TUNABLE in tunables:
    return None
  if glibc is None or glibc < (2, 35) or thp != "madvise":
    return None
  env = dict(environ)
  env["GLIBC_TUNABLES"] = f"{tunables}:{TUNABLE}=1" if tunables else f"{TUNABLE}=1"
  return env


def active(environ: Mapping[str, str] = os.environ) -> bool:
  """Whether this process runs with huge pages for large ``malloc`` blocks."""
  mode = thp_mode()
  if mode == "always":
    return True
  return (mode == "madvise" and f"{TUNABLE}=1" in environ.get("GLIBC_TUNABLES", "")
          and (glibc_version() or (0,)) >= (2, 35))


def reexec_with_huge_pages() -> None:
  """Restarts this process with huge pages, when that helps; otherwise returns.

  The process keeps its PID, arguments and (apart from ``GLIBC_TUNABLES``) its
  environment, so launchers, Slurm and ``jax.distributed`` see no difference.
  Call it before any work starts: nothing done before the call survives it.
  """
  if not sys.platform.startswith("linux"):
    return
  env = huge_pages_environ(os.environ, glibc=glibc_version(), thp=thp_mode())
  if env is None:
    return
  args = getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv]
  if "-" in args[1:2] or not sys.executable:
    return  # a script read from stdin cannot be read again
  # Silent: stderr carries the one-line errors that scripts and tests read.
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable, *args[1:]], env)
