"""A web app for open-vocabulary segmentation (Gradio), offline.

  python app.py                                   # the demo's model (runs/demo/san), http://127.0.0.1:7860
  python app.py --model san_vit_b16 --port 8080   # the official B/16 weights (Hugging Face Hub cache)

Open http://127.0.0.1:7860 in a browser. Upload an image (or pick the bundled example), type class names
separated by commas, optionally add the COCO-Stuff names (as predict.py --aug_vocab does), and press
Segment: the overlay, a legend with each class's share of the image, and downloads of the label PNG
(class ids, uint8, or uint16 beyond 256 classes) and a JSON of the classes. The model box takes any
source san_jax.pretrained loads (a model name, a .pth, a parameters checkpoint, a training run).

Nothing leaves the machine: Gradio's analytics are off, the theme uses system fonts (no font CDN) and
server-side rendering (a Node server) is off. Class embeddings are cached per vocabulary; each model is
compiled once per input-size bucket (the image after the test resize, padded to a multiple of 32), so a
second request of a similar image is fast.
"""

from __future__ import annotations

import html
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported: no telemetry calls
os.environ.setdefault("GRADIO_SERVER_NAME", "127.0.0.1")

import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import flags  # pylint: disable=g-import-not-at-top,wrong-import-position

from san_jax import cli  # pylint: disable=g-import-not-at-top,wrong-import-position

REPO = Path(__file__).resolve().parent
DEFAULT_MODEL = "runs/demo/san"
EXAMPLE = REPO / "docs" / "examples" / "shapes_scene.png"
EXAMPLE_VOCAB = "red diamond, yellow diamond, orange hexagon"
AUG_CHOICES = ("none", "coco_stuff", "coco_all")


def _define_flags(fv: flags.FlagValues, argv: List[str]) -> None:
  del argv
  flags.DEFINE_string("model", DEFAULT_MODEL, "default model source: san_vit_b16 | san_vit_l14 | a .pth | a params "
                      "checkpoint | a training run directory", flag_values=fv)
  flags.DEFINE_string("host", "127.0.0.1", "address to listen on (127.0.0.1: this machine only)", flag_values=fv)
  flags.DEFINE_integer("port", 7860, "port to listen on", flag_values=fv)
  flags.DEFINE_integer("min_size", None, "short side of the test resize (default: the run config's "
                       "data.eval_min_size, else 640; 0 keeps the input size)", flag_values=fv)
  flags.DEFINE_integer("max_size", 2560, "long-side cap of the test resize", flag_values=fv)


def missing_model_message(source: str) -> str:
  if source == DEFAULT_MODEL:
    return (f"No model at {DEFAULT_MODEL}: train the demo's model with `.venv/bin/python demo.py` (about an "
            "hour on a laptop CPU), or type another model source (san_vit_b16, a .pth, a checkpoint, a run).")
  return f"No model at {source}: type a model name (san_vit_b16, san_vit_l14), a .pth, a checkpoint or a run."


class SegmentApp:
  """The app's state and its one action, independent of the UI: loaded models (one Segmenter each, which
  holds the per-vocabulary embedding cache and the compiled programs) by source."""

  def __init__(self, default_model: str = DEFAULT_MODEL, min_size: Optional[int] = None, max_size: int = 2560,
               out_dir: Optional[str] = None):
    self.default_model = default_model
    self.min_size, self.max_size = min_size, max_size
    self.out_dir = Path(out_dir or tempfile.mkdtemp(prefix="san_app_"))
    self.out_dir.mkdir(parents=True, exist_ok=True)
    self._loaded: Dict[str, Tuple[object, object, int]] = {}
    self._count = 0

  def model(self, source: str):
    """(Pretrained, Segmenter, test-resize short side) for `source`, loaded once."""
    from san_jax import pretrained
    source = (source or self.default_model).strip()
    if source not in self._loaded:
      if source not in pretrained.MODEL_NAMES and not os.path.exists(source):
        raise FileNotFoundError(missing_model_message(source))
      p = pretrained.load(source)
      min_size = self.min_size
      if min_size is None:
        min_size = int(p.run_config.data.get("eval_min_size", 640)) if p.run_config is not None else 640
      self._loaded[source] = (p, p.segmenter(), min_size)
    return self._loaded[source]

  def vocabulary(self, text: str, aug: str) -> Tuple[Tuple[str, ...], int]:
    from san_jax.data import vocabularies
    from san_jax.text import classifier
    user = classifier.parse_vocabulary(text or "")
    return vocabularies.augmented(user, None if aug in (None, "", "none") else aug), len(user)

  def segment(self, image: Optional[np.ndarray], vocab_text: str, aug: str = "none", source: str = ""):
    """-> (overlay uint8 [H, W, 3] at the input's size, legend HTML, label PNG path, JSON path, status)."""
    from PIL import Image
    from san_jax import viz
    from san_jax.data.image_io import to_rgb
    if image is None:
      raise ValueError("Upload an image or pick the example first.")
    names, num_user = self.vocabulary(vocab_text, aug)
    p, seg, min_size = self.model(source)
    rgb = to_rgb(np.asarray(image))
    t0 = time.perf_counter()
    labels, _ = seg.predict(rgb, names, resize_to=(min_size, self.max_size) if min_size else None)
    seconds = time.perf_counter() - t0
    colors = viz.palette(len(names))
    over = viz.overlay(rgb, labels, colors, alpha=0.5)
    counts = np.bincount(labels.ravel(), minlength=len(names))
    total = int(labels.size)
    rows = [{"id": i, "name": names[i], "pixels": int(counts[i]), "fraction": counts[i] / total,
             "user_class": i < num_user} for i in range(len(names)) if i < num_user or counts[i]]
    self._count += 1
    stem = self.out_dir / f"request_{self._count:04d}"
    label_path, json_path = f"{stem}_label.png", f"{stem}.json"
    Image.fromarray(labels.astype(np.uint8 if len(names) <= 256 else np.uint16)).save(label_path)
    info = {"height": int(labels.shape[0]), "width": int(labels.shape[1]), "vocabulary": list(names),
            "num_user_classes": num_user, "aug_vocab": None if aug == "none" else aug, "model": p.describe(),
            "seconds": seconds, "classes": sorted(rows, key=lambda r: -r["pixels"])}
    Path(json_path).write_text(json.dumps(info, indent=1))
    status = (f"request {self._count}: {p.describe()}: {len(names)} classes ({num_user} typed), {labels.shape[1]}x{labels.shape[0]} "
              f"pixels, {seconds:.2f} s")
    return over, legend_html(rows, colors), label_path, json_path, status


