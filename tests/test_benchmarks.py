"""The benchmarks run end to end at toy sizes and report correct values (never timings)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from benchmarks import attention_core, device_info, train_step

ROOT = Path(__file__).resolve().parents[1]


def test_attention_core_rows_errors_and_ratios(tmp_path, capsys):
  out = tmp_path / "core.json"
  attention_core.main(["--lengths", "32", "--batch", "2", "--heads", "2", "--head_dim", "8",
                       "--repeats", "1", "--masks", "is_causal", "padding", "--out", str(out)])
  rows = json.loads(out.read_text())["speed"]
  impls = {"flax", "jax.nn", "ours(auto)", "ours(xla)", "ours(chunked)"}
  from attention import cpu_flash
  if cpu_flash.available():
    impls.add("ours(cpu_flash)")
  for kind in ("is_causal", "padding"):
    got = {r["impl"]: r for r in rows if r["mask"] == kind}
    assert set(got) == impls
    for r in got.values():
      # Padded query rows are excluded, so flax's mean-of-values fill is no error.
      assert r["max_err"] < 1e-5, (kind, r)
      assert r["fwd_ms"] > 0 and r["speedup_fwd"] > 0
    assert got["flax"]["speedup_fwd"] == 1.0 and got["flax"]["speedup_fwd_bwd"] == 1.0
    flops = 4 * 2 * 2 * 32 * 32 * 8 // (1 if kind == "padding" else 2)
    r = got["ours(xla)"]
    assert r["fwd_gflops"] == pytest.approx(flops / (r["fwd_ms"] / 1e3) / 1e9)


def _toy_padding_rows(tmp_path, t, *extra):
  """Speed rows by implementation of a toy B=2 H=2 D=8 padding-mask run."""
  out = tmp_path / "core.json"
  attention_core.main(["--lengths", str(t), "--batch", "2", "--heads", "2", "--head_dim", "8",
                       "--repeats", "1", "--masks", "padding", *extra, "--out", str(out)])
  return {r["impl"]: r for r in json.loads(out.read_text())["speed"]}


def test_attention_core_times_requested_tiles(tmp_path, capsys):
  rows = _toy_padding_rows(tmp_path, 32, "--blocks", "16x8")
  assert rows["ours(chunked 16x8)"]["max_err"] < 1e-5
  with pytest.raises(SystemExit):
    attention_core.main(["--blocks", "512"])
  assert "want BQxBK" in capsys.readouterr().err


def test_attention_core_with_attention_dropout(tmp_path, capsys):
  """Only the implementations with dropout run; ours match float64 fed our pattern."""
  rows = _toy_padding_rows(tmp_path, 40, "--attention_dropout", "0.3")
  assert {"flax", "ours(auto)", "ours(xla)"} <= set(rows) <= {
      "flax", "ours(auto)", "ours(xla)", "ours(cpu_flash)"}
  assert rows["flax"]["max_err"] is None  # flax draws its own pattern
  for name in set(rows) - {"flax"}:
    assert rows[name]["max_err"] < 1e-5, (name, rows[name])
  with pytest.raises(SystemExit):
    attention_core.main(["--attention_dropout", "1"])
  assert "--attention_dropout=1.0 must be in [0, 1)" in capsys.readouterr().err


def test_attention_core_memory_sweep_stops_at_the_budget(tmp_path, capsys):
  """Each (implementation, T) runs in a fresh process; the sweep stops at the first
  length over budget (0.05 GB is below the JAX runtime alone)."""
  out = tmp_path / "mem.json"
  attention_core.main(["--memory_only", "--memory_impls", "ours(auto)", "--memory_lengths",
                       "64", "128", "--head_dim", "8", "--attention_dropout", "0.1",
                       "--out", str(out)])
  rows = json.loads(out.read_text())["memory"]
  assert [(r["T"], r["fits"], r["status"]) for r in rows] == [(64, True, "ok"), (128, True, "ok")]
  assert all(0.05 < r["peak_rss_gb"] < 4 for r in rows)
  attention_core.main(["--memory_only", "--memory_impls", "ours(auto)", "--memory_lengths",
                       "64", "128", "--head_dim", "8", "--budget_gb", "0.05", "--out", str(out)])
  rows = json.loads(out.read_text())["memory"]
  assert [(r["T"], r["status"]) for r in rows] == [(64, "over budget")]
  assert "largest T within 0.05 GB for ours(auto): None" in capsys.readouterr().out


def test_time_interleaved_calls_each_function_per_turn():
  calls = []
  fns = {name: (lambda name=name: calls.append(name)) for name in ("a", "b")}
  times = attention_core._time_interleaved(fns, (), repeats=2, calls_per_turn=3)
  # Per round and function: one untimed call, then three timed consecutive ones.
  assert calls == (["a"] * 4 + ["b"] * 4) * 2
  assert set(times) == {"a", "b"} and all(t >= 0 for t in times.values())


def test_matmul_forms_agree_and_report_ratios(tmp_path):
  from benchmarks import matmul_forms
  out = tmp_path / "forms.json"
  matmul_forms.main(["--length", "16", "--batch_heads", "2", "--head_dim", "4",
                     "--repeats", "1", "--out", str(out)])
  res = json.loads(out.read_text())
  assert res["max_abs_diff"] < 1e-5
  rows = {r["form"]: r for r in res["rows"]}
  assert set(rows) == {"einsum", "pt_matmul", "P x (peer)"}
  assert rows["einsum"]["speedup"] == 1.0
  r = rows["pt_matmul"]
  assert r["gflops"] == pytest.approx(2 * 2 * 16 * 16 * 4 / (r["ms"] / 1e3) / 1e9)


_CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 26
model\t\t: 2
model name\t: AMD EPYC
flags\t\t: fpu avx avx2 fma avx512f avx512bw

processor\t: 1
model name\t: some other name
"""


