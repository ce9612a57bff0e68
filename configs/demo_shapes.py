"""The first-hour demo: open-vocabulary segmentation of synthetic shapes, end to end on a CPU.

  python demo.py                                   # = --config configs/demo_shapes.py --workdir runs/demo

Three stages (demo.py): (1) a tiny CLIP learns image-text alignment contrastively from captions such as
"a photo of a red triangle." of the objects in scenes of all 48 colour-shape classes (section
`clip_pretrain`, san_jax/demo/clip_pretrain.py); (2) SAN trains its side network on scenes of the 36 *seen*
classes only, with that CLIP frozen (sections `model`, `train`, `data`, as configs/tiny.py); (3) evaluation
on the validation split prompted with all 48 class names, reporting the mIoU of the seen and of the 12
unseen classes.

Geometry: 64x64 images; CLIP sees them at full resolution (clip_resolution 1.0) with 8x8 patches, an 8x8
token grid; the side network uses 4x4 patches (16x16 masks). Every `--config.x.y=v` override works, e.g.
the smoke test's `--config.clip_pretrain.steps=3 --config.train.steps=3`.
"""

import ml_collections

from configs import common
from san_jax.data import shapes

IMAGE_SIZE = 64
# The scenes of both stages: upright shapes, objects of 15-30% of the image side, <= 3 per scene. A ViT
# trained from scratch learns shape slowly (measured: ~30% 6-way shape accuracy after 300 steps of 128
# images with rotating shapes of 8-25% of the side, where a 3-layer CNN reaches 60%); upright, larger shapes
# are what lets the CPU demo's CLIP learn them within minutes.
SHAPES = dict(rotate=False, min_radius=0.15, max_radius=0.3, max_objects=3)


def demo_model() -> ml_collections.ConfigDict:
  clip = dict(vision=dict(image_size=IMAGE_SIZE, patch_size=8, width=64, layers=4, heads=2, output_dim=64),
              text=dict(context_length=77, vocab_size=49408, width=64, heads=2, layers=2, output_dim=64),
              quick_gelu=True)
  return ml_collections.ConfigDict(dict(
      clip=clip, clip_resolution=1.0, feature_last_layer_idx=3, size_divisibility=32,
      rec_downsample_method="max", sos_token_format="cls_token", template_set="vild",
      side=dict(image_size=IMAGE_SIZE, patch_size=4, width=64, depth=4, heads=2, mlp_ratio=4.0, num_queries=8,
                fusion_map=["0->0", "1->1", "2->2", "3->3"], deep_supervision_idxs=[3, 4],
                attn_bias_heads=2, attn_bias_layers=1, attn_bias_embed=32, attn_bias_mlp=64,
                attn_bias_mlp_layers=3, rescale_attn_bias=True),
      remat="none",  # a toy: its activations fit in a few MB, so the backward need not recompute the forward
  ))


def clip_pretrain() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      steps=5000, batch_size=32, lr=2e-3, weight_decay=0.05, warmup_steps=50, seed=0,
      # Scenes of 1..3 objects, one caption per object whose class token sees only that object's patches (the
      # way SAN's recognition head will look at masks), plus a caption loss on every patch (dense_weight).
      mode="regions", max_regions=SHAPES["max_objects"], dense_weight=1.0,
      num_images=16384,  # renders, all 48 classes
      min_radius=SHAPES["min_radius"], max_radius=SHAPES["max_radius"], rotate=SHAPES["rotate"],
      text_length=16,  # tokens per caption (the longest caption has 14; the text tower's context is 77)
      templates="vild",  # captions: a random prompt template per example, filled with the class name
      log_every=100, num_eval=480,
  ))


def get_config(arg=None):
  del arg
  cfg = common.base(demo_model())
  cfg.clip_pretrain = clip_pretrain()
  cfg.train.steps = 900
  cfg.train.eval_every = 0  # demo.py evaluates at the end, on the demo's own scenes
  cfg.train.optimizer.lr = 1e-3
  cfg.train.batch_size = 16
  cfg.train.compute_dtype = "float32"
  cfg.train.clip_grad_norm = 1.0
  cfg.train.criterion.num_points = 512
  cfg.train.criterion.max_targets = 4
  cfg.train.log_every = 25
  cfg.train.checkpoint_every = 100000  # only the final step (the demo reruns stages from scratch)
  cfg.train.keep_checkpoints = 1
  cfg.data.train = "shapes"
  cfg.data.num_examples = 4096
  cfg.data.shapes_image_size = IMAGE_SIZE
  cfg.data.shapes_seed = 0
  cfg.data.shapes_classes = list(shapes.class_ids(shapes.seen_classes()))  # SAN never sees the unseen classes
  cfg.data.shapes_rotate = SHAPES["rotate"]
  cfg.data.shapes_min_radius = SHAPES["min_radius"]
  cfg.data.shapes_max_radius = SHAPES["max_radius"]
  cfg.data.shapes_max_objects = SHAPES["max_objects"]
  cfg.data.shapes_num_val = 200
  cfg.data.crop_size = IMAGE_SIZE
  cfg.data.min_size_train = [IMAGE_SIZE]
  cfg.data.max_size_train = 4 * IMAGE_SIZE
  cfg.data.color_aug_ssd = False  # colour is the class: photometric jitter would relabel it
  cfg.data.eval_datasets = ["shapes"]
  cfg.data.eval_min_size = IMAGE_SIZE
  cfg.data.eval_max_size = 4 * IMAGE_SIZE
  cfg.eval.batch_size = 16
  cfg.demo = ml_collections.ConfigDict(dict(grid_examples=8, grid_upscale=3, chance_draws=20))
  return cfg
