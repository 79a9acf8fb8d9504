"""Reading text files with one-line, actionable error messages.

Every problem with user-supplied data is raised as :class:`DataError`, whose
message is a single line that names the offending file (and line, where there
is one) and says how to fix it, so a failed run's log tells the user exactly
what to do.
"""

from __future__ import annotations

import gzip
import os
import tempfile
import zlib
from pathlib import Path

__all__ = ["DataError", "read_text", "read_lines", "atomic_write_bytes"]


class DataError(ValueError):
  """Bad or missing input data; the message is one line naming the file."""

  def __init__(self, message: str):
    # Messages may embed exception texts; keep them on one line so log
    # scrapers and humans see the whole diagnosis at once.
    super().__init__(" ".join(str(message).split()))


def _open_bytes(path: Path) -> bytes:
  if path.suffix == ".gz":
    with gzip.open(path, "rb") as f:
      return f.read()
  return path.read_bytes()


def read_text(path: str | os.PathLike, *, what: str = "file") -> str:
  """Reads a whole plain or gzip-compressed UTF-8 file.

  Args:
    path: File to read; a name ending in ``.gz`` is decompressed.
    what: Word used for the file in error messages (e.g. ``"text file"``).

  Returns:
    The decoded text, with a leading byte-order mark removed.

  Raises:
    DataError: The file is missing, unreadable, a corrupt gzip file, or not
      valid UTF-8 (the message gives the line number of the first bad byte).
  """
  path = Path(path)
  if not path.exists():
    raise DataError(f"{path}: {what} not found; check the path in the config")
  if path.is_dir():
    raise DataError(f"{path}: is a directory, expected a {what}")
  try:
    raw = _open_bytes(path)
  except (gzip.BadGzipFile, EOFError, zlib.error) as e:
    raise DataError(
        f"{path}: not a valid gzip file ({e}); re-download it or "
        "decompress it by hand and drop the .gz suffix") from e
  except OSError as e:
    raise DataError(f"{path}: cannot read {what} ({e}); check its permissions") from e
  try:
    text = raw.decode("utf-8")
  except UnicodeDecodeError as e:
    line = raw.count(b"\n", 0, e.start) + 1
    column = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
    raise DataError(
        f"{path}:{line}: invalid UTF-8 byte 0x{raw[e.start]:02x} at column "
        f"{column}; re-encode the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)"
    ) from e
  return text.removeprefix("\ufeff")


def read_lines(path: str | os.PathLike, *, what: str = "file") -> list[str]:
  """Reads a file of one non-empty sentence per line.

  Surrounding whitespace (including Windows ``\\r``) is stripped from every
  line; a final newline is optional.

  Args:
    path: File to read (plain or ``.gz``).
    what: Word used for the file in error messages.

  Returns:
    The stripped lines.

  Raises:
    DataError: As :func:`read_text`, or the file is empty, or a line is
      empty (the message gives its number).
  """
  text = read_text(path, what=what)
  lines = text.split("\n")
  if lines and lines[-1] == "":
    lines.pop()
  if not lines:
    raise DataError(f"{path}: {what} is empty; it needs one sentence per line")
  stripped = [line.strip() for line in lines]
  for number, line in enumerate(stripped, start=1):
    if not line:
      raise DataError(
          f"{path}:{number}: empty line; every line must hold a sentence: "
          "delete it (and the same line in the parallel file)")
  return stripped


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
  """Writes ``data`` so that readers never see a partially written file.

  Several processes (hosts of one job, or concurrent runs sharing a cache)
  may write the same file at once; writing to a temporary sibling and
  renaming makes the last complete write win instead of a torn one.
  """
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise
