"""Train on Cloud TPU VMs: create, set up, run (surviving preemption), sweep, clean up.

    python -m launch.tpu create --name tpu1 --zone us-central2-b [--accelerator-type v4-8]
        [--version tpu-ubuntu2204-base] [--spot | --reserved] [--queued] [--project P]
    python -m launch.tpu setup  --name tpu1 --zone us-central2-b
    python -m launch.tpu run    --name tpu1 --zone us-central2-b \
        --config experiments/configs/transformer_mt.py --workdir /gcs/bucket/mt \
        --config.data.dir=/gcs/bucket/multi30k [--max-retries 3]
    python -m launch.tpu sweep  --name sw --num-vms 4 --zone ... --spot \
        --config experiments/configs/luong_mt.py --workdir /gcs/bucket/luong \
        --extra --config.data.dir=/gcs/bucket/multi30k
    python -m launch.tpu logs | status | delete --name tpu1 --zone us-central2-b

Every subcommand takes ``--dry-run`` (print the gcloud commands, run none). ``run``
and ``sweep`` recover from preemption: a node that is PREEMPTED, suspended or gone
is deleted, recreated and set up again, and the same command resumes from the
last checkpoint in the workdir, at most ``--max-retries`` times per run.
"""

from __future__ import annotations

import argparse
import atexit
import os
import queue
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from typing import Callable, Sequence

from launch import gcloud
from launch import manifest as mf
from launch.gcloud import Node
from launch.runner import DryRunRunner, Runner, SubprocessRunner, format_command
from launch.sweep import parse_extra
from launch.sweep_spec import SweepError, Trial, load_sweep, make_trials, split_config_arg

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
READY = {"READY", "ACTIVE"}
PROVISIONING = {"CREATING", "STARTING", "ACCEPTED", "WAITING_FOR_RESOURCES", "PROVISIONING",
                "RESTARTING", "REPAIRING"}
# Lost for good: the only way back is delete + create (spot and queued nodes do not restart).
LOST = {"PREEMPTED", "TERMINATED", "STOPPED", "STOPPING", "SUSPENDED", "SUSPENDING", "FAILED",
        "DELETING"}
# What gcloud ssh prints when the VM went away under it (exit 255 is ssh's own failure).
_SSH_LOST = re.compile(r"preempt|connection (closed|reset|refused)|broken pipe|timed out|"
                       r"not_?found|unavailable|couldn't connect", re.IGNORECASE)


class TPUError(RuntimeError):
  """A gcloud step failed, or a run kept being preempted past --max-retries."""


