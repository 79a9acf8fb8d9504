"""launch/: sweep expansion, dry-run command lines, a real local sweep, TPU preemption recovery."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from launch import gcloud, report, slurm, sweep, tpu
from launch import manifest as mf
from launch.sweep_spec import (MAX_NAME_LEN, SweepError, load_sweep, make_trials, product,
                               trial_name, zip_)

ROOT = pathlib.Path(__file__).resolve().parents[1]
PY = sys.executable
TINY = ["--config.num_train_steps=4", "--config.eval_every_steps=4",
        "--config.checkpoint_every_steps=2", "--config.log_every_steps=2",
        "--config.batch_size=8", "--config.eval_batch_size=8", "--config.num_eval_batches=1",
        "--config.decode.num_batches=1", "--config.num_plot_examples=0",
        "--config.data.num_eval=8", "--config.model.emb_dim=16", "--config.model.qkv_dim=16",
        "--config.model.mlp_dim=16", "--config.model.num_layers=1"]
KILL = ('sudo pkill -9 -f "[e]xperiments[.]run"; sudo lsof -t /dev/accel* /dev/vfio/[0-9]*'
        ' 2>/dev/null | xargs -r sudo kill -9; sudo rm -f /tmp/libtpu_lockfile')
G = "gcloud compute tpus tpu-vm"
Q = "gcloud alpha compute tpus queued-resources"


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch):
  monkeypatch.chdir(ROOT)   # config paths in launcher commands are repo-relative


def _cli(module, *args, timeout=120, **kw):
  return subprocess.run([PY, "-m", module, *args], capture_output=True, text=True,
                        timeout=timeout, cwd=ROOT, **kw)


def _write_config(path, body):
  path.write_text("from experiments.configs.default import get_config  # noqa: F401\n"
                  "from launch.sweep_spec import product, zip_  # noqa: F401\n\n" + body)
  return str(path)


# ------------------------------------------------------------------ expansion

def test_product_and_zip_values_and_order():
  assert list(product(learning_rate=[1e-3, 3e-3], **{"model.num_heads": [4, 8]})) == [
      {"learning_rate": 1e-3, "model.num_heads": 4}, {"learning_rate": 1e-3, "model.num_heads": 8},
      {"learning_rate": 3e-3, "model.num_heads": 4}, {"learning_rate": 3e-3, "model.num_heads": 8}]
  assert list(zip_(learning_rate=[1e-3, 3e-3], warmup_steps=[100, 300])) == [
      {"learning_rate": 1e-3, "warmup_steps": 100}, {"learning_rate": 3e-3, "warmup_steps": 300}]
  with pytest.raises(SweepError, match="equal lengths"):
    list(zip_(a=[1, 2], b=[1]))


def test_trial_names_deterministic_and_safe():
  a = trial_name({"model.num_heads": 4, "learning_rate": 1e-3})
  assert a == trial_name({"learning_rate": 0.001, "model.num_heads": 4})
  assert a == "learning_rate=0.001,model.num_heads=4"
  assert trial_name({}) == "base"
  odd = trial_name({"data.dir": "/data/m30k", "decode.length_buckets": (0, 10)})
  assert "/" not in odd and " " not in odd and odd == trial_name(
      {"decode.length_buckets": (0, 10), "data.dir": "/data/m30k"})
  # Sanitising must not merge different trials.
  assert trial_name({"data.dir": "a/b"}) != trial_name({"data.dir": "a_b"})
  long = {f"model.field_{i}": "x" * 20 for i in range(10)}
  name = trial_name(long)
  assert len(name) <= MAX_NAME_LEN and name == trial_name(dict(reversed(long.items())))
  assert name != trial_name({**long, "model.field_9": "y" * 20})


def test_load_sweep_styles_and_errors(tmp_path):
  assert load_sweep(str(ROOT / "experiments/configs/luong_mt.py"))[:2] == [
      {"model.score": "dot", "model.mode": "global"},
      {"model.score": "dot", "model.mode": "local-p"}]
  gen = _write_config(tmp_path / "gen.py", "def get_sweep(arg=None):\n"
                      "  yield from zip_(seed=[0, 1], learning_rate=[0.1, 0.2])\n"
                      "  if arg == 'more':\n    yield {'seed': 9}\n")
  assert load_sweep(gen) == [{"seed": 0, "learning_rate": 0.1}, {"seed": 1, "learning_rate": 0.2}]
  assert load_sweep(gen + ":more")[-1] == {"seed": 9}
  typo = _write_config(tmp_path / "typo.py",
                       "def get_sweep(add):\n  add(**{'model.num_head': 2})\n")
  with pytest.raises(SweepError, match="model.num_head"):
    load_sweep(typo)
  dup = _write_config(tmp_path / "dup.py", "def get_sweep(add):\n  add(seed=1)\n  add(seed=1)\n")
  with pytest.raises(SweepError, match="twice"):
    load_sweep(dup)
  with pytest.raises(SweepError, match="replace swept"):
    make_trials(gen, load_sweep(gen), "w", ["--config.seed=3"])


# ------------------------------------------------------------------ dry runs

def test_sweep_dry_run_prints_one_command_per_trial(tmp_path):
  cfg = _write_config(tmp_path / "s.py", "def get_sweep(add):\n  for o in product(\n"
                      "      learning_rate=[1e-3, 3e-3], **{'model.num_heads': [4, 8]}):\n"
                      "    add(**o)\n")
  w = tmp_path / "sw"
  res = _cli("launch.sweep", "--config", cfg, "--workdir", str(w), "--dry-run", "--parallel", "2",
             "--extra", "--config.num_train_steps=4", "--config.data.dir=/d x")
  assert res.returncode == 0, res.stderr
  expected = [f"{PY} -m experiments.run --config {cfg} --workdir {w}/{n} "
              f"--config.learning_rate={lr} --config.model.num_heads={h} "
              "--config.num_train_steps=4 '--config.data.dir=/d x'"
              for lr, h, n in [("0.001", 4, "learning_rate=0.001,model.num_heads=4"),
                               ("0.001", 8, "learning_rate=0.001,model.num_heads=8"),
                               ("0.003", 4, "learning_rate=0.003,model.num_heads=4"),
                               ("0.003", 8, "learning_rate=0.003,model.num_heads=8")]]
  assert res.stdout.splitlines() == expected
  assert not w.exists()   # a dry run writes nothing
  bad = _cli("launch.sweep", "--config", cfg, "--workdir", str(w), "--dry-run", "--bogus")
  assert bad.returncode == 2 and "--bogus" in bad.stderr
  zero = _cli("launch.sweep", "--config", cfg, "--workdir", str(w), "--dry-run",
              "--devices-per-trial", "0")
  assert zero.returncode == 2 and "--devices-per-trial must be >= 1" in zero.stderr
  typo = _cli("launch.sweep", "--config", cfg, "--workdir", str(w), "--dry-run",
              "--extra", "--config.num_train_stpes=4")
  assert typo.returncode == 2 and typo.stdout == ""
  assert "--extra override 'num_train_stpes' is not in the config" in typo.stderr
  assert not w.exists()


def _tpu(capsys, *args):
  assert tpu.main([*args, "--dry-run"]) == 0
  return capsys.readouterr().out.splitlines()


def test_tpu_dry_run_commands(capsys):
  base = ["--name", "t1", "--zone", "us-central2-b", "--code-dir", "/src/attention"]
  assert _tpu(capsys, "create", *base) == [
      f"{G} create t1 --zone us-central2-b --accelerator-type v4-8 --version tpu-ubuntu2204-base"]
  assert _tpu(capsys, "create", *base, "--spot", "--accelerator-type", "v5litepod-8",
              "--version", "v2-alpha-tpuv5-lite") == [
      f"{G} create t1 --zone us-central2-b --accelerator-type v5litepod-8"
      " --version v2-alpha-tpuv5-lite --spot"]
  assert _tpu(capsys, "create", *base, "--spot", "--queued") == [
      f"{Q} create t1 --node-id t1 --zone us-central2-b --accelerator-type v4-8"
      " --runtime-version tpu-ubuntu2204-base --spot"]
  assert _tpu(capsys, "create", *base, "--reserved", "--project", "p1") == [
      f"{Q} create t1 --node-id t1 --zone us-central2-b --accelerator-type v4-8"
      " --runtime-version tpu-ubuntu2204-base --reserved --project p1"]
  assert _tpu(capsys, "setup", *base) == [
      f"{G} scp --recurse /src/attention t1: --zone us-central2-b --worker=all",
      f"{G} ssh t1 --zone us-central2-b --worker=all"
      " --command 'cd ~/attention && bash launch/run_tpu.sh setup'"]
  assert _tpu(capsys, "run", *base, "--config", "experiments/configs/luong_mt.py:data=reverse",
              "--workdir", "/gcs/bkt/luong", "--config.seed=2") == [
      f"{G} ssh t1 --zone us-central2-b --worker=all --command '{KILL}; cd ~/attention && bash"
      " launch/run_tpu.sh run luong --config experiments/configs/luong_mt.py:data=reverse"
      " --workdir /gcs/bkt/luong --config.seed=2'"]
  assert _tpu(capsys, "logs", *base, "--dest", "/tmp/logs") == [
      f"{G} scp --recurse t1:attention_logs /tmp/logs --zone us-central2-b --worker=all"]
  assert _tpu(capsys, "status", *base) == [
      f"{G} describe t1 --zone us-central2-b '--format=value(state)'",
      f"{G} list --zone us-central2-b"]
  assert _tpu(capsys, "status", *base, "--queued")[0] == (
      f"{Q} describe t1 --zone us-central2-b '--format=value(state.state)'")
  assert _tpu(capsys, "delete", *base) == [f"{G} delete t1 --zone us-central2-b --quiet"]
  assert _tpu(capsys, "delete", *base, "--spot", "--queued", "--project", "p1") == [
      f"{Q} delete t1 --zone us-central2-b --project p1 --quiet --force"]


def test_tpu_sweep_dry_run_spreads_trials_over_vms(tmp_path, capsys, monkeypatch):
  monkeypatch.setattr(tpu, "REPO", str(tmp_path))   # the config must live in the copied repo
  (tmp_path / "cfgs").mkdir()
  cfg = _write_config(tmp_path / "cfgs" / "s.py",
                      "def get_sweep(add):\n  for s in (0, 1, 2):\n    add(seed=s)\n")
  out = _tpu(capsys, "sweep", "--name", "sw", "--zone", "z", "--num-vms", "2", "--spot",
             "--code-dir", "/src/attention", "--config", cfg, "--workdir", "/gcs/b/s")
  prep = lambda vm: [  # noqa: E731
      f"{G} describe {vm} --zone z '--format=value(state)'",
      f"{G} create {vm} --zone z --accelerator-type v4-8 --version tpu-ubuntu2204-base --spot",
      f"{G} scp --recurse /src/attention {vm}: --zone z --worker=all",
      f"{G} ssh {vm} --zone z --worker=all"
      " --command 'cd ~/attention && bash launch/run_tpu.sh setup'"]
  run = lambda vm, s: (  # noqa: E731
      f"{G} ssh {vm} --zone z --worker=all --command '{KILL}; cd ~/attention && bash"
      f" launch/run_tpu.sh run seed={s} --config cfgs/s.py"
      f" --workdir /gcs/b/s/seed={s} --config.seed={s}'")
  assert out == prep("sw-0") + [run("sw-0", 0), run("sw-0", 2)] + prep("sw-1") + [run("sw-1", 1)]


def test_tpu_stages_only_tracked_code(tmp_path):
  tpu._stage(str(ROOT), str(tmp_path / "attention"))
  assert (tmp_path / "attention" / "launch" / "run_tpu.sh").exists()
  assert (tmp_path / "attention" / "experiments" / "run.py").exists()
  assert not (tmp_path / "attention" / ".git").exists()


@pytest.mark.parametrize("final_step,rc", [(4, 0), (2, mf.EXIT_INCOMPLETE)])
def test_run_tpu_sh_flags_runs_stopped_before_their_last_step(tmp_path, final_step, rc):
  # A stand-in venv whose "training" stops at final_step of 4 and exits 0, as
  # experiments.run does after a preemption SIGTERM.
  venv = tmp_path / "venv" / "bin"
  venv.mkdir(parents=True)
  (venv / "python").write_text(
      "#!/bin/bash\nif [ \"$2\" = experiments.run ]; then mkdir -p \"$4\"\n"
      "  echo '{\"num_train_steps\": 4}' > \"$4/config.json\"\n"
      f"  echo '{{\"step\": {final_step}}}' > \"$4/metrics.jsonl\"; exit 0; fi\n"
      f"exec {PY} \"$@\"\n")
  (venv / "python").chmod(0o755)
  env = {**os.environ, "ATTENTION_VENV": str(tmp_path / "venv"),
         "ATTENTION_LOGS": str(tmp_path / "logs")}
  res = subprocess.run(["bash", "launch/run_tpu.sh", "run", "r1", "--workdir", str(tmp_path / "w")],
                       capture_output=True, text=True, timeout=60, env=env, cwd=ROOT)
  assert res.returncode == rc, res.stdout + res.stderr
  (log,) = (tmp_path / "logs").iterdir()
  assert log.name.startswith("r1.") and "experiments.run --workdir" in log.read_text()


def test_slurm_dry_run_script(capsys):
  assert slurm.main(["--config", "experiments/configs/transformer_mt.py", "--workdir",
                     "/shared/mt", "--nodes", "2", "--gpus-per-node", "4", "--partition", "gpu",
                     "--time", "12:00:00", "--output", "/tmp/job.sbatch", "--dry-run",
                     "--python", "python", "--config.batch_size=256"]) == 0
  assert capsys.readouterr().out.splitlines() == [
      "#!/bin/bash",
      "#SBATCH --job-name=attention",
      "#SBATCH --nodes=2",
      "#SBATCH --ntasks-per-node=4",
      "#SBATCH --gpus-per-node=4",
      "#SBATCH --partition=gpu",
      "#SBATCH --time=12:00:00",
      "#SBATCH --output=/shared/mt/slurm-%x-%j.out",
      "#SBATCH --open-mode=append",
      "#SBATCH --signal=TERM@120",
      "#SBATCH --requeue",
      "set -euo pipefail",
      "# Every task calls jax.distributed.initialize(); Slurm's env names the coordinator.",
      "export ATTENTION_MULTIHOST=1",
      "# --gpus-per-task=1 leaves each task one GPU, ordinal 0; JAX would otherwise pick",
      "# ordinal SLURM_LOCALID, which does not exist there (jax-ml/jax#23452).",
      "export JAX_LOCAL_DEVICE_IDS=0",
      "export PYTHONUNBUFFERED=1",
      "mkdir -p /shared/mt",
      "srun --ntasks-per-node=4 --gpus-per-task=1 python -m experiments.run --config"
      " experiments/configs/transformer_mt.py --workdir /shared/mt --config.batch_size=256",
      "sbatch /tmp/job.sbatch"]
  assert not os.path.exists("/shared/mt")
  res = _cli("launch.slurm", "--config", "c.py", "--workdir", "w", "--nodes", "1",
             "--gpus-per-node", "1", "--time", "12h", "--dry-run")
  assert res.returncode == 2 and "--time" in res.stderr


def test_device_env_gives_disjoint_devices():
  assert sweep.device_env("gpu", 1, 2, ["0", "1", "2", "3"], {}) == {"CUDA_VISIBLE_DEVICES": "2,3"}
  t = sweep.device_env("tpu", 3, 1, ["0", "1", "2", "3"], {})
  assert t["TPU_VISIBLE_CHIPS"] == "3" and t["TPU_CHIPS_PER_PROCESS_BOUNDS"] == "1,1,1"
  assert t["TPU_MESH_CONTROLLER_PORT"] == "8479"
  assert sweep.device_env("tpu", 0, 4, ["0", "1", "2", "3"], {}) == {}
  flags = {"XLA_FLAGS": "--a --xla_force_host_platform_device_count=8"}
  assert sweep.device_env("cpu", 5, 2, [], flags) == {
      "XLA_FLAGS": "--a --xla_force_host_platform_device_count=2"}
  assert sweep.device_env("gpu", 0, None, ["0"], {}) == {}
  with pytest.raises(SweepError):
    sweep.device_env("gpu", 2, 2, ["0", "1", "2", "3"], {})


# ------------------------------------------------------------------ TPU preemption

class FakeGcloud:
  """Scripted gcloud: ``respond(argv, calls) -> (rc, out, err)``; records every call."""

  def __init__(self, respond):
    self.respond = respond
    self.calls = []

  def run(self, argv):
    self.calls.append(list(argv))
    return self.respond(list(argv), self.calls)

  def kinds(self):
    def kind(a):
      if "ssh" in a:
        return "run" if "run_tpu.sh run" in a[-1] else "setup"
      if "tpu-vm" in a:
        return a[a.index("tpu-vm") + 1]
      return "qr-" + a[a.index("queued-resources") + 1]
    return [kind(a) for a in self.calls]


RUN_ARGS = ["run", "--name", "t1", "--zone", "z", "--spot", "--code-dir", "/src/attention",
            "--config", "experiments/configs/default.py", "--workdir", "/gcs/b/r",
            "--retry-wait", "0"]


def test_tpu_preempted_node_is_recreated_and_run_resumes(capsys):
  def respond(argv, calls):
    runs = sum("run_tpu.sh run" in c[-1] for c in calls if "ssh" in c)
    if "ssh" in argv and "run_tpu.sh run" in argv[-1] and runs == 1:
      return 255, "", "Connection closed by remote host.\n"
    if "describe" in argv:
      return 0, "PREEMPTED\n", ""
    return 0, "", ""
  fake = FakeGcloud(respond)
  assert tpu.main(RUN_ARGS, runner=fake, sleep=lambda s: None) == 0
  assert fake.kinds() == ["run", "describe", "delete", "create", "scp", "setup", "run"]
  run = fake.calls[0]
  assert fake.calls[-1] == run   # the very same command: experiments.run resumes
  assert " ".join(fake.calls[2]) == f"{G} delete t1 --zone z --quiet"
  assert " ".join(fake.calls[3]) == (f"{G} create t1 --zone z --accelerator-type v4-8"
                                     " --version tpu-ubuntu2204-base --spot")
  assert fake.calls[4] == gcloud.scp_to(gcloud.Node("t1", "z"), "/src/attention")
  assert "node PREEMPTED; recovery 1/3" in capsys.readouterr().err


def test_tpu_gives_up_after_max_retries(capsys):
  def respond(argv, calls):
    if "ssh" in argv and "run_tpu.sh run" in argv[-1]:
      return 255, "", "ERROR: the instance was preempted\n"
    if "describe" in argv:   # queued resource: suspended after a run, active after create
      after_run = len(calls) > 1 and "ssh" in calls[-2]
      return 0, ("SUSPENDED" if after_run else "ACTIVE") + "\n", ""
    return 0, "", ""
  fake = FakeGcloud(respond)
  args = RUN_ARGS[:] + ["--queued", "--max-retries", "2"]
  assert tpu.main(args, runner=fake, sleep=lambda s: None) == 1
  cycle = ["qr-delete", "qr-create", "qr-describe", "scp", "setup", "run", "qr-describe"]
  assert fake.kinds() == ["run", "qr-describe"] + cycle * 2
  err = capsys.readouterr().err
  assert "gave up after 2 retries (--max-retries)" in err and "node SUSPENDED" in err


def test_tpu_failed_recreation_uses_up_a_retry(capsys):
  def respond(argv, calls):
    creates = sum("create" in c for c in calls)
    if "create" in argv and creates == 1:
      return 1, "", "ERROR: There is no more capacity in the zone\n"
    if "ssh" in argv and "run_tpu.sh run" in argv[-1] and len(calls) == 1:
      return 255, "", "Connection reset by peer\n"
    return (0, "", "") if "describe" not in argv else (1, "", "NOT_FOUND\n")
  fake = FakeGcloud(respond)
  assert tpu.main(RUN_ARGS, runner=fake, sleep=lambda s: None) == 0
  assert fake.kinds() == ["run", "describe", "delete", "create", "delete", "create", "scp",
                          "setup", "run"]
  assert "re-creating it failed" in capsys.readouterr().err


def test_tpu_training_error_on_healthy_node_is_not_retried():
  fake = FakeGcloud(lambda argv, calls: (0, "READY\n", "") if "describe" in argv
                    else (2, "", "error: model.num_heads=3 does not divide\n"))
  assert tpu.main(RUN_ARGS, runner=fake, sleep=lambda s: None) == 2
  assert fake.kinds() == ["run", "describe"]


def test_tpu_incomplete_run_on_healthy_node_is_rerun():
  fake = FakeGcloud(lambda argv, calls: (0, "READY\n", "") if "describe" in argv
                    else (mf.EXIT_INCOMPLETE if len(calls) == 1 else 0, "", ""))
  assert tpu.main(RUN_ARGS, runner=fake, sleep=lambda s: None) == 0
  assert fake.kinds() == ["run", "describe", "run"]


def test_tpu_sweep_threads_run_each_trial_once(tmp_path, monkeypatch):
  def respond(argv, calls):
    if "describe" in argv:
      return 1, "", "ERROR: (gcloud.compute.tpus.tpu-vm.describe) NOT_FOUND: sw-0\n"
    return 0, "", ""
  fake = FakeGcloud(respond)
  monkeypatch.setattr(tpu, "REPO", str(tmp_path))
  cfg = _write_config(tmp_path / "s.py",
                      "def get_sweep(add):\n  for s in range(5):\n    add(seed=s)\n")
  rc = tpu.main(["sweep", "--name", "sw", "--zone", "z", "--num-vms", "3", "--code-dir",
                 "/src/attention", "--config", cfg, "--workdir", "/gcs/b/s",
                 "--state-dir", str(tmp_path / "state")], runner=fake, sleep=lambda s: None)
  assert rc == 0
  runs = [c[-1].split("run_tpu.sh run ")[1].split()[0] for c in fake.calls
          if "ssh" in c and "run_tpu.sh run" in c[-1]]
  assert sorted(runs) == [f"seed={s}" for s in range(5)]
  assert sum("create" in c for c in fake.calls) == 3
  states = json.loads((tmp_path / "state" / "sweep.json").read_text())["trials"]
  assert {t["status"] for t in states.values()} == {"done"}


# ------------------------------------------------------------------ report

def test_report_marks_best_and_lists_failures(tmp_path):
  trials = {}
  for i, (lr, acc) in enumerate([(0.1, 0.5), (0.01, 0.9), (0.001, 0.7)]):
    wd = tmp_path / f"t{i}"
    wd.mkdir()
    (wd / "metrics.jsonl").write_text(json.dumps({"step": 2, "eval/accuracy": acc - 0.3}) + "\n"
                                      + json.dumps({"step": 4, "eval/accuracy": acc}) + "\n")
    trials[f"t{i}"] = {"overrides": {"learning_rate": lr}, "workdir": str(wd), "status": "done"}
  trials["bad"] = {"overrides": {"model.num_heads": 3}, "workdir": str(tmp_path / "bad"),
                   "status": "failed", "returncode": 2, "log": "/x/launch.log"}
  (tmp_path / "sweep.json").write_text(json.dumps({"trials": trials}))
  assert report.main([str(tmp_path), "--metric", "eval/accuracy"]) == 0
  md = (tmp_path / "report.md").read_text()
  best = [l for l in md.splitlines() if l.startswith("| * |")]
  assert len(best) == 1 and "| t1 |" in best[0] and "0.9" in best[0]
  assert "exit 2; log: /x/launch.log" in md
  assert (tmp_path / "report_eval_accuracy.png").stat().st_size > 1000
  assert "t1" in (tmp_path / "report.csv").read_text()
  assert report.main([str(tmp_path), "--metric", "eval/accuracy", "--mode", "min"]) == 0
  assert "| * | t0 |" in (tmp_path / "report.md").read_text()


def test_report_plot_joins_finished_trials_only(tmp_path, monkeypatch):
  import matplotlib.axes
  drawn = []
  real = matplotlib.axes.Axes.plot
  monkeypatch.setattr(matplotlib.axes.Axes, "plot", lambda self, xs, ys, **kw: (
      drawn.append((list(xs), list(ys), kw.get("label"))), real(self, xs, ys, **kw))[1])
  rows = [{"name": f"t{i}", "overrides": {"learning_rate": lr}, "status": status,
           "metrics": {"eval/accuracy": acc}}
          for i, (lr, acc, status) in enumerate([(0.1, 0.5, "done"), (0.01, 0.6, "failed"),
                                                 (0.001, 0.7, "done")])]
  assert report.plot(str(tmp_path / "p.png"), rows, ["learning_rate"], "eval/accuracy",
                     "learning_rate", "t2")
  lines = {label: (xs, ys) for xs, ys, label in drawn}
  assert lines["eval/accuracy"] == ([0.001, 0.1], [0.7, 0.5])   # the failed t1 is not joined
  assert lines["not finished (last eval)"] == ([0.01], [0.6])


# ------------------------------------------------------------------ real local sweep

def _manifest(w):
  try:
    return json.loads((w / "sweep.json").read_text())["trials"]
  except (OSError, ValueError):
    return {}


def test_run_local_reports_each_running_trials_latest_step(tmp_path):
  # In a subprocess: run_local forks (preexec_fn), which is unsafe from this
  # pytest process once JAX's threads run in it.
  trial = ("import time\n"
           "for i in (1, 2):\n"
           "  print(f'step {i}/2  loss {3 - i}.0  eta 0m01s', flush=True); time.sleep(1.2)\n")
  driver = f"""
