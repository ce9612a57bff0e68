"""A tiny SAN (a few hundred thousand parameters) for tests and CPU smoke runs; geometry like SAN B/16.

  python train.py --config configs/tiny.py --workdir /tmp/san_tiny --config.train.steps=20
"""

import ml_collections

from configs import common


def tiny_model() -> ml_collections.ConfigDict:
  clip = dict(vision=dict(image_size=64, patch_size=16, width=64, layers=4, heads=4, output_dim=32),
              text=dict(context_length=77, vocab_size=49408, width=32, heads=2, layers=2, output_dim=32),
              quick_gelu=True)
  return ml_collections.ConfigDict(dict(
      clip=clip, clip_resolution=0.5, feature_last_layer_idx=3, size_divisibility=32,
      rec_downsample_method="max", sos_token_format="cls_token", template_set="vild",
      side=dict(image_size=128, patch_size=16, width=48, depth=3, heads=3, mlp_ratio=4.0, num_queries=8,
                fusion_map=["0->0", "1->1", "3->2"], deep_supervision_idxs=[2, 3],
                attn_bias_heads=4, attn_bias_layers=1, attn_bias_embed=32, attn_bias_mlp=32,
                attn_bias_mlp_layers=3, rescale_attn_bias=True),
  ))


def get_config(arg=None):
  del arg
  cfg = common.base(tiny_model())
  cfg.train.steps = 200
  cfg.train.optimizer.lr = 1e-3  # a from-scratch toy trained for a few hundred steps, not the 60k-step recipe
  cfg.train.batch_size = 2
  cfg.train.compute_dtype = "float32"
  cfg.train.criterion.num_points = 256
  cfg.train.criterion.max_targets = 8
  cfg.train.log_every = 10
  cfg.train.checkpoint_every = 50
  cfg.data.train = "shapes"
  cfg.data.num_examples = 256
  cfg.data.shapes_image_size = 128
  cfg.data.shapes_seed = 0
  cfg.data.crop_size = 128
  cfg.data.min_size_train = [96, 128, 160]
  cfg.data.max_size_train = 320
  cfg.data.eval_datasets = ["shapes"]
  cfg.train.eval_every = 100
  cfg.eval.max_examples = 16
  cfg.data.eval_min_size = 128
  cfg.data.eval_max_size = 320
  return cfg
