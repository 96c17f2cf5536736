"""ImageNet (ILSVRC-2012), ResNet-50 (bottleneck, ImageNet stem) cut into K=4 stages.

Needs the prepared TFDS `imagenet2012` (manual download of the ILSVRC-2012 archives,
`tfds build imagenet2012 --file_format=array_record`, then TFDS_DATA_DIR or
--config.data_dir). Images are resized and center-cropped to 224 in the source, with
random flips; 90 epochs of batch 256, SGD+momentum 0.9, lr 0.1 with 5-epoch warmup and
cosine decay, weight decay 1e-4. Use --config.data_parallel=N to spread each stage's
batch over N devices.

    python -m experiments.train --config=experiments/configs/imagenet_resnet50.py:pairwise,k=4 \
        --workdir=runs/imagenet_pairwise

Expected result: not measured on this project's machines. Reference: ResNet-50 with
global backprop reaches about 76% top-1 with this recipe (Goyal et al., 2017).
"""

from __future__ import annotations

import ml_collections

from experiments.configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The config; `arg` selects a variant, e.g. "pairwise,k=4" (see configs/common.py)."""
    c = common.base_config()
    c.name = "imagenet_resnet50"
    c.dataset = "imagenet2012"
    c.image_size = 224
    c.model = common.resnet_model(
        "64,3/128,4/256,6/512,3",
        block="bottleneck",
        stem="imagenet",
        shortcut="B",
        aux_head="conv256_bn_gbpl_fc",
    )
    c.num_stages = 4
    c.batch_size = 256
    c.num_train_steps = 450_000  # 90 epochs of 1.28M images
    c.optimizer.learning_rate = 0.1
    c.optimizer.weight_decay = 1e-4
    c.optimizer.warmup_steps = 25_000
    c.eval_batch_size = 500
    c.eval_every_steps = 10_000
    c.checkpoint_every_steps = 5_000
    return common.apply_arg(c, arg)
