"""Transforms: DM-level RandAugment, eval squash + centre crop, batch normalisation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision.transforms import v2

from pipeline.data.transforms import (
    BICUBIC,
    CROP_AREA,
    CROP_ASPECT,
    IMAGENET_MEAN,
    IMAGENET_STD,
    FusedTrainTransform,
    LevelRandAugment,
    _level_space,
    _to_pil,
    eval_transform,
    normalize_batch,
)


def v2_pipeline(resolution: int, layers: int, level: float) -> v2.Compose:
    """The training recipe as a plain torchvision v2 pipeline: what FusedTrainTransform equals."""
    crop = v2.RandomResizedCrop(
        resolution, scale=CROP_AREA, ratio=CROP_ASPECT, interpolation=BICUBIC, antialias=True
    )
    if layers == 0:
        return v2.Compose([crop, v2.RandomHorizontalFlip()])
    to_pil = v2.Lambda(_to_pil, torch.Tensor)
    randaugment = LevelRandAugment(layers, level)
    return v2.Compose([crop, to_pil, v2.RandomHorizontalFlip(), randaugment, v2.PILToTensor()])


def _image(seed: int, height: int = 40, width: int = 48) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=generator)


@pytest.mark.parametrize("level", [0, 5, 10])
def test_level_randaugment_equals_torchvision_on_an_eleven_bin_scale(level):
    ours = LevelRandAugment(4, level)
    reference = v2.RandAugment(num_ops=4, magnitude=level, num_magnitude_bins=11)
    for seed in range(24):  # PIL images, as in the loader
        image = _to_pil(_image(seed))
        torch.manual_seed(seed)
        expected = np.array(reference(image))
        torch.manual_seed(seed)
        assert np.array_equal(np.array(ours(image)), expected)


def test_levels_above_ten_extrapolate_and_stay_valid():
    space = _level_space(15)
    value = {name: fn(2, 100, 100) for name, (fn, _) in space.items()}
    assert value["Rotate"][1].item() == pytest.approx(45.0)  # 30 deg at level 10
    assert value["ShearX"][1].item() == pytest.approx(0.45)
    assert value["TranslateX"][1].item() == pytest.approx(150 / 331 * 100 * 1.5)
    assert value["Brightness"][1].item() == pytest.approx(0.99)  # 1.35 clamped: factor stays > 0
    assert value["Posterize"][1].item() == 2  # 8 - 4 * 1.5 bits
    assert value["Solarize"][1].item() == 0.0
    assert value["Identity"] is None


def test_normalize_batch_matches_a_float64_reference():
    batch = torch.stack([_image(seed, 8, 8) for seed in range(4)])
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float64).view(1, 3, 1, 1)
    reference = (batch.double() / 255.0 - mean) / std
    result = normalize_batch(batch)
    assert result.dtype == torch.float32
    assert (result.double() - reference).abs().max().item() < 1e-5


def test_eval_transform_of_a_padded_square_is_its_centre():
    image = _image(7, 96, 96)  # (64 + 32)^2: the squash-resize is the identity
    assert torch.equal(eval_transform(64)(image), image[:, 16:80, 16:80])


def test_eval_transform_squashes_any_aspect_to_the_test_resolution():
    out = eval_transform(24)(_image(1, 30, 90))
    assert tuple(out.shape) == (3, 24, 24) and out.dtype == torch.uint8


@pytest.mark.parametrize("layers", [4, 0])
def test_train_transform_shapes_and_determinism_under_a_seed(layers):
    transform = FusedTrainTransform(32, layers, 5)
    image = _image(3, 64, 80)
    torch.manual_seed(11)
    first = transform(image)
    torch.manual_seed(11)
    second = transform(image)
    assert first.dtype == torch.uint8 and tuple(first.shape) == (3, 32, 32)
    assert torch.equal(first, second)


@pytest.mark.parametrize(("layers", "level"), [(4, 5), (2, 15), (0, 0)])
def test_fused_train_transform_equals_the_v2_pipeline(layers, level):
    fused = FusedTrainTransform(40, layers, level)
    reference = v2_pipeline(40, layers, level)
    for seed in range(16):
        image = _image(seed, 56, 72)
        torch.manual_seed(seed)
        expected = reference(image)
        torch.manual_seed(seed)
        assert torch.equal(fused(image), expected)


def test_transforms_pickle_for_spawned_loader_workers():
    import pickle

    for transform in (FusedTrainTransform(32, 4, 15), eval_transform(32)):
        copy = pickle.loads(pickle.dumps(transform))
        image = _image(5, 48, 48)
        torch.manual_seed(3)
        expected = transform(image)
        torch.manual_seed(3)
        assert torch.equal(copy(image), expected)
