"""Crash safety of ``experiments.run``: kill -9 and resume, SIGTERM, refused resumes, NaN.

Every run is a real ``python -m experiments.run`` subprocess, bounded by a
timeout and killed (with its process group) on failure. The uninterrupted
reference run is a module-scoped fixture shared by two tests; being first, it
also fills the module's compilation cache, which the later runs load.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 180

TINY = [
    "--config.batch_size=16", "--config.eval_batch_size=16", "--config.num_eval_batches=2",
    "--config.decode.enabled=False", "--config.num_plot_examples=0",
    "--config.data.num_eval=32", "--config.model.emb_dim=32", "--config.model.qkv_dim=32",
    "--config.model.mlp_dim=64", "--config.model.num_layers=1", "--config.warmup_steps=10",
]
# Long enough (100 steps, an eval every 5) that a kill after the step-15 eval
# lands mid-run, short enough to finish in seconds once compiled.
KILL_STEPS, KILL_CKPT_EVERY = 100, 10
KILL_RUN = TINY + [f"--config.num_train_steps={KILL_STEPS}", "--config.eval_every_steps=5",
                   f"--config.checkpoint_every_steps={KILL_CKPT_EVERY}",
                   "--config.log_every_steps=5", "--config.max_checkpoints_to_keep=3"]


# A persistent compilation cache private to this module: runs after the first
# load the compiled steps instead of recompiling (same executables, same numbers).
_CACHE_ENV: dict[str, str] = {}


@pytest.fixture(scope="module", autouse=True)
def _compilation_cache(tmp_path_factory):
  _CACHE_ENV.update(JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp("jax_cache")),
                    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                    JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  yield
  _CACHE_ENV.clear()


def _env() -> dict[str, str]:
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(("JAX_", "ATTENTION_", "XLA_"))}
  env.update(JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1", **_CACHE_ENV)
  return env


class Run:
  """A background ``experiments.run`` process; stdout/stderr go to files beside the workdir."""

  def __init__(self, workdir: Path, args=(), name: str | None = None):
    self.workdir = workdir
    name = name or workdir.name
    self.err_path = workdir.parent / f"{name}.err"
    self.out_path = workdir.parent / f"{name}.out"
    cmd = [sys.executable, "-m", "experiments.run", "--workdir", str(workdir), *args]
    with open(self.out_path, "w") as out, open(self.err_path, "w") as err:
      self.proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=out, stderr=err,
                                   start_new_session=True)
    self.deadline = time.monotonic() + TIMEOUT_S

  @property
  def stderr(self) -> str:
    return self.err_path.read_text()

  def signal(self, sig: int) -> None:
    if self.proc.poll() is None:
      os.killpg(self.proc.pid, sig)

  def kill(self) -> None:
    if self.proc.poll() is None:
      self.signal(signal.SIGKILL)
      self.proc.wait(timeout=30)

  def wait(self) -> int:
    try:
      return self.proc.wait(timeout=max(self.deadline - time.monotonic(), 1))
    except subprocess.TimeoutExpired:
      self.kill()
      pytest.fail(f"{self.workdir}: ran past {TIMEOUT_S} s\n{self.stderr[-3000:]}")

  def wait_for(self, predicate, what: str) -> None:
    """Polls ``predicate`` while the process runs; fails if it exits first or times out."""
    while time.monotonic() < self.deadline:
      if predicate():
        return
      if self.proc.poll() is not None:
        pytest.fail(f"{self.workdir}: exited {self.proc.returncode} before {what}\n"
                    f"{self.stderr[-3000:]}")
      time.sleep(0.02)
    self.kill()
    pytest.fail(f"{self.workdir}: timed out waiting for {what}")


def run_to_end(workdir: Path, args, timeout=TIMEOUT_S) -> subprocess.CompletedProcess:
  cmd = [sys.executable, "-m", "experiments.run", "--workdir", str(workdir), *args]
  return subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True,
                        timeout=timeout)


def one_line_error(res: subprocess.CompletedProcess, code: int = 2) -> str:
  """The single ``error:`` line, which must also be the last line of stderr."""
  assert res.returncode == code, f"exit {res.returncode}\n{res.stderr[-3000:]}"
  assert "Traceback" not in res.stderr
  errors = [l for l in res.stderr.splitlines() if l.startswith("error:")]
  assert len(errors) == 1, res.stderr[-3000:]
  assert errors[0] == res.stderr.strip().splitlines()[-1]
  return errors[0]


def ckpt_steps(workdir: Path) -> list[int]:
  """Committed checkpoint steps (orbax writes to a temporary name, then renames)."""
  d = workdir / "checkpoints"
  return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


def metric_lines(workdir: Path) -> list[dict]:
  path = workdir / "metrics.jsonl"
  if not path.is_file():
    return []
  out = []
  for line in path.read_text().splitlines():
    try:
      out.append(json.loads(line))
    except json.JSONDecodeError:
      pass   # a line being written right now
  return out


def train_losses(workdir: Path) -> dict[int, float]:
  from tensorboard.backend.event_processing import event_accumulator
  acc = event_accumulator.EventAccumulator(str(workdir / "tensorboard"),
                                           size_guidance={event_accumulator.SCALARS: 0})
  acc.Reload()
  return {e.step: e.value for e in acc.Scalars("train/loss")}


def snapshot(root: Path) -> dict[str, tuple[int, str]]:
  """``{relative path: (mtime_ns, sha256)}`` of every file under ``root``.

  Leaves out ``.lock``, which every run rewrites with its pid.
  """
  return {str(p.relative_to(root)): (p.stat().st_mtime_ns,
                                     hashlib.sha256(p.read_bytes()).hexdigest())
          for p in sorted(root.rglob("*")) if p.is_file() and p.name != ".lock"}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
  """The workdir of the uninterrupted run (it also fills the compilation cache)."""
  workdir = tmp_path_factory.mktemp("reference") / "run"
  res = run_to_end(workdir, KILL_RUN)
  assert res.returncode == 0, res.stderr[-3000:]
  return workdir


# --------------------------------------------------------------------------
# kill -9, then resume.
# --------------------------------------------------------------------------
def test_kill9_then_resume_matches_uninterrupted_run(reference, tmp_path):
  workdir = tmp_path / "run"
  run = Run(workdir, KILL_RUN, name="first")
  try:
    # Past a committed checkpoint, with eval lines after it on disk.
    run.wait_for(lambda: ckpt_steps(workdir) and any(
        r["step"] > ckpt_steps(workdir)[0] for r in metric_lines(workdir)),
        "a checkpoint and a later eval")
    run.signal(signal.SIGKILL)
    assert run.wait() == -signal.SIGKILL
  finally:
    run.kill()
  killed_at = max(r["step"] for r in metric_lines(workdir))
  saved = ckpt_steps(workdir)
  assert saved and saved[-1] < KILL_STEPS and killed_at < KILL_STEPS   # really mid-run
  assert saved[-1] % KILL_CKPT_EVERY == 0

  res = run_to_end(workdir, KILL_RUN)
  assert res.returncode == 0, res.stderr[-3000:]
  assert re.search(rf"resumed from \S+ at step {saved[-1]}\b", res.stderr), res.stderr[-3000:]
  assert f"step {saved[-1] + 5}/{KILL_STEPS}" in res.stderr     # restarted right after it
  assert f"step {saved[-1]}/{KILL_STEPS}" not in res.stderr

  ref = reference   # the uninterrupted run's workdir
  got, want = metric_lines(workdir), metric_lines(ref)
  steps = [r["step"] for r in got]
  assert len(steps) == len(set(steps)), f"duplicate steps: {steps}"
  assert steps == list(range(5, KILL_STEPS + 1, 5)) == [r["step"] for r in want]
  assert "eval/loss" in got[-1] and "eval/accuracy" in got[-1]
  # Params, optimizer state, RNG and data position were all restored: the same
  # numbers, bit for bit (the steps before the checkpoint come from the first run).
  assert got[-1] == want[-1]
  assert got == want
  # The train-loss curve (TensorBoard, stale events of the killed run purged) too.
  lg, lw = train_losses(workdir), train_losses(ref)
  assert sorted(lg) == sorted(lw) == list(range(5, KILL_STEPS + 1, 5))
  np.testing.assert_allclose([lg[s] for s in sorted(lw)], [lw[s] for s in sorted(lw)],
                             rtol=1e-6)
  assert ckpt_steps(workdir)[-1] == KILL_STEPS == ckpt_steps(ref)[-1]
  assert not [p for p in (workdir / "checkpoints").iterdir() if not p.name.isdigit()]


def test_unreadable_latest_checkpoint_falls_back_to_older_one(reference, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(reference, workdir)
  saved = ckpt_steps(workdir)
  assert len(saved) >= 2 and saved[-1] == KILL_STEPS
  # Truncate the largest array file of the latest checkpoint (a disk-full or
  # interrupted copy): orbax/tensorstore cannot read it back.
  files = [p for p in (workdir / "checkpoints" / str(KILL_STEPS) / "state").rglob("*")
           if p.is_file()]
  victim = max(files, key=lambda p: p.stat().st_size)
  damaged = victim.read_bytes()[:100]
  victim.write_bytes(damaged)

  res = run_to_end(workdir, KILL_RUN)
  # (No check for "Traceback": tensorstore's threads may still print "Event loop
  # is closed" for the failed read's other shards, outside our control.)
  assert res.returncode == 0, res.stderr[-3000:]
  assert f"checkpoint {KILL_STEPS} in" in res.stderr and "could not be restored" in res.stderr
  assert re.search(rf"resumed from \S+ at step {saved[-2]}\b", res.stderr), res.stderr[-3000:]
  # Nothing deleted: the unreadable checkpoint was moved aside, byte for byte.
  aside = workdir / "checkpoints_unreadable" / f"{KILL_STEPS}-1"
  assert (aside / victim.relative_to(workdir / "checkpoints" / str(KILL_STEPS))
          ).read_bytes() == damaged
  # Retrained from the older checkpoint to the same numbers, and saved anew.
  assert ckpt_steps(workdir)[-1] == KILL_STEPS
  assert metric_lines(workdir) == metric_lines(reference)
  # The records it recomputed are kept from before the resume too.
  backup = workdir / "metrics.jsonl.before-resume-1"
  assert backup.read_text() == (reference / "metrics.jsonl").read_text()


def test_killed_between_final_checkpoint_and_final_eval_evaluates_on_resume(
    reference, tmp_path):
  # The last checkpoint is saved before the last eval; a kill between the two
  # leaves a finished checkpoint without the final metrics line.
  workdir = tmp_path / "run"
  shutil.copytree(reference, workdir)
  want = metric_lines(reference)
  (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in want[:-1]))
  res = run_to_end(workdir, KILL_RUN)
  assert res.returncode == 0, res.stderr[-3000:]
  assert re.search(rf"resumed from \S+ at step {KILL_STEPS}\b", res.stderr)
  got = metric_lines(workdir)
  assert [r["step"] for r in got] == [r["step"] for r in want]
  final = {k: v for k, v in want[-1].items() if k != "train/loss"}  # not known on resume
  assert got[-1] == final
  assert ckpt_steps(workdir)[-1] == KILL_STEPS


# --------------------------------------------------------------------------
# SIGTERM: checkpoint at the next step, exit 0, resume from there.
# --------------------------------------------------------------------------
@pytest.mark.parametrize("sig,reason", [(signal.SIGTERM, "SIGTERM"), (signal.SIGINT, "Ctrl-C")])
def test_stop_signal_saves_checkpoint_and_exits_zero_then_resumes(tmp_path, sig, reason):
  workdir = tmp_path / "run"
  every = 10**6   # past num_train_steps: only the signal saves
  args = TINY + ["--config.num_train_steps=100000", f"--config.checkpoint_every_steps={every}",
                 f"--config.eval_every_steps={every}", "--config.log_every_steps=3"]
  run = Run(workdir, args, name="first")
  try:
    run.wait_for(lambda: "step 6/100000" in run.stderr, "the first progress lines")
    if sig == signal.SIGTERM:
      # A second run on the same workdir is refused while the first holds it.
      err = one_line_error(run_to_end(workdir, args, timeout=120))
      assert "in use by pid" in err and str(workdir) in err, err
    run.signal(sig)
    assert run.wait() == 0, run.stderr[-3000:]
  finally:
    run.kill()
  assert "Traceback" not in run.stderr
  m = re.search(rf"{reason}: saved checkpoint at step (\d+)", run.stderr)
  assert m, run.stderr[-3000:]
  stopped = int(m.group(1))
  assert stopped >= 6
  assert ckpt_steps(workdir) == [stopped]
  assert (workdir / "checkpoints" / str(stopped) / "state" / "_METADATA").is_file()

  # Continue for 4 more steps (num_train_steps may change on resume).
  end = stopped + 4
  res = run_to_end(workdir, [*args, f"--config.num_train_steps={end}"])
  assert res.returncode == 0, res.stderr[-3000:]
  assert re.search(rf"resumed from \S+ at step {stopped}\b", res.stderr), res.stderr[-3000:]
  assert f"step {end}/{end}" in res.stderr
  assert ckpt_steps(workdir) == [stopped, end]
  assert [r["step"] for r in metric_lines(workdir)] == [end]
  # The change was recorded beside, not over, the original config.
  assert json.loads((workdir / "config.json").read_text())["num_train_steps"] == 100000
  resumed_cfg = json.loads((workdir / f"config.resume-{stopped}.json").read_text())
  assert resumed_cfg["num_train_steps"] == end


# --------------------------------------------------------------------------
# Refused resume: a changed model field.
# --------------------------------------------------------------------------
def test_resume_with_changed_model_field_is_refused_and_leaves_workdir_alone(
    reference, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(reference, workdir)   # copy2: keeps mtimes
  before = snapshot(workdir)
  assert "config.json" in before and any(k.startswith("checkpoints/") for k in before)
  res = run_to_end(workdir, [*KILL_RUN, "--config.model.emb_dim=48"], timeout=120)
  err = one_line_error(res)
  assert "model.emb_dim" in err and "32" in err and "48" in err, err
  assert snapshot(workdir) == before
  assert not list(workdir.glob("config.resume-*"))


# --------------------------------------------------------------------------
# Unwritable workdir.
# --------------------------------------------------------------------------
def test_unwritable_workdir_is_one_line_error(tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("not a directory")
  workdir = blocker / "run"       # the parent is a regular file: fails even as root
  res = run_to_end(workdir, TINY, timeout=120)
  err = one_line_error(res)
  assert str(workdir) in err and "workdir" in err, err
  assert blocker.read_text() == "not a directory"


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0,
                    reason="root ignores directory permissions")
def test_read_only_workdir_is_one_line_error(tmp_path):
  workdir = tmp_path / "ro"
  workdir.mkdir()
  workdir.chmod(0o500)
  try:
    err = one_line_error(run_to_end(workdir, TINY, timeout=120))
    assert str(workdir) in err and "not writable" in err, err
  finally:
    workdir.chmod(0o700)


# --------------------------------------------------------------------------
# NaN loss.
# --------------------------------------------------------------------------
def test_nan_loss_stops_with_last_good_checkpoint(tmp_path):
  workdir = tmp_path / "run"
  # No warm-up and a constant absurd learning rate: the first Adam update moves
  # every weight by ~1e30 (Adam normalises the gradient, so clipping cannot stop
  # it) and the next forward pass overflows.
  args = TINY + ["--config.learning_rate=1e30", "--config.schedule=constant",
                 "--config.warmup_steps=0",
                 "--config.num_train_steps=50", "--config.checkpoint_every_steps=1",
                 "--config.log_every_steps=1", "--config.eval_every_steps=1000"]
  res = run_to_end(workdir, args, timeout=120)
  err = one_line_error(res, code=1)
  m = re.search(r"loss is (\S+) at step (\d+).*last good checkpoint \(step (\d+)\)", err)
  assert m, err
  value, bad_step, good_step = m.group(1).rstrip(";"), int(m.group(2)), int(m.group(3))
  assert not math.isfinite(float(value)) and re.search(r"(?i)nan|inf", value)
  assert 1 <= good_step < bad_step < 50
  assert str(workdir / "checkpoints") in err
  steps = ckpt_steps(workdir)
  assert steps and steps[-1] == good_step   # kept, and nothing newer was saved
  assert (workdir / "checkpoints" / str(good_step) / "state" / "_METADATA").is_file()
  assert not (workdir / "metrics.jsonl").exists() or not metric_lines(workdir)


# --------------------------------------------------------------------------
# The learning rate is an input of the compiled step, not a constant in it.
# --------------------------------------------------------------------------
def test_changing_learning_rate_does_not_recompile_train_step():
  import jax
  import jax.numpy as jnp
  from experiments import optim, train
  from experiments.configs import default
  from experiments.data import create_datasets
  from experiments.models import create_model

  c = default.get_config()
  c.model.emb_dim = c.model.qkv_dim = 16
  c.model.mlp_dim, c.model.num_layers = 32, 1
  ds = create_datasets(c.data, seed=0, batch_size=8)
  model = create_model(c.model, src_vocab_size=ds.src_vocab.size,
                       tgt_vocab_size=ds.tgt_vocab.size, max_len=64)
  tx = optim.make_optimizer(c)
  batch = next(ds.train)

  @jax.jit
  def init(key):
    params = model.init({"params": key}, batch["src"], batch["tgt_in"], train=False)["params"]
    return params, tx.init(params)

  params, opt_state = init(jax.random.key(0))
  state = train.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state,
                           rng=jax.random.key_data(jax.random.key(1)))
  step_fn = jax.jit(train.make_train_step(model, tx, "seq2seq", c))

  deltas = {}
  for lr in (1e-3, 5e-4):    # two different values from the same state
    new, metrics = step_fn(state, batch, np.float32(lr))
    assert float(new.opt_state.hyperparams["learning_rate"]) == pytest.approx(lr)
    assert np.isfinite(float(metrics["loss"]))
    deltas[lr] = float(jnp.sqrt(sum(jnp.sum((a - b) ** 2) for a, b in zip(
        jax.tree.leaves(new.params), jax.tree.leaves(params)))))
    assert step_fn._cache_size() == 1
  # The value is really used: Adam's first step moves each weight by ~lr.
  assert deltas[5e-4] == pytest.approx(deltas[1e-3] / 2, rel=1e-3)
  # A schedule feeding a new value every step, as the trainer does: still one program.
  lr_fn = optim.learning_rate_fn(c)
  for step in range(3):
    state, _ = step_fn(state, next(ds.train), np.float32(lr_fn(step)))
  assert int(state.step) == 3
  assert step_fn._cache_size() == 1


def test_restore_latest_without_fallback_names_the_step_and_moves_nothing(tmp_path):
  import jax.numpy as jnp
  from experiments.checkpoints import Checkpointer, ResumeError
  state = {"w": jnp.arange(4096, dtype=jnp.float32)}
  with Checkpointer(tmp_path / "checkpoints", max_to_keep=3) as ckpt:
    for step in (5, 10):
      ckpt.save(step, {"w": state["w"] + step}, {"pos": step}, wait=True)
  files = [p for p in (tmp_path / "checkpoints" / "10" / "state").rglob("*") if p.is_file()]
  victim = max(files, key=lambda p: p.stat().st_size)
  victim.write_bytes(victim.read_bytes()[:100])
  before = snapshot(tmp_path)
  with Checkpointer(tmp_path / "checkpoints", max_to_keep=3) as ckpt:
    with pytest.raises(ResumeError, match=r"checkpoint 10 in .* move .*10 aside"):
      ckpt.restore_latest(state, fallback=False)
  assert snapshot(tmp_path) == before    # several processes: nothing moved
  with Checkpointer(tmp_path / "checkpoints", max_to_keep=3) as ckpt:
    step, got, data = ckpt.restore_latest(state)
  assert step == 5 and data == {"pos": 5}
  np.testing.assert_array_equal(got["w"], np.arange(4096) + 5)
  assert ckpt_steps(tmp_path) == [5]
  assert (tmp_path / "checkpoints_unreadable" / "10-1").is_dir()
