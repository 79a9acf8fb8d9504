"""Progress reporting: a tqdm bar on a terminal, plain log lines otherwise."""

from __future__ import annotations

import sys
import time

from tqdm import tqdm


def _fmt_eta(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class Progress:
  """Step, loss and ETA; silent on non-primary hosts."""

  def __init__(self, start: int, total: int, *, enabled: bool = True, stream=None):
    self.stream = stream or sys.stderr
    self.enabled = enabled
    self.start, self.total = start, total
    self.t0 = time.perf_counter()
    interactive = hasattr(self.stream, "isatty") and self.stream.isatty()
    self.bar = (tqdm(total=total, initial=start, file=self.stream, dynamic_ncols=True,
                     unit="step") if enabled and interactive else None)
    self.last = start

  def update(self, step: int, *, loss: float, lr: float, tokens_per_sec: float) -> None:
    if not self.enabled:
      return
    if self.bar is not None:
      self.bar.update(step - self.last)
      self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_sec:.0f}")
    else:
      done = step - self.start
      rate = done / max(time.perf_counter() - self.t0, 1e-9)
      eta = (self.total - step) / rate if rate > 0 else 0.0
      print(f"step {step}/{self.total}  loss {loss:.4f}  lr {lr:.2e}  "
            f"tokens/s {tokens_per_sec:.0f}  eta {_fmt_eta(eta)}", file=self.stream, flush=True)
    self.last = step

  def note(self, text: str) -> None:
    """One line of news (e.g. which eval phase runs), beside the bar."""
    if not self.enabled:
      return
    if self.bar is not None:
      self.bar.write(text)
    else:
      print(text, file=self.stream, flush=True)

  def message(self, step: int, metrics: dict) -> None:
    if not self.enabled:
      return
    text = "  ".join(f"{k} {v:.4g}" for k, v in metrics.items()
                     if isinstance(v, (int, float)) and "/" in k and "bucket" not in k)
    line = f"eval @ {step}: {text}"
    if self.bar is not None:
      self.bar.write(line)
    else:
      print(line, file=self.stream, flush=True)

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()
