"""Run a config's sweep locally, N trials at a time, and report on it.

    python -m launch.sweep --config experiments/configs/luong_mt.py:data=reverse,tiny \
        --workdir runs/luong_sweep --parallel 2 [--devices-per-trial 1] [--dry-run] \
        [--extra --config.num_train_steps=100 ...]
    python -m launch.sweep report runs/luong_sweep --metric eval/bleu

Every trial is ``python -m experiments.run ... --workdir SWEEP_DIR/<trial name>``;
its output goes to ``SWEEP_DIR/<trial>/launch.log`` and its status to
``SWEEP_DIR/sweep.json``. Re-running the same command skips finished trials and
resumes the others from their checkpoints. Exit status: 0 when every trial is
done, 1 when one failed, 2 on bad input, 130/143 when interrupted (running
trials get SIGTERM, which makes them checkpoint before exiting).
"""

from __future__ import annotations

import argparse
import ctypes
import fcntl
import glob
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from typing import Callable, Sequence, TextIO

from launch import manifest as mf
from launch.sweep_spec import SweepError, Trial, load_sweep, make_trials

LOG_NAME = "launch.log"
MANIFEST_NAME = "sweep.json"
# Chips per process -> libtpu's process bounds (a 2x2 v4/v5 host; from the Cloud TPU
# recipe for running independent processes on one TPU VM).
_TPU_BOUNDS = {1: "1,1,1", 2: "1,2,1", 4: "2,2,1"}


class Interrupted(Exception):
  """SIGTERM/SIGINT reached the launcher."""

  def __init__(self, signum: int):
    super().__init__(signal.Signals(signum).name)
    self.signum = signum


# ---------------------------------------------------------------- devices

def detect_devices(platform: str = "auto") -> tuple[str, list[str]]:
  """(``cpu`` | ``gpu`` | ``tpu``, local device ids) without importing JAX.

  Importing JAX here would grab the accelerator that the trials need.
  """
  if platform in ("auto", "tpu"):
    accel = glob.glob("/dev/accel*")
    vfio = [p for p in glob.glob("/dev/vfio/*") if os.path.basename(p).isdigit()]
    if accel or vfio:
      return "tpu", [str(i) for i in range(len(accel) or len(vfio))]
  if platform in ("auto", "gpu") and shutil.which("nvidia-smi"):
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").strip()
    if visible:
      return "gpu", [v for v in visible.split(",") if v]
    res = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, check=False)
    ids = [str(i) for i, l in enumerate(res.stdout.splitlines()) if l.startswith("GPU ")]
    if ids:
      return "gpu", ids
  if platform not in ("auto", "cpu"):
    raise SweepError(f"--platform {platform}: no such devices on this machine.")
  return "cpu", []


def device_env(kind: str, slot: int, per_trial: int | None, ids: Sequence[str],
               base: dict[str, str]) -> dict[str, str]:
  """Environment variables that give trial slot ``slot`` its own devices.

  Args:
    kind: ``cpu``, ``gpu`` or ``tpu``.
    slot: index of the concurrently running trial (0 .. parallel-1).
    per_trial: devices per trial; None leaves the environment alone.
    ids: the local accelerator ids (ignored on CPU).
    base: the current environment (XLA_FLAGS is extended, not replaced).

  Returns:
    Only the variables to set. On CPU, devices are simulated with
    ``--xla_force_host_platform_device_count``: every trial gets ``per_trial``
    devices that share the host's cores, so they are not disjoint hardware.
  """
  if not per_trial:
    return {}
  if kind == "cpu":
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                   base.get("XLA_FLAGS", "")).split()
    return {"XLA_FLAGS": " ".join(flags + [f"--xla_force_host_platform_device_count={per_trial}"])}
  chips = list(ids[slot * per_trial:(slot + 1) * per_trial])
  if len(chips) < per_trial:
    raise SweepError(f"slot {slot} needs devices {slot * per_trial}..{(slot + 1) * per_trial - 1}"
                     f" but only {len(ids)} exist; lower --parallel or --devices-per-trial.")
  if kind == "gpu":
    return {"CUDA_VISIBLE_DEVICES": ",".join(chips)}
  if per_trial == len(ids):
    return {}   # the whole host: libtpu's defaults are right
  if per_trial not in _TPU_BOUNDS:
    raise SweepError(f"--devices-per-trial {per_trial}: a TPU host splits into 1, 2 or 4 chips.")
  port = str(8476 + slot)   # each libtpu instance needs its own mesh controller port
  return {"TPU_VISIBLE_CHIPS": ",".join(chips), "TPU_VISIBLE_DEVICES": ",".join(chips),
          "TPU_CHIPS_PER_PROCESS_BOUNDS": _TPU_BOUNDS[per_trial], "TPU_PROCESS_BOUNDS": "1,1,1",
          "TPU_MESH_CONTROLLER_ADDRESS": f"localhost:{port}", "TPU_MESH_CONTROLLER_PORT": port}


# ---------------------------------------------------------------- execution