class TPULauncher:
  """Issues the gcloud commands of :mod:`launch.gcloud` through an injectable runner.

  Args:
    runner: ``run(argv) -> (returncode, stdout, stderr)``.
    max_retries: recoveries (recreate + rerun) allowed per run before giving up.
    retry_wait: seconds between a failure and its recovery (capacity comes back slowly).
    sleep: ``time.sleep``; tests pass a no-op.
    code_dir: directory copied to the workers; default a clean copy of the repo.
    dry_run: skip the waits and local side effects (the runner prints commands).
  """

  def __init__(self, runner: Runner, *, max_retries: int = 3, retry_wait: float = 60.0,
               sleep: Callable[[float], None] = time.sleep, code_dir: str | None = None,
               dry_run: bool = False, poll: float = 30.0, create_timeout: float = 6 * 3600,
               log: Callable[[str], None] | None = None):
    self.runner = runner
    self.max_retries = max_retries
    self.retry_wait = retry_wait
    self.sleep = sleep
    self.dry_run = dry_run
    self.poll = poll
    self.create_timeout = create_timeout
    self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    self._code_dir = code_dir.rstrip("/") if code_dir else None
    self._stage_lock = threading.Lock()

  # ------------------------------------------------------------ primitives

  def _call(self, argv: list[str], check: bool = True) -> tuple[int, str, str]:
    rc, out, err = self.runner.run(argv)
    if check and rc != 0:
      last = (err.strip().splitlines() or [""])[-1]
      raise TPUError(f"`{format_command(argv)}` failed (exit {rc}): {last}")
    return rc, out, err

  def state(self, node: Node) -> str | None:
    """READY, PREEMPTED, ... (or the queued resource's ACTIVE, SUSPENDED, ...); None if absent."""
    rc, out, err = self._call(gcloud.describe(node), check=False)
    if rc != 0:
      if re.search(r"not_?found|was not found|does not exist", err, re.IGNORECASE):
        return None
      last = (err.strip().splitlines() or [""])[-1]
      raise TPUError(f"cannot describe {node.name} (exit {rc}): {last}")
    words = out.split()
    return words[0].upper() if words else None

  def code_dir(self) -> str:
    """The directory to scp; by default git's tracked and unignored files only.

    Copying the checkout itself would ship .git, virtualenvs and local run
    directories (checkpoints) to every worker.
    """
    with self._stage_lock:
      if self._code_dir is None:
        root = tempfile.mkdtemp(prefix="attention_stage_")
        atexit.register(shutil.rmtree, root, ignore_errors=True)
        self._code_dir = os.path.join(root, "attention")
        _stage(REPO, self._code_dir)
      return self._code_dir

  @property
  def remote_dir(self) -> str:
    return os.path.basename(self.code_dir())

  # ------------------------------------------------------------ lifecycle

  def create(self, node: Node) -> None:
    self._call(gcloud.create(node))
    if node.is_queued and not self.dry_run:
      self.wait_ready(node)

  def wait_ready(self, node: Node) -> None:
    """Queued resources return at once and become ACTIVE when capacity exists."""
    deadline = time.monotonic() + self.create_timeout
    while True:
      s = self.state(node)
      if s in READY:
        return
      if s in LOST:
        raise TPUError(f"{node.name} became {s} while waiting for it to be ready.")
      if time.monotonic() > deadline:
        raise TPUError(f"{node.name} not ready after {self.create_timeout:.0f}s (state {s}).")
      self.sleep(self.poll)

  def setup(self, node: Node) -> None:
    self._call(gcloud.scp_to(node, self.code_dir()))
    self._call(gcloud.ssh(node, gcloud.setup_command(self.remote_dir)))

  def delete(self, node: Node, check: bool = False) -> None:
    self._call(gcloud.delete(node), check=check)   # absent already is fine when recovering

  def recreate(self, node: Node) -> None:
    self.delete(node)
    self.create(node)
    self.setup(node)

  def ensure(self, node: Node) -> None:
    """Reuses a READY node (syncing the code), waits for a provisioning one, else creates it."""
    s = self.state(node)
    if s in PROVISIONING:
      self.wait_ready(node)
    elif s not in READY:
      if s is not None:
        self.delete(node)
      self.create(node)
    self.setup(node)

  # ------------------------------------------------------------ training

  def run(self, node: Node, run_name: str, args: Sequence[str]) -> int:
    """Runs ``experiments.run args`` on every worker; recovers from preemption.

    Returns:
      The training's exit status (0, or its failure on a healthy node, which a
      retry would only repeat).

    Raises:
      TPUError: the node was lost more than ``max_retries`` times.
    """
    command = gcloud.ssh(node, gcloud.run_command(self.remote_dir, run_name, args))
    recoveries = 0
    while True:
      rc, _, err = self._call(command, check=False)
      if rc == 0:
        return 0
      s = self.state(node)
      lost = s is None or s in LOST
      transient = rc in (255, mf.EXIT_INCOMPLETE) or bool(_SSH_LOST.search(err))
      if not lost and not transient:
        self.log(f"error: {run_name} failed on {node.name} (exit {rc}); "
                 f"logs: python -m launch.tpu logs --name {node.name} --zone {node.zone}")
        return rc
      why = f"node {s or 'gone'}" if lost else f"ssh/run interrupted (exit {rc}), node {s}"
      while True:   # a failed re-creation (no spot capacity yet) uses up a retry too
        if recoveries >= self.max_retries:
          raise TPUError(f"{run_name} on {node.name}: {why}; gave up after {self.max_retries}"
                         " retries (--max-retries). Re-run the same command to resume from"
                         " the last checkpoint.")
        recoveries += 1
        self.log(f"warning: {run_name} on {node.name}: {why}; recovery "
                 f"{recoveries}/{self.max_retries}, resuming from the last checkpoint.")
        self.sleep(self.retry_wait)
        if not lost:
          break
        try:
          self.recreate(node)
          break
        except TPUError as e:
          why = f"re-creating it failed: {e}"

  def sweep(self, base: Node, num_vms: int, trials: Sequence[Trial],
            manifest: mf.Manifest | None) -> list[str]:
    """Runs ``trials`` on VMs ``NAME-0 .. NAME-{num_vms-1}``, one trial per VM at a time.

    Returns:
      Names of the trials that did not finish.
    """
    nodes = [base.renamed(f"{base.name}-{i}") for i in range(num_vms)]
    record = manifest.update if manifest else (lambda name, **kw: None)
    if self.dry_run:   # sequential and round-robin, so the printed plan is deterministic
      for i, node in enumerate(nodes):
        self._worker(node, iter(trials[i::num_vms]).__next__, record)
      return []
    todo: queue.Queue = queue.Queue()
    for t in trials:
      todo.put(t)
    threads = [threading.Thread(target=self._worker, args=(n, todo.get_nowait, record),
                                daemon=True) for n in nodes]
    for th in threads:
      th.start()
    for th in threads:
      th.join()
    states = manifest.trials if manifest else {}
    return [t.name for t in trials if states.get(t.name, {}).get("status") != mf.DONE]

  def _worker(self, node: Node, next_trial: Callable[[], Trial], record) -> None:
    try:
      self.ensure(node)
    except TPUError as e:
      self.log(f"error: {node.name}: {e}")
      return   # its share of trials stays queued for the other VMs
    while True:
      try:
        trial = next_trial()
      except (StopIteration, queue.Empty):
        return
      record(trial.name, status=mf.RUNNING, node=node.name, start_time=mf.now())
      try:
        rc = self.run(node, trial.name, trial.argv[3:])
      except TPUError as e:
        record(trial.name, status=mf.FAILED, error=str(e), end_time=mf.now())
        self.log(f"error: {e}")
        return   # this VM keeps being lost; leave the remaining trials to the others
      record(trial.name, status=mf.DONE if rc == 0 else mf.FAILED, returncode=rc,
             end_time=mf.now())