def test_cpu_description_names_model_cpus_and_vector_unit():
  from benchmarks.device_info import cpu_description
  assert cpu_description(_CPUINFO, 2) == "AMD EPYC (family 26, model 2), 2 CPUs, AVX-512"
  avx2 = _CPUINFO.replace(" avx512f avx512bw", "")
  assert cpu_description(avx2, 1) == "AMD EPYC (family 26, model 2), 1 CPU, AVX2"
  assert cpu_description("", 4) == "unknown CPU, 4 CPUs"


def test_benchmark_json_names_the_cpu(tmp_path):
  from benchmarks import device_info, matmul_forms
  out = tmp_path / "forms.json"
  matmul_forms.main(["--length", "8", "--batch_heads", "1", "--head_dim", "4",
                     "--repeats", "1", "--out", str(out)])
  device = json.loads(out.read_text())["device"]
  assert device == device_info.describe()
  assert "CPU" in device and device != "cpu"


def test_reference_block_marks_fully_masked_rows():
  rng = np.random.default_rng(0)
  q, k, v = (rng.standard_normal((1, 4, 1, 3)) for _ in range(3))
  valid = np.array([[True, True, False, False]])
  mask = (valid[:, None, :, None] & valid[:, None, None, :])
  out, rows = attention_core._reference_row_block(q, k, v, mask)
  np.testing.assert_array_equal(rows, [True, True, False, False])
  s = q[0, :2, 0] @ k[0, :2, 0].T / np.sqrt(3)
  p = np.exp(s - s.max(-1, keepdims=True))
  np.testing.assert_allclose(out[:2], (p / p.sum(-1, keepdims=True)) @ v[0, :2, 0], rtol=1e-12)
  np.testing.assert_array_equal(out[2:], 0.0)


def _dot_flops(jaxpr) -> int:
  """2·M·N·K summed over every dot_general in ``jaxpr`` and the jaxprs inside it."""
  from jax.extend import core as jcore
  total = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      (contract, _), _ = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval.shape
      total += 2 * int(np.prod(eqn.outvars[0].aval.shape)) * int(np.prod([lhs[i] for i in contract]))
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        if isinstance(sub, jcore.ClosedJaxpr):
          total += _dot_flops(sub.jaxpr)
        elif isinstance(sub, jcore.Jaxpr):
          total += _dot_flops(sub)
  return total


def test_model_flops_equal_three_times_the_forward_matmuls_of_both_models():
  # MFU's F counts forward matmul FLOPs x 3: check it against the dot_generals
  # the two models' forward passes actually trace (S != T, causal counted in full).
  import jax
  import jax.numpy as jnp
  from attention.models.transformer import Transformer, TransformerConfig
  from benchmarks.flax_transformer import FlaxTransformer, FlaxTransformerConfig
  d, layers, m, vocab, b, s, t = 32, 2, 48, 96, 2, 6, 10
  cfg = TransformerConfig(vocab_size=vocab, emb_dim=d, num_heads=4, num_layers=layers,
                          qkv_dim=d, mlp_dim=m, max_len=16, implementation="xla")
  src, tgt = jnp.ones((b, s), jnp.int32), jnp.ones((b, t), jnp.int32)
  want = train_step.model_flops(d, d, m, vocab, layers, layers, b, s, t)
  for model in (FlaxTransformer(FlaxTransformerConfig.from_ours(cfg)), Transformer(cfg)):
    params = jax.eval_shape(model.init, jax.random.key(0), src, tgt)["params"]
    jaxpr = jax.make_jaxpr(lambda p: model.apply({"params": p}, src, tgt))(params)
    assert 3 * _dot_flops(jaxpr.jaxpr) == want, type(model).__name__