def _die_with_parent() -> None:
  """In the child: get SIGTERM when the launcher dies, however it dies.

  experiments.run checkpoints and exits on SIGTERM, so a killed launcher leaves
  no orphaned trial writing to a workdir that the next launcher will reuse.
  """
  try:
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
  except OSError:
    pass


def _duration(seconds: float) -> str:
  return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"


def last_step_line(log_path: str, tail_bytes: int = 8192) -> str | None:
  """The trainer's latest ``step N/M ...`` progress line in a trial's log, if any."""
  text = mf.log_tail(log_path, tail_bytes)
  for line in reversed(re.split(r"[\r\n]", text or "")):
    if re.match(r"\s*step \d+/\d+", line):
      return line.strip()
  return None


def run_local(trials: Sequence[Trial], manifest: mf.Manifest, parallel: int,
              slot_env: Callable[[int], dict[str, str]], out: TextIO = sys.stdout,
              lock_fd: int | None = None, progress_every: float = 60.0) -> None:
  """Runs ``trials`` as subprocesses, ``parallel`` at a time, recording each in ``manifest``.

  Every ``progress_every`` seconds it prints each running trial's latest
  ``step N/M ... eta`` line from its log, so a long sweep shows where it is.

  ``lock_fd`` (the sweep directory's lock) is inherited by the trials, so the lock
  stays held until the last of them exits, even if the launcher is killed first.

  Raises:
    Interrupted: on SIGTERM/SIGINT, after the running trials were stopped
      (SIGTERM: they checkpoint) and put back to pending.
  """
  queue = list(trials)
  free = list(range(parallel))
  running: dict[int, tuple[Trial, subprocess.Popen, float]] = {}

  def on_signal(signum, frame):
    del frame
    raise Interrupted(signum)

  old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
  next_report = time.time() + progress_every
  try:
    while queue or running:
      while queue and free:
        slot, trial = free.pop(0), queue.pop(0)
        proc = _start(trial, manifest, slot_env(slot), lock_fd)
        running[slot] = (trial, proc, time.time())
        print(f"[start] {trial.name}", file=out, flush=True)
      time.sleep(0.25)
      for slot, (trial, proc, t0) in list(running.items()):
        if proc.poll() is None:
          continue
        del running[slot]
        free.append(slot)
        _finish(trial, proc.returncode, manifest, time.time() - t0, out)
      if running and progress_every > 0 and time.time() >= next_report:
        next_report = time.time() + progress_every
        for trial, _, t0 in running.values():
          line = last_step_line(os.path.join(trial.workdir, LOG_NAME)) or "starting"
          print(f"[running {_duration(time.time() - t0)}] {trial.name}: {line}",
                file=out, flush=True)
  except Interrupted:
    for trial, proc, _ in running.values():
      proc.send_signal(signal.SIGTERM)
    for trial, proc, _ in running.values():
      try:
        proc.wait(timeout=120)
      except subprocess.TimeoutExpired:
        proc.kill()
      if proc.returncode == 0 and mf.is_complete(trial.workdir):
        manifest.update(trial.name, status=mf.DONE, returncode=0, end_time=mf.now(), pid=None)
      else:
        manifest.update(trial.name, status=mf.PENDING, returncode=proc.returncode, pid=None,
                        end_time=mf.now(), error="interrupted; re-run the sweep to resume")
    raise
  finally:
    for s, handler in old.items():
      signal.signal(s, handler)


def _start(trial: Trial, manifest: mf.Manifest, extra_env: dict[str, str],
           lock_fd: int | None = None) -> subprocess.Popen:
  os.makedirs(trial.workdir, exist_ok=True)
  log_path = os.path.join(trial.workdir, LOG_NAME)
  attempts = manifest.trials[trial.name].get("attempts", 0) + 1
  with open(log_path, "ab") as log:   # appended: earlier attempts stay readable
    log.write(f"\n=== {mf.now()} attempt {attempts}: {trial.command}\n".encode())
    log.flush()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **extra_env}
    proc = subprocess.Popen(trial.argv, stdin=subprocess.DEVNULL, stdout=log,
                            stderr=subprocess.STDOUT, env=env, preexec_fn=_die_with_parent,
                            pass_fds=() if lock_fd is None else (lock_fd,))
  manifest.update(trial.name, status=mf.RUNNING, attempts=attempts, log=log_path,
                  start_time=mf.now(), end_time=None, returncode=None, error=None,
                  pid=proc.pid, env=extra_env)
  return proc


def _finish(trial: Trial, rc: int, manifest: mf.Manifest, seconds: float, out: TextIO) -> None:
  log_path = os.path.join(trial.workdir, LOG_NAME)
  if rc == 0 and mf.is_complete(trial.workdir):
    manifest.update(trial.name, status=mf.DONE, returncode=rc, end_time=mf.now(), pid=None)
    print(f"[done] {trial.name} ({_duration(seconds)})", file=out, flush=True)
    return
  error = mf.error_line(log_path) if rc else "exited 0 before its last step (SIGTERM?)"
  manifest.update(trial.name, status=mf.FAILED, returncode=rc, end_time=mf.now(), pid=None,
                  error=error)
  print(f"error: trial {trial.name} failed (exit {rc}): {error}; log: {log_path}",
        file=sys.stderr, flush=True)


