"""app.py in a real browser: Debian's headless Chromium driven by playwright (no browser download).

The app runs in its own process on a free loopback port with a random-weight tiny SAN the test writes;
the page is driven as a person would: upload an image, type a vocabulary, press Segment, wait for the
output image. Asserts: the legend lists the typed classes, the output image has the input's aspect, the
label PNG and JSON downloads exist, and no request left the machine. Also measures the first and second
request's latency (printed; the second is the same size, so it runs the compiled program again).
"""

from __future__ import annotations

import base64
import io
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest
from PIL import Image

from configs import tiny
from san_jax import checkpoint, pretrained

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = os.environ.get("SAN_JAX_CHROMIUM", "/usr/bin/chromium")
H, W = 96, 160  # aspect 0.6; the tiny config's test resize (short side 128) scales it to 128 x 213
VOCAB = ["red circle", "blue square", "grass"]

pytestmark = pytest.mark.slow


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _wait_for(url: str, proc, timeout: float = 300):
  import urllib.request
  t0 = time.time()
  while time.time() - t0 < timeout:
    if proc.poll() is not None:
      raise RuntimeError(f"app.py exited with {proc.returncode}:\n{proc.stdout.read()[-3000:]}")
    try:
      with urllib.request.urlopen(url, timeout=5) as r:
        if r.status == 200:
          return
    except OSError:
      time.sleep(1)
  raise TimeoutError(f"app.py did not answer at {url} within {timeout} s")


@pytest.fixture
def app_server(tmp_path):
  flat, san_config = pretrained.quick_random_params(tiny.get_config().model, seed=0)
  ckpt = checkpoint.save_params(tmp_path / "params", flat, {"san_config": san_config})
  port = _free_port()
  env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1",
             GRADIO_TEMP_DIR=str(tmp_path / "gradio"))
  proc = subprocess.Popen([sys.executable, "app.py", "--model", ckpt, "--port", str(port), "--min_size", "128"],
                          cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  url = f"http://127.0.0.1:{port}/"
  try:
    _wait_for(url, proc)
    yield url
  finally:
    proc.terminate()
    try:
      proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
      proc.kill()


def _image_size_in_page(page, selector: str):
  """The natural size of the <img> in the output box (the served PNG, not its CSS box)."""
  return page.eval_on_selector(f"{selector} img", "img => [img.naturalWidth, img.naturalHeight]")


def test_app_in_chromium(app_server, tmp_path):
  if not os.path.exists(CHROMIUM):
    if os.environ.get("CI"):
      pytest.fail(f"{CHROMIUM} not installed: scripts/setup.sh --dev installs Debian's chromium with apt-get")
    pytest.skip(f"{CHROMIUM} not installed (apt-get install chromium; scripts/setup.sh --dev does as root)")
  from playwright.sync_api import sync_playwright
  from san_jax.data import shapes
  ex = shapes.render(1, split="val", spec=shapes.ShapesSpec(image_size=(H, W)))
  Image.fromarray(ex["image"]).save(tmp_path / "scene.png")
  outside = []
  profile = tempfile.mkdtemp(prefix="chromium_profile_")
  args = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
          "--disable-background-networking", "--disable-component-update", "--disable-sync"]
  try:
    with sync_playwright() as pw:
      ctx = pw.chromium.launch_persistent_context(profile, executable_path=CHROMIUM, headless=True, args=args,
                                                  viewport={"width": 1280, "height": 900})
      try:
        def guard(route):
          host = urlparse(route.request.url).hostname
          if host not in ("127.0.0.1", "localhost") and not route.request.url.startswith(("data:", "blob:")):
            outside.append(route.request.url)
            return route.abort()
          return route.continue_()
        ctx.route("**/*", guard)
        page = ctx.new_page()
        page.goto(app_server, wait_until="networkidle", timeout=120_000)
        latencies = []
        for attempt in range(2):
          page.set_input_files("#san-input input[type=file]", str(tmp_path / "scene.png"))
          page.fill("#san-vocab textarea", ", ".join(VOCAB))
          page.wait_for_timeout(500)
          t0 = time.perf_counter()
          page.click("#san-run")
          page.wait_for_function(  # the status line names the request: "request 2: ..."
              "s => { const e = document.querySelector('#san-status'); return e && (e.innerText.includes(s) || "
              "e.innerText.includes('Error')) }", arg=f"request {attempt + 1}:", timeout=600_000)
          status = page.inner_text("#san-status")
          assert f"request {attempt + 1}:" in status, status
          page.wait_for_selector("#san-output img", timeout=60_000)
          latencies.append(time.perf_counter() - t0)
        legend = page.inner_text("#san-legend")
        for name in VOCAB:
          assert name in legend, legend
        w, h = _image_size_in_page(page, "#san-output")
        assert abs(h / w - H / W) < 0.02, (w, h)
        text = page.inner_text("body")
        assert "label PNG" in text and "classes JSON" in text
        assert page.query_selector("#san-label-file a") is not None and page.query_selector("#san-json-file a")
        shot = REPO / "docs" / "app_screenshot.png" if os.environ.get("SAN_JAX_SCREENSHOT") else tmp_path / "app.png"
        page.screenshot(path=str(shot), full_page=True)
        print(f"\napp latency: first request {latencies[0]:.1f} s, second {latencies[1]:.1f} s (page to output)")
      finally:
        ctx.close()
  finally:
    shutil.rmtree(profile, ignore_errors=True)
  assert not outside, f"the page tried to reach {outside[:5]}"
