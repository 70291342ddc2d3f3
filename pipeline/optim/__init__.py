"""SGD with Adaptive Gradient Clipping and the NFNet training recipe (Brock et al. 2021)."""

from pipeline.optim.agc import SGD_AGC, adaptive_clip_, unitwise_norm
from pipeline.optim.ema import ModelEma, ema_decay_at
from pipeline.optim.groups import param_groups
from pipeline.optim.mixing import mixed_targets, smooth_labels, soft_target_cross_entropy
from pipeline.optim.schedule import base_learning_rate, default_clipping, lr_at

__all__ = [
    "SGD_AGC",
    "ModelEma",
    "adaptive_clip_",
    "base_learning_rate",
    "default_clipping",
    "ema_decay_at",
    "lr_at",
    "mixed_targets",
    "param_groups",
    "smooth_labels",
    "soft_target_cross_entropy",
    "unitwise_norm",
]
