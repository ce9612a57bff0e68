"""benchmarks/components.py compares like with like: the PyTorch side computes what san-jax computes."""

from __future__ import annotations

import pytest

from benchmarks import components


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