def legend_html(rows: List[dict], colors: np.ndarray) -> str:
  """A table: swatch, class name, share of the image; the typed classes first (absent ones at 0%), then the
  added COCO-Stuff classes that were predicted, largest first."""
  rows = sorted(rows, key=lambda r: (not r["user_class"], -r["pixels"]))
  cells = []
  for r in rows:
    c = colors[r["id"]]
    cells.append(f'<tr class="san-legend-row"><td><span style="display:inline-block;width:14px;height:14px;'
                 f'background:rgb({c[0]},{c[1]},{c[2]})"></span></td><td class="san-class">{html.escape(r["name"])}'
                 f'</td><td style="text-align:right">{100 * r["fraction"]:.1f}%</td></tr>')
  return f'<table id="san-legend">{"".join(cells)}</table>'


def build_ui(state: SegmentApp):
  import gradio as gr

  def run(image, vocab, aug, source):
    try:
      return state.segment(image, vocab, aug, source)
    except FileNotFoundError as e:
      return None, "", None, None, str(e)
    except Exception as e:  # a message in the page, not a trace: vocabulary errors, wrong sources, ...
      return None, "", None, None, f"{type(e).__name__}: {e}"

  with gr.Blocks(title="SAN open-vocabulary segmentation", analytics_enabled=False) as ui:
    gr.Markdown("## SAN: open-vocabulary semantic segmentation\nUpload an image, type class names, press Segment.")
    from san_jax import pretrained
    if state.default_model not in pretrained.MODEL_NAMES and not os.path.exists(state.default_model):
      gr.Markdown(f"**{missing_model_message(state.default_model)}**", elem_id="san-missing-model")
    with gr.Row():
      with gr.Column():
        image = gr.Image(type="numpy", label="image", elem_id="san-input", sources=["upload", "clipboard"], height=360)
        vocab = gr.Textbox(label="class names, comma separated", value=EXAMPLE_VOCAB, elem_id="san-vocab")
        aug = gr.Radio(list(AUG_CHOICES), value="none", label="add COCO-Stuff names", elem_id="san-aug")
        source = gr.Textbox(label="model", value=state.default_model, elem_id="san-model")
        button = gr.Button("Segment", variant="primary", elem_id="san-run")
        if EXAMPLE.exists():
          gr.Examples([[str(EXAMPLE), EXAMPLE_VOCAB]], [image, vocab], label="example")
      with gr.Column():
        out = gr.Image(type="numpy", label="segmentation", elem_id="san-output", interactive=False, format="png", height=360)
        legend = gr.HTML(elem_id="san-legend-box")
        status = gr.Markdown(elem_id="san-status")
        with gr.Row():
          label_file = gr.File(label="label PNG", elem_id="san-label-file")
          json_file = gr.File(label="classes JSON", elem_id="san-json-file")
    button.click(run, [image, vocab, aug, source], [out, legend, label_file, json_file, status])
  return ui


def theme():
  import gradio as gr
  return gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])


def serve(state: SegmentApp, host: str, port: int, block: bool = True):
  """Starts the server; returns the local URL (block=False: the caller stops it with `ui.close()`)."""
  ui = build_ui(state)
  ui.launch(server_name=host, server_port=port, prevent_thread_lock=not block, ssr_mode=False, theme=theme(),
            footer_links=[], quiet=not block, share=False, inbrowser=False, mcp_server=False, pwa=False)
  return ui


def _main(f: flags.FlagValues, args: List[str]) -> int:
  del args
  from san_jax import pretrained
  state = SegmentApp(f.model, f.min_size, f.max_size)
  if f.model not in pretrained.MODEL_NAMES and not os.path.exists(f.model):
    print(missing_model_message(f.model), flush=True)
  print(f"open http://{f.host}:{f.port} in a browser", flush=True)
  serve(state, f.host, f.port)
  return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
  return cli.run(_define_flags, _main, argv, prog="app.py")


if __name__ == "__main__":
  main()