def _lock(sweep_dir: str):
  """Holds ``SWEEP_DIR/.sweep.lock`` while this process or its trials live (even on SIGKILL)."""
  os.makedirs(sweep_dir, exist_ok=True)
  f = open(os.path.join(sweep_dir, ".sweep.lock"), "w")
  try:
    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    raise SweepError(f"another launch.sweep, or trials it started, still run in {sweep_dir}."
                     ) from None
  return f


# ---------------------------------------------------------------- CLI

def parse_extra(parser: argparse.ArgumentParser, extra: Sequence[str],
                unknown: Sequence[str]) -> list[str]:
  """``--extra`` flags plus any stray ``--config.a=b`` (both are config overrides)."""
  flags = list(extra) + list(unknown)
  bad = [f for f in flags if not (f.startswith("--config.") and "=" in f)]
  if bad:
    parser.error(f"unrecognized arguments: {' '.join(bad)} (overrides look like --config.a.b=v)")
  return flags


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m launch.sweep", allow_abbrev=False,
                              description=__doc__.split("\n\n")[0],
                              epilog="Subcommand: python -m launch.sweep report SWEEP_DIR --help")
  p.add_argument("--config", required=True, help="config file with get_sweep, [:arg] allowed")
  p.add_argument("--workdir", required=True, help="sweep directory; trial k in WORKDIR/<name>")
  p.add_argument("--dry-run", action="store_true", help="print one command per trial, run none")
  p.add_argument("--parallel", type=int, default=1, help="trials running at once")
  p.add_argument("--devices-per-trial", type=int, default=None,
                 help="disjoint local devices per running trial (CPU: simulated devices)")
  p.add_argument("--platform", choices=("auto", "cpu", "gpu", "tpu"), default="auto")
  p.add_argument("--python", default=sys.executable, help="interpreter of the trials")
  p.add_argument("--progress-every", type=float, default=60.0, metavar="SECONDS",
                 help="print each running trial's latest step line this often (0: never)")
  p.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                 help="--config.a=b overrides appended to every trial (must come last)")
  return p


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  if argv[:1] == ["report"]:
    from launch import report
    return report.main(argv[1:])
  parser = _parser()
  args, unknown = parser.parse_known_args(argv)
  extra = parse_extra(parser, args.extra, unknown)
  if args.parallel < 1:
    parser.error("--parallel must be >= 1")
  if args.devices_per_trial is not None and args.devices_per_trial < 1:
    parser.error("--devices-per-trial must be >= 1 (or left out: the devices split evenly)")
  try:
    trials = make_trials(args.config, load_sweep(args.config, extra), args.workdir, extra,
                         args.python)
    if args.dry_run:
      for t in trials:
        print(t.command)
      return 0
    kind, ids = detect_devices(args.platform)
    per_trial = args.devices_per_trial
    if per_trial is None and kind != "cpu" and args.parallel > 1:
      per_trial = len(ids) // args.parallel   # never let two trials share an accelerator
      if per_trial == 0:
        raise SweepError(f"--parallel {args.parallel} exceeds the {len(ids)} local {kind} devices.")
    slot_env = lambda slot: device_env(kind, slot, per_trial, ids, dict(os.environ))  # noqa: E731
    for slot in range(args.parallel):
      slot_env(slot)   # a slot without devices fails now, not after hours of other trials
    lock = _lock(args.workdir)
  except (SweepError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  manifest = mf.Manifest(os.path.join(args.workdir, MANIFEST_NAME),
                         {"config": args.config, "extra": extra, "parallel": args.parallel})
  manifest.sync(trials)
  todo = []
  for t in trials:
    rec = manifest.trials[t.name]
    if rec["status"] == mf.DONE and mf.last_metrics(t.workdir) is not None:
      print(f"[skip] {t.name}: done", flush=True)
    else:
      todo.append(t)
  print(f"{len(todo)} of {len(trials)} trials to run, {args.parallel} at a time"
        f" ({kind}{f', {per_trial} device(s) each' if per_trial else ''});"
        f" manifest {manifest.path}", flush=True)
  try:
    run_local(todo, manifest, args.parallel, slot_env, lock_fd=lock.fileno(),
              progress_every=args.progress_every)
  except Interrupted as e:
    print(f"error: {e}: stopped; re-run the same command to resume.", file=sys.stderr)
    return 128 + e.signum
  finally:
    lock.close()
  status = [manifest.trials[t.name]["status"] for t in trials]
  failed = [t for t in trials if manifest.trials[t.name]["status"] != mf.DONE]
  print(f"{status.count(mf.DONE)} done, {len(failed)} failed; "
        f"python -m launch.sweep report {args.workdir}", flush=True)
  for t in failed:
    rec = manifest.trials[t.name]
    print(f"error: trial {t.name} failed (exit {rec.get('returncode')}); log: {rec.get('log')}",
          file=sys.stderr)
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
