"""The gcloud commands of a Cloud TPU VM's life, as argv lists (nothing runs here).

Shapes follow the Cloud TPU CLI:

    gcloud compute tpus tpu-vm create NAME --zone Z --accelerator-type T --version V [--spot]
    gcloud alpha compute tpus queued-resources create NAME --node-id NAME --zone Z
        --accelerator-type T --runtime-version V [--spot|--reserved]
    gcloud compute tpus tpu-vm scp --recurse DIR NAME: --zone Z --worker=all
    gcloud compute tpus tpu-vm ssh NAME --zone Z --worker=all --command "..."
    gcloud compute tpus tpu-vm delete NAME --zone Z --quiet
"""

from __future__ import annotations

import dataclasses
import shlex
from typing import Sequence

TPU_VM = ["gcloud", "compute", "tpus", "tpu-vm"]
QUEUED = ["gcloud", "alpha", "compute", "tpus", "queued-resources"]
LOG_DIR = "attention_logs"      # ~/attention_logs/<run>.<hostname>.log on every worker

# Frees the TPU from a previous run (a crashed or orphaned process keeps the chips
# and makes the next run fail with "TPU in use"). "[e]xperiments[.]run" matches
# the training processes but not the shell running this very command.
KILL_STALE = ('sudo pkill -9 -f "[e]xperiments[.]run"; '
              "sudo lsof -t /dev/accel* /dev/vfio/[0-9]* 2>/dev/null | xargs -r sudo kill -9; "
              "sudo rm -f /tmp/libtpu_lockfile")


@dataclasses.dataclass(frozen=True)
class Node:
  """A TPU VM (single- or multi-host) and how it is obtained.

  Attributes:
    queued: create through a queued resource (always true with ``reserved``);
      the queued resource and its node share ``name``.
  """
  name: str
  zone: str
  accelerator_type: str = "v4-8"
  version: str = "tpu-ubuntu2204-base"
  spot: bool = False
  reserved: bool = False
  queued: bool = False
  project: str | None = None

  @property
  def is_queued(self) -> bool:
    return self.queued or self.reserved

  def renamed(self, name: str) -> "Node":
    return dataclasses.replace(self, name=name)

  def _tail(self) -> list[str]:
    return ["--zone", self.zone] + (["--project", self.project] if self.project else [])


def create(node: Node) -> list[str]:
  if node.is_queued:
    cmd = QUEUED + ["create", node.name, "--node-id", node.name, "--zone", node.zone,
                    "--accelerator-type", node.accelerator_type,
                    "--runtime-version", node.version]
    cmd += ["--spot"] if node.spot else ["--reserved"] if node.reserved else []
  else:
    cmd = TPU_VM + ["create", node.name, "--zone", node.zone,
                    "--accelerator-type", node.accelerator_type, "--version", node.version]
    cmd += ["--spot"] if node.spot else []
  return cmd + (["--project", node.project] if node.project else [])


def delete(node: Node) -> list[str]:
  if node.is_queued:
    # --force also deletes the node the queued resource holds.
    return QUEUED + ["delete", node.name] + node._tail() + ["--quiet", "--force"]
  return TPU_VM + ["delete", node.name] + node._tail() + ["--quiet"]


def describe(node: Node) -> list[str]:
  """Prints one word: the node's state (READY, PREEMPTED, ...) or the queued resource's."""
  if node.is_queued:
    return QUEUED + ["describe", node.name] + node._tail() + ["--format=value(state.state)"]
  return TPU_VM + ["describe", node.name] + node._tail() + ["--format=value(state)"]


def list_nodes(node: Node) -> list[str]:
  return TPU_VM + ["list"] + node._tail()


def scp_to(node: Node, local_dir: str) -> list[str]:
  return TPU_VM + ["scp", "--recurse", local_dir, f"{node.name}:", "--zone", node.zone,
                   "--worker=all"] + (["--project", node.project] if node.project else [])


def scp_from(node: Node, remote: str, local_dir: str) -> list[str]:
  return TPU_VM + ["scp", "--recurse", f"{node.name}:{remote}", local_dir, "--zone", node.zone,
                   "--worker=all"] + (["--project", node.project] if node.project else [])


def ssh(node: Node, command: str) -> list[str]:
  return TPU_VM + ["ssh", node.name, "--zone", node.zone, "--worker=all",
                   "--command", command] + (["--project", node.project] if node.project else [])


def setup_command(remote_dir: str) -> str:
  """``remote_dir``: where ``scp --recurse DIR NAME:`` put the code (``~/basename(DIR)``)."""
  return f"cd ~/{shlex.quote(remote_dir)} && bash launch/run_tpu.sh setup"


def run_command(remote_dir: str, run_name: str, args: Sequence[str]) -> str:
  """Remote shell line: free the TPU, then train through run_tpu.sh (multi-host env, logs)."""
  return (f"{KILL_STALE}; cd ~/{shlex.quote(remote_dir)} && bash launch/run_tpu.sh run "
          f"{shlex.quote(run_name)} {shlex.join(args)}")