def _stage(repo: str, dest: str) -> None:
  """Copies the files git would ship (tracked + untracked-unignored) from ``repo`` to ``dest``."""
  res = subprocess.run(["git", "-C", repo, "ls-files", "-z", "-co", "--exclude-standard"],
                       capture_output=True, text=True, check=False)
  if res.returncode != 0:   # not a git checkout: copy everything but the obvious bulk
    shutil.copytree(repo, dest, ignore=shutil.ignore_patterns(
        ".git", ".venv", "venv", "__pycache__", "*.egg-info", "runs", "workdir*"))
    return
  for rel in filter(None, res.stdout.split("\0")):
    src = os.path.join(repo, rel)
    if os.path.isfile(src):
      os.makedirs(os.path.dirname(os.path.join(dest, rel)), exist_ok=True)
      shutil.copy2(src, os.path.join(dest, rel))


def remote_config(config: str) -> str:
  """The config path as the workers see it: relative to the repo root."""
  path, arg = split_config_arg(config)
  full = os.path.abspath(path)
  if os.path.commonpath([full, REPO]) != REPO:
    raise SweepError(f"--config {path}: must be inside {REPO} (only the repo is copied).")
  rel = os.path.relpath(full, REPO)
  return rel + (f":{arg}" if arg is not None else "")


def _parser() -> argparse.ArgumentParser:
  common = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
  common.add_argument("--name", required=True, help="TPU VM (and queued resource) name")
  common.add_argument("--zone", required=True)
  common.add_argument("--accelerator-type", default="v4-8")
  common.add_argument("--version", default="tpu-ubuntu2204-base", help="TPU VM runtime version")
  kind = common.add_mutually_exclusive_group()
  kind.add_argument("--spot", action="store_true", help="preemptible capacity")
  kind.add_argument("--reserved", action="store_true", help="reservation (via queued resources)")
  common.add_argument("--queued", action="store_true", help="create through a queued resource")
  common.add_argument("--project", default=None)
  common.add_argument("--dry-run", action="store_true", help="print the gcloud commands only")
  common.add_argument("--max-retries", type=int, default=3, help="recoveries per run")
  common.add_argument("--retry-wait", type=float, default=60.0, help="seconds before a recovery")
  common.add_argument("--code-dir", default=None,
                      help="directory to copy to the workers (default: clean copy of the repo)")
  p = argparse.ArgumentParser(prog="python -m launch.tpu", description=__doc__.split("\n\n")[0])
  sub = p.add_subparsers(dest="cmd", required=True)
  for name in ("create", "setup", "status", "delete", "logs", "run", "sweep"):
    s = sub.add_parser(name, parents=[common], allow_abbrev=False)
    if name in ("status", "delete", "sweep"):
      s.add_argument("--num-vms", type=int, default=None,
                     help="sweep VMs NAME-0..NAME-{N-1}" if name != "sweep" else "VMs to use")
    if name in ("run", "sweep"):
      s.add_argument("--config", required=True, help="config file inside the repo, [:arg]")
      s.add_argument("--workdir", required=True, help="a directory every host sees, e.g. a gcsfuse mount /gcs/bucket/dir")
      s.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                     help="--config.a=b overrides (must come last)")
    if name == "run":
      s.add_argument("--run-name", default=None, help="log file name (default: workdir basename)")
    if name == "sweep":
      s.add_argument("--state-dir", default=None,
                     help="local dir of sweep.json (default: tpu_sweeps/NAME)")
    if name == "logs":
      s.add_argument("--dest", default=None, help="local dir (default: tpu_logs/NAME)")
  return p


