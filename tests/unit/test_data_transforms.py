"""Transforms: Inception crop + flip, eval squash + centre crop, batch normalisation, and DM's
RandAugment as pipeline.data.transforms exports it."""

from __future__ import annotations

import pytest
import torch
from torchvision.transforms import v2

from pipeline.data import randaugment
from pipeline.data.transforms import (
    BICUBIC,
    CROP_AREA,
    CROP_ASPECT,
    IMAGENET_MEAN,
    IMAGENET_STD,
    RANDAUGMENT_OPS,
    DMRandAugment,
    InceptionCrop,
    eval_transform,
    normalize_batch,
    randaugment_op,
)


def _image(seed: int, height: int = 40, width: int = 48) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=generator)


def test_transforms_export_dms_randaugment():
    assert RANDAUGMENT_OPS is randaugment.RANDAUGMENT_OPS and len(RANDAUGMENT_OPS) == 16
    assert (
        randaugment_op is randaugment.randaugment_op and DMRandAugment is randaugment.DMRandAugment
    )


def test_normalize_batch_matches_a_float64_reference():
    batch = torch.stack([_image(seed, 8, 8) for seed in range(4)])
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float64).view(1, 3, 1, 1)
    reference = (batch.double() / 255.0 - mean) / std
    for pixels in (batch, batch.float()):  # uint8, or float in [0, 255] after mixing
        result = normalize_batch(pixels)
        assert result.dtype == torch.float32
        assert (result.double() - reference).abs().max().item() < 1e-5


def test_eval_transform_of_a_padded_square_is_its_centre():
    image = _image(7, 96, 96)  # (64 + 32)^2: the squash-resize is the identity
    assert torch.equal(eval_transform(64)(image), image[:, 16:80, 16:80])


def test_eval_padding_sets_how_much_of_the_image_is_kept():
    image = _image(3, 16, 16)
    assert torch.equal(eval_transform(16, padding=0)(image), image)  # the whole image
    padded = _image(5, 20, 20)  # (16 + 4)^2: keeps the central 80 %
    assert torch.equal(eval_transform(16, padding=4)(padded), padded[:, 2:18, 2:18])


def test_eval_transform_squashes_any_aspect_to_the_test_resolution():
    out = eval_transform(24)(_image(1, 30, 90))
    assert tuple(out.shape) == (3, 24, 24) and out.dtype == torch.uint8


@pytest.mark.parametrize("min_area", [CROP_AREA[0], 0.5])
def test_inception_crop_equals_the_v2_pipeline(min_area):
    crop = InceptionCrop(40, min_area)
    reference = v2.Compose(
        [
            v2.RandomResizedCrop(
                40, scale=(min_area, 1.0), ratio=CROP_ASPECT, interpolation=BICUBIC, antialias=True
            ),
            v2.RandomHorizontalFlip(),
        ]
    )
    for seed in range(16):
        image = _image(seed, 56, 72)
        torch.manual_seed(seed)
        expected = reference(image)
        torch.manual_seed(seed)
        out = crop(image)
        assert out.dtype == torch.uint8 and tuple(out.shape) == (3, 40, 40)
        assert torch.equal(out, expected)


def test_transforms_pickle_for_spawned_loader_workers():
    import pickle

    for transform in (InceptionCrop(32), eval_transform(32)):
        copy = pickle.loads(pickle.dumps(transform))
        image = _image(5, 48, 48)
        torch.manual_seed(3)
        expected = transform(image)
        torch.manual_seed(3)
        assert torch.equal(copy(image), expected)
