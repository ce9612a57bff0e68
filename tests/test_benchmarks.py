"""benchmarks/components.py compares like with like: the PyTorch side computes what san-jax computes."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import components
from san_jax.ops import gemm

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def parts():
  return components.Parts()


@pytest.mark.slow  # builds open_clip ViT-B/16 and the timm side ViT: ~35 s of CPU
@pytest.mark.parametrize("row", ["rec_blocks", "postprocess"])
def test_component_rows_compute_the_same_as_pytorch(parts, row):
  """The official (Q+1+L)^2 attn_mask path of open_clip vs san-jax's recognition head, and the torch
  post-processing ops vs semantic_inference: equal within float32 rounding (measured ~1e-7 relative;
  bound 1e-4 of the largest output)."""
  r = components.bench_row(parts, row, "float32", runs=1)
  assert r["max_abs_diff"] <= 1e-4 * r["ref_max_abs"], r
  assert r["jax_s"] > 0 and r["torch_s"] > 0


def test_table_names_machine_threads_and_ratio():
  info = {"cpu": "Some CPU", "cpu_flags": ["avx2", "avx512_bf16"], "cores": 2, "torch_threads": 2, "torch": "t",
          "jax": "j", "jax_device": "cpu:0", "xla_threads": 2, "xla_flags": ""}
  rows = [{"row": "side_vit", "dtype": "float32", "jax_s": 1.0, "torch_s": 2.0, "torch_over_jax": 2.0,
           "max_abs_diff": 1e-6, "ref_max_abs": 5.0, "runs": 5},
          {"row": "side_vit", "dtype": "bfloat16", "error": "RuntimeError: x"}]
  table = components.format_table(info, rows)
  assert "Some CPU" in table and "avx512_bf16" in table and "torch t with 2 threads" in table
  assert "XLA 2 threads" in table and "Medians of 5" in table
  assert "| side_vit | float32 | 1.0000 | 2.0000 | 2.00 |" in table
  assert "| side_vit | bfloat16 | failed: RuntimeError: x |" in table
  assert "official" not in table.lower()


def test_ceilings_are_pytorchs_time_over_the_flops_at_the_matmul_peak():
  """ceiling = PyTorch s / (GFLOP / peak), peak from the faster framework's matmul_2048 row; the group line sums
  seconds and FLOPs over all of its rows (computed here by hand from the made-up rows)."""
  mm = {"row": "matmul_2048", "dtype": "float32", "jax_s": 0.2, "torch_s": 0.1, "gflop": 17.18}
  rows = [mm] + [{"row": name, "dtype": "float32", "jax_s": 1.0, "torch_s": 2.0, "gflop": 100.0 * (i + 1)}
                 for i, name in enumerate(components.GROUPS["inference"])]
  rows.append({"row": "clip_train", "dtype": "float32", "error": "RuntimeError: x"})
  peaks = components.peaks_from_rows(rows)
  assert peaks == {"float32": pytest.approx(2 * 2048 ** 3 / 0.1 / 1e9)}
  components.add_ceilings(rows, peaks)
  assert rows[1]["ceiling"] == pytest.approx(2.0 / (100.0 / peaks["float32"]))
  assert "ceiling" not in rows[-1]
  lines = components.group_lines(rows, peaks)
  assert len(lines) == 1, lines  # the train step's rows did not all run: no line for it
  at_peak = 1000.0 / peaks["float32"]  # 100 + 200 + 300 + 400 GFLOP
  assert f"PyTorch 8.000 s, san-jax 4.000 s, PyTorch / san-jax 2.00; san-jax's 1000.0 GFLOP take {at_peak:.3f} s" \
      in lines[0]
  assert f"{8.0 / at_peak:.2f}x is the ceiling" in lines[0]


@pytest.mark.skipif(not gemm.f32_attention_availability()[0], reason="fused float32 attention unavailable")
def test_program_flops_counts_the_fused_attention_that_xlas_cost_analysis_misses():
  """The side ViT's attention geometry (1 x 1,700 x 6 x 40): the program runs the custom call, whose FLOPs the
  compiled program's cost analysis leaves out; program_flops counts at least the two products, 2 x 2 x Lq x
  Lk x D per head, and at most 10% more (the softmax), and the program's next trace uses the kernel again."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from benchmarks import common
  from san_jax.models import layers
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.standard_normal((1, 1700, 6, 40)), jnp.float32) for _ in range(3))
  fn = jax.jit(lambda q, k, v: layers.attention(q, k, v))
  products = 2 * 2 * 6 * 1700 * 1700 * 40
  assert "san_f32_attention" in fn.lower(q, k, v).as_text()
  assert common.xla_flops(fn.lower(q, k, v).compile()) < 0.1 * products
  assert products <= common.program_flops(fn, q, k, v) <= 1.1 * products
  assert "san_f32_attention" in fn.lower(q, k, v).as_text()


