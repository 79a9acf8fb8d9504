"""``sweep.json``: what each trial of a sweep is, and how far it got.

The manifest is rewritten atomically (temp file + ``os.replace``) after every
change, so a launcher killed at any moment leaves either the old or the new file,
never half of one. A re-run reads it back to skip the trials that are done.

Also ``python -m launch.manifest complete WORKDIR``: exit 0 when that run reached
its last step, 75 otherwise (used on TPU workers, where ``experiments.run`` exits 0
after a SIGTERM-triggered save even though training is not finished).
"""

from __future__ import annotations

import datetime
import json
import os
import re
import sys
import tempfile
import threading
from typing import Any, Iterable

from launch.sweep_spec import Trial

PENDING, RUNNING, DONE, FAILED = "pending", "running", "done", "failed"
EXIT_INCOMPLETE = 75   # EX_TEMPFAIL: "try again", which is what resuming does


def now() -> str:
  return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def _open(path: str, mode: str = "r"):
  if "://" in path:
    from etils import epath  # orbax's dependency; reads gs:// without gcloud
    return epath.Path(path).open(mode)
  return open(path, mode)


def last_metrics(workdir: str) -> dict[str, Any] | None:
  """The last line of ``workdir/metrics.jsonl`` (the final eval), or None."""
  try:
    with _open(workdir.rstrip("/") + "/metrics.jsonl") as f:
      lines = [l for l in f.read().splitlines() if l.strip()]
    return json.loads(lines[-1]) if lines else None
  except (OSError, ValueError):
    return None


def log_tail(log_path: str, max_bytes: int = 20000) -> str | None:
  """The last ``max_bytes`` of a log as text, or None when it cannot be read."""
  try:
    with open(log_path, "rb") as f:
      f.seek(0, os.SEEK_END)
      f.seek(max(0, f.tell() - max_bytes))
      return f.read().decode("utf-8", "replace")
  except OSError:
    return None


def error_line(log_path: str) -> str:
  """The one-line ``error:`` that experiments.run prints, else the log's last line."""
  text = log_tail(log_path)
  if text is None:
    return ""
  lines = text.splitlines()
  errors = [l for l in lines if l.startswith("error:")]
  tail = [l for l in lines if l.strip()]
  return (errors or tail or [""])[-1].strip()


def run_config(workdir: str) -> dict[str, Any] | None:
  """The config the run in ``workdir`` last ran with, or None.

  ``config.json`` holds the first run's; a resume that changed fields (e.g. a
  larger ``num_train_steps``) wrote ``config.resume-<step>.json``, and the one
  with the highest step is the latest.
  """
  root = workdir.rstrip("/")
  if "://" in root:
    from etils import epath
    names = [p.name for p in epath.Path(root).glob("config.resume-*.json")]
  else:
    names = os.listdir(root) if os.path.isdir(root) else []
  resumes = [n for n in names if re.fullmatch(r"config\.resume-\d+\.json", n)]
  name = max(resumes, key=lambda n: int(n.split("-")[1].split(".")[0]), default="config.json")
  try:
    with _open(f"{root}/{name}") as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def is_complete(workdir: str) -> bool:
  """True when the run's last eval is at ``num_train_steps`` (it evaluates at the end).

  A return code of 0 alone is not enough: a SIGTERM'd run saves and exits 0 too.
  """
  metrics = last_metrics(workdir)
  if metrics is None:
    return False
  try:
    total = (run_config(workdir) or {})["num_train_steps"]
  except KeyError:
    return True   # no config to compare against: trust the final metrics line
  return int(metrics.get("step", -1)) >= int(total)


class Manifest:
  """The ``sweep.json`` of one sweep directory; thread-safe.

  Args:
    path: the JSON file (created on the first :meth:`save`).
    header: sweep-level facts recorded next to the trials (config, extra flags).
  """

  def __init__(self, path: str, header: dict[str, Any] | None = None):
    self.path = path
    self._lock = threading.RLock()   # re-entrant: a signal handler may save mid-save
    self.data: dict[str, Any] = {"trials": {}}
    if os.path.exists(path):
      with open(path) as f:
        self.data = json.load(f)
    self.data.update(header or {})

  @property
  def trials(self) -> dict[str, dict[str, Any]]:
    return self.data["trials"]

  def sync(self, trials: Iterable[Trial]) -> None:
    """Makes the manifest list exactly ``trials``, keeping what it knew about each.

    A trial whose command changed (other extra flags, another config) is not the
    same experiment any more: it goes back to pending.
    """
    old = self.trials
    new = {}
    for t in trials:
      rec = dict(old.get(t.name, {}))
      if rec.get("command") not in (None, t.command):
        rec = {"previous_command": rec["command"]}
      rec.update(name=t.name, overrides=t.overrides, workdir=t.workdir, command=t.command)
      rec.setdefault("status", PENDING)
      new[t.name] = rec
    with self._lock:
      self.data["trials"] = new
    self.save()

  def update(self, name: str, **fields: Any) -> None:
    with self._lock:
      self.trials[name].update(fields)
    self.save()

  def save(self) -> None:
    with self._lock:
      self.data["updated"] = now()
      directory = os.path.dirname(os.path.abspath(self.path))
      os.makedirs(directory, exist_ok=True)
      fd, tmp = tempfile.mkstemp(prefix=".sweep.", suffix=".json", dir=directory)
      with os.fdopen(fd, "w") as f:
        json.dump(self.data, f, indent=1, default=str)
        f.flush()
        os.fsync(f.fileno())
      os.replace(tmp, self.path)


def main(argv: list[str]) -> int:
  if len(argv) != 2 or argv[0] != "complete":
    print("usage: python -m launch.manifest complete WORKDIR", file=sys.stderr)
    return 2
  if is_complete(argv[1]):
    return 0
  print(f"{argv[1]}: stopped before its last step; re-run to resume.", file=sys.stderr)
  return EXIT_INCOMPLETE


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
