"""The parity checker's contract (DESIGN §4) on its own: tolerances from the noise floor, damaged cases.

The checker's results on the golden cases themselves are tests/test_san_model.py's parity tests; its point-set
comparison and the replayed selection are in tests/test_losses.py.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from convert import check_parity
from tests.conftest import case_dir


def test_tolerance_is_the_larger_of_the_relative_and_the_noise_floor_bound():
  ref = np.linspace(-1.0, 1.0, 11, dtype=np.float32)  # max|ref| = 1: relative bound 2e-4
  got = ref + np.float32(1e-3)
  assert not check_parity.compare("grad/x", ref, got)["ok"]  # no floor recorded: 1e-3 > 2e-4
  row = check_parity.compare("grad/x", ref, got, floor=2e-4)  # 10 x floor = 2e-3 >= 1e-3
  assert row["ok"] and row["tol"] == pytest.approx(2e-3) and "noise-floor bound" in row["note"]
  assert not check_parity.compare("grad/x", ref, got, floor=5e-5)["ok"]  # 10 x floor = 5e-4 < 1e-3
  tiny_floor = check_parity.compare("grad/x", ref, ref + np.float32(1e-4), floor=1e-9)
  assert tiny_floor["ok"] and tiny_floor["tol"] == pytest.approx(2e-4)  # the relative bound still applies


def _fake_case(tmp_path, noise_floor=None):
  d = tmp_path / "case"
  d.mkdir()
  (d / "case.json").write_text(json.dumps({"case": "fake"}))
  np.savez(d / "inputs.npz", x=np.zeros(3, np.float32))
  np.savez(d / "outputs.npz", y=np.zeros(3, np.float32))
  if noise_floor is not None:
    (d / "noise_floor.json").write_text(json.dumps(noise_floor))
  return d


def test_floor_comes_from_two_threads_for_forward_and_two_threads_training_for_losses_and_gradients(tmp_path):
  d = _fake_case(tmp_path, {"two_threads": {"eval_mask_preds": {"max_abs": 1e-5, "max_rel": 1e-7},
                                            "grad/a": {"max_abs": 9.0}},
                            "two_threads_training": {"grad/a": {"max_abs": 3e-4}, "loss/loss_ce": {"max_abs": 2e-6},
                                                     "_selected_points_identical": False}})
  case = check_parity.Case(str(d))
  assert case.floor("eval_mask_preds") == 1e-5
  assert case.floor("grad/a") == 3e-4  # not the forward table's entry of the same name
  assert case.floor("loss/loss_ce") == 2e-6
  assert case.floor("loss/total") is None and case.floor("clip_feat_0") is None
  (tmp_path / "other").mkdir()
  bare = check_parity.Case(str(_fake_case(tmp_path / "other")))  # no noise_floor.json: the relative bound alone
  assert bare.noise_floor == {} and bare.floor("eval_mask_preds") is None


def test_the_golden_cases_floors_are_read():
  case = check_parity.Case(str(case_dir("tiny_b16")))
  table = json.loads((case.dir / "noise_floor.json").read_text())
  name = "grad/side_adapter_network.vit_model.pos_embed"
  assert case.floor(name) == table["two_threads_training"][name]["max_abs"]
  assert case.floor("eval_mask_preds") == table["two_threads"]["eval_mask_preds"]["max_abs"]


@pytest.mark.parametrize("damage", ["truncated", "text", "missing"])
def test_a_damaged_case_file_is_named_in_one_line(tmp_path, capsys, damage):
  src = case_dir("tiny_b16")
  d = tmp_path / "case"
  d.mkdir()
  for name in ("case.json", "inputs.npz", "noise_floor.json", "model.pth"):
    (d / name).symlink_to(src / name)
  data = (src / "outputs.npz").read_bytes()
  if damage == "truncated":
    (d / "outputs.npz").write_bytes(data[: len(data) // 2])
  elif damage == "text":
    (d / "outputs.npz").write_text("not an archive\n")
  assert check_parity.main([str(d)]) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and str(d / "outputs.npz") in err, err
  assert ("missing" if damage == "missing" else "damaged") in err
  assert "Traceback" not in err


def test_a_damaged_case_json_and_a_missing_directory_are_named(tmp_path, capsys):
  d = _fake_case(tmp_path)
  (d / "case.json").write_text("{not json")
  assert check_parity.main([str(d)]) == 2
  assert f"{d / 'case.json'}: damaged, not JSON" in capsys.readouterr().err
  assert check_parity.main([str(tmp_path / "nowhere")]) == 2
  assert "no such directory" in capsys.readouterr().err
