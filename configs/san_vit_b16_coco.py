"""SAN ViT-B/16 on COCO-Stuff-171, the official recipe (san_clip_vit_res4_coco.yaml).

  python train.py --config configs/san_vit_b16_coco.py --workdir runs/san_b16
  python train.py --config configs/san_vit_b16_coco.py --workdir runs/san_b16 --config.train.batch_size=8
"""

from configs import common


def get_config(arg=None):
  del arg
  return common.base(common.model_b16())
