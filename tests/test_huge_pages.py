"""The huge-page re-exec: when it applies, that it keeps argv, and that it cuts page faults."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from attention import huge_pages

ROOT = Path(__file__).resolve().parents[1]
NEW = (2, 36)


@pytest.mark.parametrize("environ,glibc,thp,expected", [
    ({}, NEW, "madvise", "glibc.malloc.hugetlb=1"),
    ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, NEW, "madvise",
     "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"),
    ({}, (2, 35), "madvise", "glibc.malloc.hugetlb=1"),
    ({"ATTENTION_HUGE_PAGES": "0"}, NEW, "madvise", None),       # switched off
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, NEW, "madvise", None),  # user's choice
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}, NEW, "madvise", None),  # no loop
    ({}, (2, 31), "madvise", None),                               # tunable unknown
    ({}, None, "madvise", None),                                  # musl, no glibc
    ({}, NEW, "always", None),                                    # kernel does it already
    ({}, NEW, "never", None),
    ({}, NEW, None, None),                                        # no THP at all
])
def test_huge_pages_environ(environ, glibc, thp, expected):
  env = huge_pages.huge_pages_environ({"PATH": "/bin", **environ}, glibc=glibc, thp=thp)
  if expected is None:
    assert env is None
  else:
    assert env["GLIBC_TUNABLES"] == expected and env["PATH"] == "/bin"


@pytest.mark.parametrize("text,mode", [("always [madvise] never\n", "madvise"),
                                       ("[always] madvise never\n", "always"),
                                       ("always madvise [never]\n", "never"),
                                       ("garbage\n", None)])
def test_thp_mode_reads_the_bracketed_choice(tmp_path, text, mode):
  f = tmp_path / "enabled"
  f.write_text(text)
  assert huge_pages.thp_mode(str(f)) == mode
  assert huge_pages.thp_mode(str(tmp_path / "missing")) is None


# Writes 256 MiB of fresh glibc malloc memory twice, as XLA:CPU does with its large
# buffers, and reports the page faults of the second pass. (Not numpy: it madvises
# its own large arrays.)
_CHILD = """
import ctypes, json, os, resource, sys
from attention import huge_pages
huge_pages.reexec_with_huge_pages()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
def touch():
  p = libc.malloc(256 * 2**20); ctypes.memset(p, 1, 256 * 2**20); libc.free(p)
touch()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
touch()
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps(dict(argv=sys.argv[1:], pid=os.getpid(), faults=faults,
                      tunables=os.environ.get("GLIBC_TUNABLES", ""), active=huge_pages.active())))
"""


def _child(**env):
  full = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "ATTENTION_HUGE_PAGES")}
  res = subprocess.run([sys.executable, "-c", _CHILD, "a b", "--x=1"], capture_output=True,
                       text=True, timeout=120, cwd=ROOT, env={**full, **env})
  assert res.returncode == 0, res.stderr[-2000:]
  assert res.stderr == ""   # the re-exec is silent: stderr stays for one-line errors
  return json.loads(res.stdout.strip().splitlines()[-1])


def test_reexec_keeps_arguments_and_cuts_page_faults():
  off = _child(ATTENTION_HUGE_PAGES="0")
  on = _child()
  assert off["argv"] == on["argv"] == ["a b", "--x=1"]
  assert off["tunables"] == "" and not off["active"]
  expected = huge_pages.huge_pages_environ({}, glibc=huge_pages.glibc_version(),
                                           thp=huge_pages.thp_mode())
  if expected is None:
    assert on["tunables"] == "", on   # nothing to gain here: no re-exec
    pytest.skip(f"no huge pages to turn on here (glibc {huge_pages.glibc_version()},"
                f" THP {huge_pages.thp_mode()})")
  assert on["tunables"] == "glibc.malloc.hugetlb=1" and on["active"]
  # 256 MiB is 65536 small pages; with 2 MiB pages it is 128 faults. Allow the
  # kernel to fall back to small pages for part of it when memory is fragmented.
  assert off["faults"] > 60000, off
  assert on["faults"] < off["faults"] / 4, (on, off)
