"""Data parallelism is invisible in the numbers: 1 vs 8 devices, 2 hosts x 2 vs 1 x 4.

Every run is a real ``python -m experiments.run`` subprocess (the device count
must be fixed before JAX starts), bounded by a timeout and killed with its
process group on failure. Runs are shared by the tests of a module-scoped
fixture and started concurrently, since most of their time is compilation.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 240
RTOL = 1e-5

# Eight steps of the default reverse task at a tiny size; every step logged,
# two evaluations. The two-host runs also decode (BLEU through the gather path).
STEPS = 8
DECODE = ["--config.decode.enabled=True", "--config.decode.num_batches=1"]
SMALL = ["--config.decode.enabled=False",
    f"--config.num_train_steps={STEPS}", "--config.eval_every_steps=4",
    f"--config.checkpoint_every_steps={STEPS}", "--config.log_every_steps=1",
    "--config.batch_size=16", "--config.eval_batch_size=16", "--config.num_eval_batches=2",
    "--config.num_plot_examples=0",
    "--config.data.num_eval=32", "--config.model.emb_dim=32", "--config.model.qkv_dim=32",
    "--config.model.mlp_dim=64", "--config.model.num_layers=1", "--config.warmup_steps=4",
]


def _env(devices: int, **extra: str) -> dict[str, str]:
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(("JAX_", "ATTENTION_", "XLA_"))}
  env.update(JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", **extra)
  return env


class Run:
  """One ``experiments.run`` process writing stdout/stderr to files in ``logs``."""

  def __init__(self, workdir: Path, logs: Path, env: dict[str, str], args=(), name="run"):
    self.workdir = workdir
    logs.mkdir(parents=True, exist_ok=True)
    self.out_path, self.err_path = logs / f"{name}.out", logs / f"{name}.err"
    cmd = [sys.executable, "-m", "experiments.run", "--workdir", str(workdir), *args]
    with open(self.out_path, "w") as out, open(self.err_path, "w") as err:
      self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=err,
                                   start_new_session=True)

  def kill(self) -> None:
    if self.proc.poll() is None:
      os.killpg(self.proc.pid, signal.SIGKILL)
      self.proc.wait(timeout=30)

  def wait(self, deadline: float) -> int:
    try:
      return self.proc.wait(timeout=max(deadline - time.monotonic(), 1))
    except subprocess.TimeoutExpired:
      self.kill()
      pytest.fail(f"{self.workdir} ran past {TIMEOUT_S} s; stderr tail:\n{self.stderr[-3000:]}")

  @property
  def stderr(self) -> str:
    return self.err_path.read_text()

  @property
  def stdout(self) -> str:
    return self.out_path.read_text()


def run_all(runs: list[Run]) -> None:
  """Waits for every run (killing all of them if one fails or times out)."""
  deadline = time.monotonic() + TIMEOUT_S
  try:
    for r in runs:
      rc = r.wait(deadline)
      assert rc == 0, f"{r.workdir}: exit {rc}\n{r.stderr[-3000:]}"
  finally:
    for r in runs:
      r.kill()


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def eval_records(workdir: Path) -> list[dict]:
  return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def train_scalars(workdir: Path, tag: str) -> dict[int, float]:
  """``{step: value}`` of a TensorBoard scalar (written by tensorboardX)."""
  from tensorboard.backend.event_processing import event_accumulator
  acc = event_accumulator.EventAccumulator(str(workdir / "tensorboard"),
                                           size_guidance={event_accumulator.SCALARS: 0})
  acc.Reload()
  return {e.step: e.value for e in acc.Scalars(tag)}


def assert_same_training(a: Path, b: Path) -> None:
  """Same train curves (TensorBoard) and eval metrics (metrics.jsonl) to fp32 tolerance."""
  for tag in ("train/loss", "train/grad_norm"):
    ca, cb = train_scalars(a, tag), train_scalars(b, tag)
    assert sorted(ca) == list(range(1, STEPS + 1)), (tag, ca)
    assert sorted(cb) == sorted(ca), tag
    np.testing.assert_allclose([cb[s] for s in sorted(ca)], [ca[s] for s in sorted(ca)],
                               rtol=RTOL, err_msg=tag)
  la = train_scalars(a, "train/loss")
  assert la[STEPS] < la[1] - 0.1     # the curve moves: a real trajectory, not a constant
  ra, rb = eval_records(a), eval_records(b)
  assert [r["step"] for r in ra] == [4, 8] == [r["step"] for r in rb]
  for x, y in zip(ra, rb):
    assert x.keys() == y.keys()
    for key in ("eval/loss", "eval/accuracy", "eval/perplexity"):
      assert key in x
    np.testing.assert_allclose([y[k] for k in sorted(x) if k != "step"],
                               [x[k] for k in sorted(x) if k != "step"], rtol=RTOL, atol=1e-7,
                               err_msg=f"step {x['step']}: {sorted(x)}")
  assert ra[-1]["eval/loss"] < ra[0]["eval/loss"]   # it trained


def devices_line(run: Run) -> str:
  lines = [l for l in run.stderr.splitlines() if " parameters; " in l]
  assert len(lines) == 1, run.stderr[-2000:]
  return lines[0]


# --------------------------------------------------------------------------
# 1 device vs 8 simulated devices.
# --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def one_vs_eight(tmp_path_factory):
  base = tmp_path_factory.mktemp("one_vs_eight")
  runs = [Run(base / f"dev{n}", base / "logs", _env(n), SMALL, name=f"dev{n}") for n in (1, 8)]
  run_all(runs)
  return runs


def test_one_and_eight_devices_train_identically(one_vs_eight):
  one, eight = one_vs_eight
  assert "; 1 devices (" in devices_line(one)
  assert "; 8 devices (" in devices_line(eight) and "('data', 8)" in devices_line(eight)
  assert_same_training(one.workdir, eight.workdir)
  assert "eval/bleu" not in eval_records(one.workdir)[0]   # decoding off here
  # Both saved their final state at the same step.
  for r in one_vs_eight:
    assert sorted(int(p.name) for p in (r.workdir / "checkpoints").iterdir()
                  if p.name.isdigit()) == [STEPS]


# --------------------------------------------------------------------------
# 2 processes x 2 devices over jax.distributed vs 1 process x 4 devices.
# --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def two_hosts(tmp_path_factory):
  base = tmp_path_factory.mktemp("two_hosts")
  port = free_port()
  shared = base / "multi"   # one workdir for both hosts, as a pod shares a gs:// bucket
  runs = [Run(base / "single4", base / "logs", _env(4), SMALL + DECODE, name="single4")]
  for pid in (0, 1):
    env = _env(2, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
               JAX_PROCESS_ID=str(pid))
    runs.append(Run(shared, base / "logs", env, SMALL + DECODE, name=f"host{pid}"))
  run_all(runs)
  return runs


def test_two_processes_match_one_process_with_four_devices(two_hosts):
  single, host0, host1 = two_hosts
  assert "; 4 devices (" in devices_line(single)
  assert "; 4 devices (" in devices_line(host0)   # the global mesh spans both processes
  assert_same_training(single.workdir, host0.workdir)
  # Decoding ran on both hosts and was gathered: BLEU over the same rows.
  assert all("eval/bleu" in r and "eval_by_length/count_0-9" in r
             for r in eval_records(host0.workdir))


def test_two_processes_only_host0_writes_logs_and_both_checkpoint(two_hosts):
  _, host0, host1 = two_hosts
  shared = host0.workdir
  # Process 1 reports nothing (no progress, no summary line); process 0 does.
  assert "outputs in" in host0.stdout and "outputs in" not in host1.stdout
  assert "step 8/8" in host0.stderr and "step 8/8" not in host1.stderr
  assert len(list((shared / "tensorboard").iterdir())) == 1
  assert [r["step"] for r in eval_records(shared)] == [4, 8]     # one line per eval, no dupes
  assert json.loads((shared / "config.json").read_text())["batch_size"] == 16
  # The collective orbax save completed: a committed step directory holding each
  # process's shard of the OCDBT state, and nothing left in a temporary directory.
  ckpts = shared / "checkpoints"
  assert sorted(p.name for p in ckpts.iterdir()) == [str(STEPS)]
  state = ckpts / str(STEPS) / "state"
  assert (state / "_METADATA").is_file()
  assert {p.name for p in state.glob("ocdbt.process_*")} == {"ocdbt.process_0",
                                                            "ocdbt.process_1"}


# --------------------------------------------------------------------------
# Bad device/batch combination.
# --------------------------------------------------------------------------
def test_batch_not_divisible_by_devices_is_one_line_error(tmp_path):
  cmd = [sys.executable, "-m", "experiments.run", "--workdir", str(tmp_path / "w"), *SMALL,
         "--config.batch_size=10"]
  res = subprocess.run(cmd, cwd=ROOT, env=_env(8), capture_output=True, text=True, timeout=120)
  assert res.returncode == 2, res.stderr[-2000:]
  assert "Traceback" not in res.stderr
  errors = [l for l in res.stderr.splitlines() if l.startswith("error:")]
  assert len(errors) == 1 and errors[0] == res.stderr.strip().splitlines()[-1], res.stderr
  assert "batch_size=10" in errors[0] and "8" in errors[0]
  assert "eval_batch_size" not in errors[0]   # names the field that is wrong
  assert not (tmp_path / "w" / "checkpoints").exists()
