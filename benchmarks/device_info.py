"""What machine a benchmark ran on, in words, for its table and JSON.

``jax.devices()[0].device_kind`` names an accelerator ("NVIDIA H100 80GB HBM3")
but says only "cpu" for a CPU, and CPU figures differ several-fold between
machines: flax's attention fwd+bwd at B=4, T=1024 with a padding mask took
451 ms on one 2-core machine of this repo and 146-158 ms on the next, with
AVX-512 (``python -m benchmarks.attention_core``, RESULTS.md). So on
CPU the description names the processor, its family/model numbers (the model
name of a virtual machine is often just "AMD EPYC"), the CPUs this process may
run on, and the widest vector unit.
"""

from __future__ import annotations

import os

import jax


def cpu_description(cpuinfo: str, n_cpus: int) -> str:
  """``"AMD EPYC (family 26, model 2), 2 CPUs, AVX-512"`` from ``/proc/cpuinfo`` text.

  Args:
    cpuinfo: the contents of ``/proc/cpuinfo`` (only the first processor's
      block is read); empty when unknown.
    n_cpus: CPUs this process may run on.
  """
  fields: dict[str, str] = {}
  for line in cpuinfo.splitlines():
    if not line.strip():
      if fields:
        break
      continue
    name, _, value = line.partition(":")
    fields.setdefault(name.strip(), value.strip())
  model = fields.get("model name") or "unknown CPU"
  if "cpu family" in fields and "model" in fields:
    model += f" (family {fields['cpu family']}, model {fields['model']})"
  flags = set(fields.get("flags", "").split())
  isa = ("AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags
         else "AVX" if "avx" in flags else None)
  parts = [model, f"{n_cpus} CPU{'s' if n_cpus != 1 else ''}"] + ([isa] if isa else [])
  return ", ".join(parts)


def describe() -> str:
  """This process's first JAX device, e.g. ``"NVIDIA H100 80GB HBM3"`` or a CPU description."""
  device = jax.devices()[0]
  if device.platform != "cpu":
    return f"{device.device_kind} x{jax.device_count()}"
  return host_description()


def host_description() -> str:
  """This machine's processor, without touching JAX (so a parent process that only
  launches accelerator jobs does not claim the accelerator)."""
  try:
    with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
      text = f.read()
  except OSError:
    text = ""
  try:
    n_cpus = len(os.sched_getaffinity(0))
  except (AttributeError, OSError):
    n_cpus = os.cpu_count() or 1
  return cpu_description(text, n_cpus)