def test_train_step_peer_and_ours_same_size(tmp_path):
  out = tmp_path / "step.json"
  train_step.main(["--size", "tiny", "--batch", "4", "--src_len", "8", "--tgt_len", "8",
                   "--steps", "2", "--matmul_n", "128", "--profile", "3", "--attention_dropout", "0",
                   "--out", str(out)])
  result = json.loads(out.read_text())
  assert (result["args"]["dropout"], result["attention_dropout"]) == (0.1, 0.0)
  flax_row, ours_row = result["rows"]
  assert (flax_row["model"], ours_row["model"]) == ("flax", "ours")
  assert flax_row["params"] == ours_row["params"] > 0
  for r in (flax_row, ours_row):
    assert np.isfinite(r["loss_after"]) and 0 < r["mfu"]
    assert r["tokens_per_s"] == pytest.approx(4 * 16 / (r["ms_per_step"] / 1e3))
  for r in (flax_row, ours_row):
    assert len(r["top_ops"]) == 3 and all(ms > 0 for _, ms, _ in r["top_ops"])
    assert any("train_step" in where for _, _, where in r["top_ops"])
  assert ours_row["speed_ratio_vs_flax"] == pytest.approx(
      flax_row["ms_per_step"] / ours_row["ms_per_step"])


def _plane(name, lines):
  ns = types.SimpleNamespace
  return ns(name=name, lines=[ns(name=n, events=[ns(name=e, duration_ns=t) for e, t in ev])
                              for n, ev in lines])


def test_op_time_counts_a_gpu_trace_once():
  gpu = _plane("/device:GPU:0", [
      ("XLA Modules", [("jit_train_step(1)", 900)]),
      ("XLA Ops", [("fusion.1", 300), ("custom-call.2", 500), ("fusion.1", 100)]),
      ("Stream #13(Compute)", [("loop_fusion_kernel", 400), ("sm90_gemm_kernel", 500)])])
  host = _plane("/host:CPU", [("python", [("PjitFunction(train_step)", 950)]),
                              ("tf_XLAPjRtCpuClient/1", [("fusion.9", 7)])])
  assert train_step.op_time_ns([host, gpu]) == {"fusion.1": 400, "custom-call.2": 500}
  cpu = _plane("/host:CPU", [("python", [("PjitFunction(train_step)", 950)]),
                             ("tf_XLAPjRtCpuClient/1", [("fusion.9", 7)]),
                             ("tf_XLAEigen/2", [("fusion.3", 40), ("ThunkExecutor::Execute", 60),
                                                ("dot.4", 25)])])
  assert train_step.op_time_ns([cpu]) == {"fusion.3": 40, "dot.4": 25}


def test_train_step_keeps_its_timings_when_profiling_fails(tmp_path, monkeypatch, capsys):
  def broken(*args, **kwargs):
    raise ValueError("no trace")
  monkeypatch.setattr(train_step, "profile_ops", broken)
  out = tmp_path / "step.json"
  train_step.main(["--size", "tiny", "--batch", "2", "--src_len", "4", "--tgt_len", "4",
                   "--steps", "1", "--matmul_n", "64", "--profile", "2", "--out", str(out)])
  rows = json.loads(out.read_text())["rows"]
  assert [r["model"] for r in rows] == ["flax", "ours"]
  assert all(r["top_ops"] is None and r["ms_per_step"] > 0 for r in rows)
  assert capsys.readouterr().out.count("profile failed (ValueError: no trace); timings kept") == 2


@pytest.mark.parametrize("flag", ["--dropout", "--attention_dropout"])
def test_train_step_refuses_a_bad_dropout_rate(flag, capsys):
  with pytest.raises(SystemExit) as e:
    train_step.main(["--size", "tiny", flag, "1.0", "--out", "/nonexistent/x.json"])
  assert e.value.code == 2
  assert f"{flag}=1.0 must be in [0, 1)" in capsys.readouterr().err


