"""The paper's preprocessing with torchvision v2: Inception crop + flip, squash eval, normalisation.

Every transform maps a uint8 (3, H, W) tensor to a uint8 (3, R, R) tensor: the loaders keep
images uint8 until a whole batch is assembled and normalise the batch in one vectorised step
(``normalize_batch``). What a training batch goes through after the crop (MixUp/CutMix and DM's
RandAugment) is ``pipeline.data.mixing.TrainRecipe``; DM's RandAugment itself is
``pipeline.data.randaugment``, whose op table and op function are re-exported here.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from pipeline.data.randaugment import RANDAUGMENT_OPS, DMRandAugment, randaugment_op

__all__ = [
    "BICUBIC",
    "CROP_AREA",
    "CROP_ASPECT",
    "EVAL_PADDING",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "RANDAUGMENT_OPS",
    "DMRandAugment",
    "InceptionCrop",
    "eval_transform",
    "normalize_batch",
    "randaugment_op",
]

# DM dataset.py: MEAN_RGB = (0.485*255, 0.456*255, 0.406*255), STDDEV_RGB = (0.229*255, ...).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# DM dataset.py (Inception crop): area_range=(0.08, 1.0), aspect_ratio_range=(3/4, 4/3).
CROP_AREA = (0.08, 1.0)
CROP_ASPECT = (3 / 4, 4 / 3)
# DM dataset.py resize_crop_32: squash-resize to (test + 32)^2, then centre-crop to test.
EVAL_PADDING = 32
BICUBIC = v2.InterpolationMode.BICUBIC

_SCALE = 1.0 / (torch.tensor(IMAGENET_STD, dtype=torch.float32).view(1, 3, 1, 1) * 255.0)
_SHIFT = -torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(1, 3, 1, 1) * 255.0 * _SCALE


def normalize_batch(images: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> float32 normalised with the ImageNet mean/std (into ``out``)."""
    # Convert first, then scale and shift in place: a uint8 - float32 op with type promotion
    # takes the slow non-vectorised path (30x slower here).
    out = images.to(torch.float32) if out is None else out.copy_(images)
    return out.mul_(_SCALE).add_(_SHIFT)


class InceptionCrop:
    """Inception crop (bicubic) and horizontal flip of a uint8 (3, H, W) tensor: the v2 pipeline
    ``Compose([RandomResizedCrop, RandomHorizontalFlip])`` without v2's per-call dispatch (the
    same draws from torch's global generator and the same kernels: identical output, tested).

    The crop is cut before resizing, so only its pixels are resampled (DM dataset.py: the crop
    window is decoded, then resized to the training resolution).
    """

    def __init__(self, resolution: int, crop_min_area: float = CROP_AREA[0]) -> None:
        self.size = [resolution, resolution]
        self.crop = v2.RandomResizedCrop(
            resolution,
            scale=(crop_min_area, CROP_AREA[1]),
            ratio=CROP_ASPECT,
            interpolation=BICUBIC,
            antialias=True,
        )

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        """uint8 (3, H, W) tensor -> cropped, resized, maybe flipped uint8 (3, R, R) tensor."""
        params = self.crop.make_params([image])
        image = F.resized_crop(
            image, **params, size=self.size, interpolation=BICUBIC, antialias=True
        )
        flip = bool(torch.rand(1) < 0.5)  # the draw v2.RandomHorizontalFlip makes
        return F.horizontal_flip(image) if flip else image


def eval_transform(resolution: int, padding: int = EVAL_PADDING) -> Callable:
    """uint8 (3, H, W) tensor -> squash-resize to (R + padding)^2, centre crop to R.

    DM's 32 pixels keep 87.5 % of the side at 224 px but only the central half at 32 px: small
    images (the laptop demo and experiments) take a smaller padding, 0 for the whole image.
    """
    size = resolution + padding
    return v2.Compose(
        [
            v2.Resize((size, size), interpolation=BICUBIC, antialias=True),
            v2.CenterCrop(resolution),
        ]
    )
