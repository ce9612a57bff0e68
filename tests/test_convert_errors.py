"""convert.san_checkpoint on files that are not official SAN checkpoints (issue 14, item 5): one error that
names the file and says what it is, never a bare KeyError / IndexError, and nothing written."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from convert import mapping
from convert import san_checkpoint as sc

REPO = Path(__file__).resolve().parents[1]


def test_a_text_file_is_not_a_pytorch_checkpoint(tmp_path):
  src = tmp_path / "notes.pth"
  src.write_text("these are not the weights you are looking for\n")
  out = subprocess.run([sys.executable, "-m", "convert.san_checkpoint", str(src), str(tmp_path / "out")], cwd=REPO,
                       env=dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu"), capture_output=True,
                       text=True, timeout=300)
  assert out.returncode == 1
  assert out.stderr.strip().count("\n") == 0, out.stderr  # one line, no traceback
  assert f"{src}: not a PyTorch checkpoint (torch.load failed" in out.stderr
  assert not (tmp_path / "out").exists()


def test_a_truncated_pth_is_named(tmp_path):
  src = tmp_path / "cut.pth"
  torch.save({"model": {"side_adapter_network.query_embed": torch.zeros(1, 4, 8)}}, src)
  src.write_bytes(src.read_bytes()[:40])
  with pytest.raises(mapping.ConversionError, match="cut.pth: not a PyTorch checkpoint"):
    sc.main([str(src), str(tmp_path / "out")])
  assert not (tmp_path / "out").exists()


def test_a_pth_that_is_not_san_names_what_it_holds(tmp_path):
  src = tmp_path / "resnet.pth"
  torch.save({"model": {"conv1.weight": torch.zeros(2, 3, 1, 1), "fc.weight": torch.zeros(2, 2),
                        "fc.bias": torch.zeros(2)}}, src)
  with pytest.raises(mapping.ConversionError,
                     match=r"resnet.pth: not a SAN checkpoint: no side_adapter_network\.\* tensors; it holds 3 "
                           r"entries: fc\.\* \(2\), conv1\.\* \(1\)$"):
    sc.main([str(src), str(tmp_path / "out")])
  clip = tmp_path / "clip.pth"
  torch.save({"visual.conv1.weight": torch.zeros(2, 3, 1, 1), "token_embedding.weight": torch.zeros(4, 2)}, clip)
  with pytest.raises(mapping.ConversionError, match="not a SAN checkpoint.*a CLIP checkpoint\\? use python -m "
                                                    "convert.clip_checkpoint"):
    sc.main([str(clip), str(tmp_path / "out")])
  assert not (tmp_path / "out").exists()


def test_a_pickle_with_code_is_refused_and_not_run(tmp_path):
  class Boom:
    def __reduce__(self):
      return (os.system, (f"touch {tmp_path / 'ran'}",))
  src = tmp_path / "evil.pth"
  torch.save({"model": Boom()}, src)
  with pytest.raises(mapping.ConversionError, match="evil.pth: refused to load"):
    sc.main([str(src), str(tmp_path / "out")])
  assert not (tmp_path / "ran").exists()
