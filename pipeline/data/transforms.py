"""The paper's preprocessing with torchvision v2: Inception crop + flip + RandAugment, squash eval.

Every transform maps a uint8 (3, H, W) tensor to a uint8 (3, R, R) tensor: the loaders keep
images uint8 until a whole batch is assembled and normalise the batch in one vectorised step
(``normalize_batch``).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

# DM dataset.py: MEAN_RGB = (0.485*255, 0.456*255, 0.406*255), STDDEV_RGB = (0.229*255, ...).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# DM dataset.py (Inception crop): area_range=(0.08, 1.0), aspect_ratio_range=(3/4, 4/3).
CROP_AREA = (0.08, 1.0)
CROP_ASPECT = (3 / 4, 4 / 3)
# DM dataset.py resize_crop_32: squash-resize to (test + 32)^2, then centre-crop to test.
EVAL_PADDING = 32
# DM autoaugment.py: _MAX_LEVEL = 10.; an op's argument is level / _MAX_LEVEL * its maximum.
MAX_LEVEL = 10
BICUBIC = v2.InterpolationMode.BICUBIC

# Factor ops map m to 1 +- m: keep m < 1 so that extrapolated levels (> 10) stay valid factors.
_FACTOR_OPS = {"Brightness", "Color", "Contrast", "Sharpness"}


class _AtLevel:
    """Magnitudes of one RandAugment op fixed at a DM level: ``[0, value]`` (2 bins).

    A class rather than a closure so that the transform pickles into spawned loader workers.
    """

    def __init__(self, name: str, level: float) -> None:
        self.name, self.level = name, level

    def __call__(self, num_bins: int, height: int, width: int) -> torch.Tensor | None:
        grid = v2.RandAugment._AUGMENTATION_SPACE[self.name][0](MAX_LEVEL + 1, height, width)
        if grid is None:
            return None
        if float(self.level).is_integer() and self.level <= MAX_LEVEL:
            value = grid[int(self.level)]
        else:
            value = grid[0] + (grid[-1] - grid[0]) * (self.level / MAX_LEVEL)
            if self.name in _FACTOR_OPS:
                value = value.clamp(max=0.99)
            elif self.name == "Posterize":
                value = value.round().clamp(min=1)
            elif self.name == "Solarize":
                value = value.clamp(min=0.0)
        return torch.stack([grid[0], value.to(grid.dtype)])


def _level_space(level: float) -> dict:
    """torchvision's RandAugment space with every op fixed at DM ``level``."""
    return {
        name: (_AtLevel(name, level), signed)
        for name, (_, signed) in v2.RandAugment._AUGMENTATION_SPACE.items()
    }


class LevelRandAugment(v2.RandAugment):
    """RandAugment whose magnitude is a DM level (0..10 scale; levels above 10 extrapolate).

    For integer levels <= 10 it equals ``v2.RandAugment(num_ops, level, num_magnitude_bins=11)``.
    """

    def __init__(self, num_ops: int, level: float) -> None:
        if level < 0:
            raise ValueError(f"RandAugment magnitude must be >= 0, got {level}")
        super().__init__(num_ops=num_ops, magnitude=1, num_magnitude_bins=2)
        self.level = level
        self._AUGMENTATION_SPACE = _level_space(level)


_SCALE = 1.0 / (torch.tensor(IMAGENET_STD, dtype=torch.float32).view(1, 3, 1, 1) * 255.0)
_SHIFT = -torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(1, 3, 1, 1) * 255.0 * _SCALE


def normalize_batch(images: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> float32 normalised with the ImageNet mean/std (into ``out``)."""
    # Convert first, then scale and shift in place: a uint8 - float32 op with type promotion
    # takes the slow non-vectorised path (30x slower here).
    out = images.to(torch.float32) if out is None else out.copy_(images)
    return out.mul_(_SCALE).add_(_SHIFT)


def _to_pil(image: torch.Tensor) -> Image.Image:
    """uint8 (3, H, W) -> PIL RGB; one contiguous HWC copy (v2.ToPILImage takes ~1.5x as long)."""
    height, width = image.shape[-2:]
    pixels = image.permute(1, 2, 0).contiguous().numpy()
    return Image.frombuffer("RGB", (width, height), pixels, "raw", "RGB", 0, 1)


class FusedTrainTransform:
    """Inception crop (bicubic), horizontal flip, RandAugment at a DM level: the v2 pipeline
    ``Compose([RandomResizedCrop, to PIL, RandomHorizontalFlip, LevelRandAugment, PILToTensor])``
    without v2's per-call dispatch. The same RNG draws and kernels give identical output
    (tested), ~150 us less per image (~7 % of the loader's work).

    Crop and bicubic resize run on the tensor (~3x faster than PIL's resize here); the crop is
    cut before resizing, so only the crop's pixels are resampled. PIL's geometric and colour ops
    are 3-10x faster than the tensor kernels on one image, and its flip is a cheap transpose.
    """

    def __init__(
        self,
        resolution: int,
        ra_layers: int,
        ra_magnitude: float,
        crop_min_area: float = CROP_AREA[0],
    ) -> None:
        self.size = [resolution, resolution]
        self.crop = v2.RandomResizedCrop(
            resolution,
            scale=(crop_min_area, CROP_AREA[1]),
            ratio=CROP_ASPECT,
            interpolation=BICUBIC,
            antialias=True,
        )
        self.randaugment = LevelRandAugment(ra_layers, ra_magnitude) if ra_layers else None

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        """uint8 (3, H, W) tensor -> augmented uint8 (3, R, R) tensor."""
        params = self.crop.make_params([image])
        image = F.resized_crop(
            image, **params, size=self.size, interpolation=BICUBIC, antialias=True
        )
        flip = bool(torch.rand(1) < 0.5)  # the draw v2.RandomHorizontalFlip makes
        if self.randaugment is None:
            return F.horizontal_flip(image) if flip else image
        picture = _to_pil(image)
        if flip:
            picture = picture.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        picture = self.randaugment(picture)
        return torch.from_numpy(np.array(picture)).permute(2, 0, 1)


def eval_transform(resolution: int) -> Callable:
    """uint8 (3, H, W) tensor -> squash-resize to (R + 32)^2, centre crop to R."""
    size = resolution + EVAL_PADDING
    return v2.Compose(
        [
            v2.Resize((size, size), interpolation=BICUBIC, antialias=True),
            v2.CenterCrop(resolution),
        ]
    )