def test_gpu_check_runs_every_step_and_writes_what_the_device_brings_back(tmp_path):
  # GPU_CHECK_SMOKE=1: the device script's own steps and plumbing at tiny sizes, on CPU.
  out = tmp_path / "out"
  env = _python_first_env(GPU_CHECK_SMOKE="1", JAX_PLATFORMS="cpu")
  res = subprocess.run(["bash", "benchmarks/gpu_check.sh", "run", str(out)], env=env,
                       cwd=ROOT, capture_output=True, text=True, timeout=540)
  assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
  names = sorted(p.name for p in out.iterdir())
  assert names == ["attention_core.json", "gpu_check.log", "train_base_b192_attn0.json",
                   "train_base_b64.json", "train_base_b64_attn0.json"]
  log = (out / "gpu_check.log").read_text()
  assert log.count(": exit 0 after") == 4 and "=== 0 step(s) failed" in log
  for name, batch, rate in [("train_base_b64", 2, 0.1), ("train_base_b64_attn0", 2, 0.0),
                            ("train_base_b192_attn0", 4, 0.0)]:
    r = json.loads((out / f"{name}.json").read_text())
    assert (r["args"]["batch"], r["attention_dropout"]) == (batch, rate)
    assert f"{name}.json: batch {batch}, flax" in log
  assert json.loads((out / "attention_core.json").read_text())


def test_gpu_check_counts_a_failed_step_and_runs_the_rest(tmp_path):
  # The three train steps replaced by a no-op, attention_core by a module that is not there.
  script = (ROOT / "benchmarks" / "gpu_check.sh").read_text()
  script = script.replace("-m benchmarks.train_step", "-c pass").replace(
      "benchmarks.attention_core", "benchmarks.no_such_benchmark")
  (tmp_path / "gpu_check.sh").write_text(script)
  res = subprocess.run(["bash", str(tmp_path / "gpu_check.sh"), "run", str(tmp_path / "out")],
                       env=_python_first_env(GPU_CHECK_SMOKE="1"), cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
  log = (tmp_path / "out" / "gpu_check.log").read_text()
  assert res.returncode == 1, log
  assert log.count(": exit 0 after") == 3 and "=== attention_core: exit 1 after" in log
  assert log.rstrip().endswith("=== 1 step(s) failed")


def _python_first_env(**extra: str) -> dict:
  """The environment with this interpreter's directory first on PATH (the script runs python3)."""
  path = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
  return dict(os.environ, PATH=path, **extra)


def test_scaling_loss_equal_on_one_and_two_devices(tmp_path):
  out = tmp_path / "scaling.json"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  res = subprocess.run([sys.executable, "-m", "benchmarks.scaling", "--devices", "1", "2",
                        "--steps", "3", "--batch", "8", "--timeout", "240", "--out", str(out)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
  result = json.loads(out.read_text())
  assert result["pass"] and [r["devices"] for r in result["rows"]] == [1, 2]
  assert result["max_rel_diff"] < 1e-4
  assert len(result["rows"][1]["losses"]) == 3
  host = device_info.host_description()
  assert result["host"] == host and f"host: {host}" in res.stdout


def test_scaling_refuses_a_device_count_the_run_did_not_have(tmp_path):
  # --real on this CPU: asking for 2 devices gives a run on 1, which must not
  # be reported as a 2-device row.
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  res = subprocess.run([sys.executable, "-m", "benchmarks.scaling", "--real", "--devices", "2",
                        "--steps", "2", "--batch", "2", "--timeout", "240",
                        "--out", str(tmp_path / "s.json")],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert res.returncode == 1 and "Traceback" not in res.stderr
  assert "error: N=2: the run saw 1 cpu device(s), not 2" in res.stderr
  assert not (tmp_path / "s.json").exists()


def test_huge_pages_benchmark_runs_both_settings(tmp_path):
  from attention import huge_pages
  out = tmp_path / "hp.json"
  res = subprocess.run([sys.executable, "-m", "benchmarks.huge_pages", "--length", "64",
                        "--repeats", "1", "--rounds", "1", "--out", str(out)],
                       capture_output=True, text=True, timeout=600, cwd=ROOT)
  assert res.returncode == 0, res.stderr[-2000:]
  got = json.loads(out.read_text())
  expected = huge_pages.thp_mode() == "always" or huge_pages.huge_pages_environ(
      {}, glibc=huge_pages.glibc_version(), thp=huge_pages.thp_mode()) is not None
  assert got["took_effect"] == expected
  assert got["host"] == device_info.host_description()
  assert [r["workload"].split(",")[0] for r in got["rows"]] == [
      "x * 2", "q kᵀ", "flax attention fwd+bwd", "ours (None) attention fwd+bwd"]
  for r in got["rows"]:
    assert r["small_ms"] > 0 and r["huge_ms"] > 0 and r["small_faults"] >= 0
    assert r["speedup"] == pytest.approx(r["small_ms"] / r["huge_ms"])