def main(argv: Sequence[str] | None = None, runner: Runner | None = None,
         sleep: Callable[[float], None] = time.sleep) -> int:
  parser = _parser()
  args, unknown = parser.parse_known_args(list(sys.argv[1:] if argv is None else argv))
  extra = parse_extra(parser, getattr(args, "extra", []), unknown)
  node = Node(args.name, args.zone, args.accelerator_type, args.version, spot=args.spot,
              reserved=args.reserved, queued=args.queued, project=args.project)
  if runner is None:
    # Long ssh sessions stream to the terminal; describe's output must be captured.
    runner = DryRunRunner() if args.dry_run else SubprocessRunner(stream=lambda a: "ssh" in a)
  tpu = TPULauncher(runner, max_retries=args.max_retries, retry_wait=args.retry_wait, sleep=sleep,
                    code_dir=args.code_dir, dry_run=args.dry_run)
  num_vms = getattr(args, "num_vms", None)
  nodes = [node.renamed(f"{node.name}-{i}") for i in range(num_vms)] if num_vms else [node]
  try:
    if "://" in (getattr(args, "workdir", None) or ""):
      raise SweepError(f"--workdir {args.workdir}: the trainer refuses storage URLs; mount"
                       " the bucket on every worker (gcsfuse --implicit-dirs BUCKET"
                       " /gcs/BUCKET) and pass the mounted path.")
    if args.cmd == "create":
      tpu.create(node)
    elif args.cmd == "setup":
      tpu.setup(node)
    elif args.cmd == "delete":
      for n in nodes:
        tpu.delete(n, check=True)
    elif args.cmd == "status":
      for n in nodes:
        s = tpu.state(n)
        if not args.dry_run:
          print(f"{n.name}: {s or 'NOT FOUND'}")
      _, listing, _ = tpu._call(gcloud.list_nodes(node), check=False)
      print(listing, end="")
    elif args.cmd == "logs":
      dest = args.dest or os.path.join("tpu_logs", node.name)
      if not args.dry_run:
        os.makedirs(dest, exist_ok=True)
      tpu._call(gcloud.scp_from(node, gcloud.LOG_DIR, dest))
    elif args.cmd == "run":
      path = split_config_arg(args.config)[0]
      if not os.path.isfile(path):
        raise SweepError(f"--config {path}: no such file in this checkout (setup copies the"
                         " repo to the workers).")
      config = remote_config(args.config)
      run_name = args.run_name or os.path.basename(args.workdir.rstrip("/"))
      return tpu.run(node, run_name, ["--config", config, "--workdir", args.workdir, *extra])
    elif args.cmd == "sweep":
      config = remote_config(args.config)
      trials = make_trials(config, load_sweep(args.config, extra), args.workdir, extra,
                           "python")
      manifest = None
      if not args.dry_run:
        state_dir = args.state_dir or os.path.join("tpu_sweeps", node.name)
        manifest = mf.Manifest(os.path.join(state_dir, "sweep.json"),
                               {"config": config, "extra": extra, "tpu": node.name})
        manifest.sync(trials)
        trials = [t for t in trials if manifest.trials[t.name]["status"] != mf.DONE]
      unfinished = tpu.sweep(node, num_vms or 1, trials, manifest)
      for name in unfinished:
        print(f"error: trial {name} did not finish; re-run the same command to resume it.",
              file=sys.stderr)
      return 1 if unfinished else 0
  except (SweepError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except TPUError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
