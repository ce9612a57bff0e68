"""Pieces shared by every san-jax config: the official SAN recipe (DESIGN §1) as ml_collections blocks.

A config is `get_config(arg)` returning a ConfigDict with sections:
  model      the SAN geometry (san_jax.models.san.config_from_dict reads it) and compute dtype
  train      steps, batch, optimizer, schedule, clipping, trainable patterns, precision, logging, checkpoints
  data       training/eval data sets, augmentation and input pipeline
  mesh       device-mesh axis sizes and the logical-axis -> mesh-axis rules
  eval       evaluators, test-time augmentation, sliding windows
"""

from __future__ import annotations

import ml_collections

from san_jax.data.augment import MIN_SIZE_TRAIN
from san_jax.evaluation.inference import SAN_TTA_SCALES
from san_jax.models import san as san_lib

# Parameters SAN trains; everything else (CLIP image and text towers) is frozen. Regexes over
# dotted parameter paths (e.g. "side_adapter_network.vit_model.blocks.0.attn.qkv.kernel").
TRAINABLE_PATTERNS = (r"^side_adapter_network\.", r"^ov_classifier\.bg_embed$", r"^clip_visual\.positional_embedding$")
# The official optimizer gives these no weight decay (SOLVER.WEIGHT_DECAY_EMBED_GROUP, plus LayerNorms).
NO_DECAY_PATTERNS = (r"pos_embed", r"positional_embedding", r"query_embed", r"(^|\.)norm\d*\.", r"(^|\.)ln_",
                     r"input_proj\.0\.")


# The config's model keys; their values are `san.SANConfig`'s defaults, the official ViT-B/16 geometry,
# defined there once.
_MODEL_KEYS = ("clip_resolution", "feature_last_layer_idx", "size_divisibility", "rec_downsample_method",
               "sos_token_format", "template_set", "remat")
_SIDE_KEYS = ("image_size", "patch_size", "width", "depth", "heads", "mlp_ratio", "num_queries",
              "deep_supervision_idxs", "attn_bias_heads", "attn_bias_layers", "attn_bias_embed", "attn_bias_mlp",
              "attn_bias_mlp_layers", "rescale_attn_bias")


def model_b16() -> ml_collections.ConfigDict:
  """SAN ViT-B/16 in config notation: the CLIP by name, the fusion map as "clip_layer->side_block"."""
  cfg = san_lib.SANConfig()
  side = {k: getattr(cfg.side, k) for k in _SIDE_KEYS}
  side.update(deep_supervision_idxs=list(cfg.side.deep_supervision_idxs),
              fusion_map=[f"{a}->{b}" for a, b in cfg.side.fusion_map])
  model = {k: getattr(cfg, k) for k in _MODEL_KEYS}
  return ml_collections.ConfigDict(dict(clip=san_lib.DEFAULT_CLIP, **model, side=side))


def model_l14() -> ml_collections.ConfigDict:
  m = model_b16()
  m.clip = "ViT-L/14-336"
  m.clip_resolution = 0.7
  m.feature_last_layer_idx = 18
  m.side.fusion_map = ["0->0", "6->1", "12->2", "18->3"]
  m.side.attn_bias_heads = 16
  return m


def train() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      steps=60_000, batch_size=32, seed=0,
      compute_dtype="bfloat16",  # mixed precision: bf16 compute, float32 master weights and optimizer state
      trainable_patterns=list(TRAINABLE_PATTERNS),
      optimizer=dict(name="adamw", lr=1e-4, weight_decay=1e-4, b1=0.9, b2=0.999, eps=1e-8,
                     no_decay_patterns=list(NO_DECAY_PATTERNS)),
      schedule=dict(name="poly", power=0.9, warmup_steps=0),
      clip_grad_norm=0.01,
      # Add the devices' losses and gradients in a fixed device order (all-to-all + all-gather, the traffic of
      # an all-reduce), so any process layout trains the same trajectory bit for bit; parameters are gathered
      # for the step (DDP-like) and the batch must split over all devices. False: XLA's all-reduces, fsdp
      # keeps the parameters sharded through the step (train/steps.py).
      deterministic_reductions=True,
      criterion=dict(class_weight=2.0, mask_weight=5.0, dice_weight=5.0, no_object_weight=0.1,
                     num_points=112 * 112, oversample_ratio=3.0, importance_sample_ratio=0.75, max_targets=64),
      on_nonfinite="stop",  # or "skip": never write a poisoned checkpoint
      log_every=20, checkpoint_every=1000, keep_checkpoints=3, eval_every=5000,
      init_from="",  # a converted official SAN or CLIP checkpoint (params only) for a fresh run
      # When WORKDIR holds another run (its config.json differs in model, trainable set or data set) or only
      # checkpoints that cannot be read: False stops naming the problem; True moves those files to
      # WORKDIR/set_aside/<time>/ (nothing is deleted) and starts from scratch. A resumable run resumes either way.
      fresh=False,
  ))


def data(dataset: str = "coco_stuff_171") -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      train=dataset, train_split="train", data_dir="", crop_size=640,
      min_size_train=list(MIN_SIZE_TRAIN), max_size_train=2560, single_category_max_area=1.0,
      color_aug_ssd=True, flip=True, ignore_label=255, prefetch=2, num_workers=0,
      eval_datasets=["coco_stuff_171"], eval_min_size=640, eval_max_size=2560,
  ))


def mesh() -> ml_collections.ConfigDict:
  # -1: all remaining devices. Logical axes of parameters/activations -> mesh axes.
  return ml_collections.ConfigDict(dict(
      shape=dict(data=-1, fsdp=1, model=1),
      rules=[("batch", ("data", "fsdp")), ("embed", "fsdp"), ("clip_embed", "fsdp"), ("mlp", "model"),
             ("heads", "model"), ("vocab", "model")],
  ))


def evaluation() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      evaluators=["sem_seg"], tta=False, tta_scales=list(SAN_TTA_SCALES), tta_flip=True,
      sliding_window=False, window=640, stride=426, batch_size=1,
      max_examples=None,  # evaluate only the first N examples of each set (quick periodic checks)
  ))


def distributed() -> ml_collections.ConfigDict:
  # jax.distributed timeouts (seconds). A process silent for heartbeat_timeout_s is declared dead and every
  # process stops (no hang). 100 s is JAX's default: 60 s proved too short on an overloaded 2-core machine
  # (heartbeats starved during a compile); the shutdown wait is cut from JAX's 300 s so that survivors of
  # a crash exit within about heartbeat + shutdown. `python -m san_jax.launch` stops them at once anyway.
  return ml_collections.ConfigDict(dict(initialization_timeout_s=300, heartbeat_timeout_s=100,
                                        shutdown_timeout_s=60))


def base(model: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(model=model, train=train(), data=data(), mesh=mesh(), eval=evaluation(),
                                        distributed=distributed()))