import io, sys
from launch import manifest as mf, sweep
from launch.sweep_spec import Trial
trials = [Trial(name=f"t{{k}}", overrides={{}}, workdir=f"{tmp_path}/t{{k}}",
                argv=[sys.executable, "-c", {trial!r}]) for k in range(2)]
manifest = mf.Manifest("{tmp_path}/sweep.json")
manifest.sync(trials)
sweep.run_local(trials, manifest, 2, lambda slot: {{}}, progress_every=0.5)
"""
  res = subprocess.run([PY, "-c", driver], capture_output=True, text=True, timeout=120, cwd=ROOT)
  lines = res.stdout.splitlines()
  for k in range(2):
    running = [l for l in lines if l.startswith("[running") and f"] t{k}: " in l]
    assert running and all(l.endswith(("starting", "eta 0m01s")) for l in running), res.stdout
    assert any(f"step {i}/2  loss {3 - i}.0" in l for l in running for i in (1, 2))
  assert sweep.last_step_line(str(tmp_path / "t0" / sweep.LOG_NAME)).startswith("step 2/2")
  assert sweep.last_step_line(str(tmp_path / "missing.log")) is None


def test_local_sweep_kill_resume_and_report(tmp_path):
  """4 tiny trials, 2 at a time, one failing; SIGKILL after the first finishes; re-run; report."""
  cfg = _write_config(tmp_path / "tiny_sweep.py",
                      "def get_sweep(add):\n"
                      "  for o in zip_(learning_rate=[1e-3, 3e-3, 1e-2], seed=[0, 1, 2]):\n"
                      "    add(**o)\n"
                      "  add(**{'model.num_heads': 3})   # does not divide qkv_dim=16: exit 2\n")
  w = tmp_path / "sweep"
  cmd = [PY, "-m", "launch.sweep", "--config", cfg, "--workdir", str(w), "--parallel", "2",
         "--extra", *TINY]
  t0 = time.time()
  out = tmp_path / "first.out"
  with open(out, "wb") as f:   # a file, not a pipe nobody drains
    first = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                             start_new_session=True)
  try:
    while not any(t["status"] == "done" for t in _manifest(w).values()):
      assert first.poll() is None, out.read_text()[-3000:]
      assert time.time() - t0 < 240, "no trial finished in time"
      time.sleep(0.5)
  finally:
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
  done_before = {n: os.stat(w / n / "metrics.jsonl").st_mtime_ns
                 for n, t in _manifest(w).items() if t["status"] == "done"}
  assert done_before and len(_manifest(w)) == 4

  second = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=400)
  assert second.returncode == 1, second.stdout + second.stderr
  bad = "model.num_heads=3"
  log = w / bad / "launch.log"
  assert f"error: trial {bad} failed (exit 2)" in second.stderr and str(log) in second.stderr
  for name in done_before:
    assert f"[skip] {name}: done" in second.stdout
    assert os.stat(w / name / "metrics.jsonl").st_mtime_ns == done_before[name]
  final = _manifest(w)
  assert {n: t["status"] for n, t in final.items() if n != bad} == {
      n: "done" for n in final if n != bad}
  assert final[bad]["status"] == "failed" and final[bad]["returncode"] == 2
  assert "num_heads=3" in final[bad]["error"] and "error:" in log.read_text()
  for t in final.values():
    assert t["command"].startswith(f"{PY} -m experiments.run --config {cfg} --workdir ")
    assert t["start_time"] and t["end_time"] and t["log"].endswith("launch.log")

  rep = _cli("launch.sweep", "report", str(w))
  assert rep.returncode == 0, rep.stderr
  rows = [l for l in rep.stdout.splitlines() if l.startswith("| ") and "| done |" in l]
  assert len(rows) == 3 and sum(r.startswith("| * |") for r in rows) == 1
  for r in rows:   # final step and its metrics are in every finished row
    assert "| done | 4 |" in r
  assert f"| exit 2; log: {log} |" in rep.stdout and "does not divide" in rep.stdout
  assert (w / "report.md").read_text() == rep.stdout
  assert (w / "report_eval_accuracy.png").exists() and (w / "report.csv").exists()


def test_run_config_and_is_complete_follow_the_latest_resume(tmp_path):
  # First run: 30 steps. Resumed at 30 for 40 steps, then (an older resume file
  # with a lower step) must not win over it.
  (tmp_path / "config.json").write_text(json.dumps({"num_train_steps": 30}))
  (tmp_path / "config.resume-4.json").write_text(json.dumps({"num_train_steps": 35}))
  (tmp_path / "config.resume-30.json").write_text(json.dumps({"num_train_steps": 40}))
  (tmp_path / "config.resume-x.json").write_text("not a resume file")
  assert mf.run_config(str(tmp_path)) == {"num_train_steps": 40}
  metrics = tmp_path / "metrics.jsonl"
  metrics.write_text(json.dumps({"step": 30}) + "\n")
  assert not mf.is_complete(str(tmp_path))   # config.json alone would say complete
  metrics.write_text(json.dumps({"step": 30}) + "\n" + json.dumps({"step": 40}) + "\n")
  assert mf.is_complete(str(tmp_path))
  assert mf.run_config(str(tmp_path / "missing")) is None


@pytest.mark.parametrize("args,needle", [
    (["--config", "experiments/configs/luong_mt.py", "--workdir", "gs://b/x"], "gcsfuse"),
    (["--config", "experiments/configs/nope.py", "--workdir", "/gcs/b/x"], "no such file"),
])
def test_tpu_run_refuses_what_the_workers_would_fail_on(capsys, args, needle):
  rc = tpu.main(["run", "--name", "t1", "--zone", "z", *args, "--dry-run"])
  out = capsys.readouterr()
  assert rc == 2 and out.out == ""   # refused before printing any gcloud command
  errors = out.err.strip().splitlines()
  assert len(errors) == 1 and errors[0].startswith("error: --") and needle in errors[0]
