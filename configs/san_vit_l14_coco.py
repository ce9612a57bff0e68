"""SAN ViT-L/14-336 on COCO-Stuff-171, the official recipe (san_clip_vit_large_res4_coco.yaml).

  python train.py --config configs/san_vit_l14_coco.py --workdir runs/san_l14
"""

from configs import common


def get_config(arg=None):
  del arg
  return common.base(common.model_l14())