def test_bf16_rows_only_where_torchs_autocast_is_a_best_mode():
  """Rates measured by torch_matmul_rates-style timings on three machines (GFLOP/s, float32 / bf16 autocast):
  a Zen 3 without bf16 instructions (178 / 1.3, 512^3), a Zen 4 with AVX512-BF16 (190 / 384, 2048^3) and the
  issue's AMX Xeon (311 / 1,819, 2048^3). Only the first leaves bf16 out, and says why with its numbers."""
  dtypes, why = components.best_dtypes({"float32": 178.0, "bfloat16": 1.3})
  assert dtypes == ["float32"]
  assert "1.3 GFLOP/s" in why and "178.0 in float32" in why and "--dtypes float32,bfloat16" in why
  for rates in ({"float32": 190.0, "bfloat16": 384.0}, {"float32": 311.0, "bfloat16": 1819.0}):
    assert components.best_dtypes(rates) == (["float32", "bfloat16"], "")
  info = {"cpu": "c", "cpu_flags": [], "cores": 2, "torch_threads": 2, "torch": "t", "jax": "j", "jax_device": "cpu:0",
          "xla_threads": 2, "xla_flags": "", "dtypes_note": why}
  rows = [{"row": "side_vit", "dtype": "float32", "jax_s": 1.0, "torch_s": 2.0, "torch_over_jax": 2.0,
           "max_abs_diff": 1e-6, "ref_max_abs": 5.0, "runs": 5}]
  assert why in components.format_table(info, rows)


def test_gpu_peak_table_matches_device_kinds():
  """The dense bf16 peaks of NVIDIA's datasheets (half the sparse figures they print), matched on the
  device_kind strings jax reports; a chip not in the table gives MFU "?"."""
  from benchmarks import gpu
  kinds = {"NVIDIA H100 80GB HBM3": 989.0, "NVIDIA H100 PCIe": 756.0, "NVIDIA H100 NVL": 835.0,
           "NVIDIA H200": 989.0, "NVIDIA H200 NVL": 835.0, "NVIDIA A100-SXM4-80GB": 312.0,
           "NVIDIA A100 80GB PCIe": 312.0, "NVIDIA L40S": 362.0, "NVIDIA L4": 121.0, "NVIDIA A10": 125.0,
           "NVIDIA A10G": None, "Tesla V100-SXM2-16GB": None, "cpu": None}
  assert {k: gpu.peak_tflops(k) for k in kinds} == kinds
  assert gpu.mfu(400e12, 2.0, 500.0) == pytest.approx(0.4)  # 200 TFLOP/s of 500
  assert gpu.mfu(400e12, 2.0, None) == "?"


def test_gpu_table_reports_failed_rows():
  from benchmarks import gpu
  result = {"device": {"device_kind": "NVIDIA H200", "platform": "gpu", "jax": "j", "flax": "f",
                       "peak_bf16_tflops": 989.0},
            "rows": [{"mode": "train", "model": "b16", "batch": 8, "attention": "cudnn", "remat": "none",
                      "median_s": 0.5, "images_per_s": 16.0, "flops": 2e14, "tflops_per_s": 400.0, "mfu": 0.4044,
                      "compile_s": 60.0, "xla_gb": 20.0, "device_peak_gb_so_far": 25.0},
                     {"mode": "train", "model": "b16", "batch": 32, "error": "XlaRuntimeError: RESOURCE_EXHAUSTED"}]}
  table = gpu.format_table(result)
  assert "NVIDIA H200 (gpu), jax j, flax f; bf16 dense peak 989.0 TFLOP/s" in table
  assert "| b16 | train | 8 | cudnn | none | 0.5000 | 16.0 | 200.000 | 400.0 | 40.4% | 60.0 | 20.00 | 25.0 |" in table
  assert "| b16 | train | 32 | failed: XlaRuntimeError: RESOURCE_EXHAUSTED |" in table


@pytest.mark.slow  # the tiny SAN's inference and train step compiled on CPU: ~2-6 min with 2 cores
def test_gpu_check_smoke_runs_on_cpu(tmp_path):
  """`bash benchmarks/gpu_check.sh --smoke` (what a GPU machine runs, in its CPU smoke mode) gives both
  rows with positive FLOPs and times, MFU "?" or a fraction, and the exact-attention twin's FLOPs equal
  to the program's own where no cuDNN runs (nothing hidden)."""
  import json
  import os
  import subprocess
  import sys
  out = tmp_path / "gpu_check.json"
  env = dict(os.environ, PYTHON=sys.executable)
  env.pop("OUT", None)
  proc = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--smoke", f"--out={out}"], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=1200)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(out.read_text())
  assert result["settings"]["models"] == ["tiny"] and result["settings"]["batch_sizes"] == [1]
  assert [(r["mode"], r["batch"]) for r in result["rows"]] == [("inference", 1), ("train", 1)]
  for r in result["rows"]:
    assert r["flops"] > 0 and r["flops_compiled"] > 0 and r["median_s"] > 0 and r["compile_s"] > 0, r
    assert r["images_per_s"] == pytest.approx(1 / r["median_s"])
    assert r["mfu"] == "?" or 0 < r["mfu"] < 1, r
    assert (r["mfu"] == "?") == (result["device"]["peak_bf16_tflops"] is None)
    assert r["flops_hidden_in_cudnn"] == 0 and r["attention"] == "exact", r
    assert r["xla_gb"] > 0
  assert "| tiny | train | 1 | exact | none |" in (tmp_path / "gpu_check.md").read_text()
  assert "| tiny | inference | 1 | exact | none |" in proc.stdout
