"""DM's RandAugment (pipeline.data.randaugment) against outputs of DM's own autoaugment.py.

Golden data, tests/data/randaugment_golden.npz, was produced once, outside the repo, by

    cd /tmp/dmgold && /tmp/tfenv/bin/python make_golden.py randaugment_golden.npz

with Python 3.11, tensorflow 2.15.1, tensorflow-addons 0.23.0, ml_collections 1.1.0, numpy 1.26.4,
and /tmp/dmgold/autoaugment.py = nfnets/autoaugment.py of google-deepmind/deepmind-research at
commit f5de0ede8430809180254ee957abf36ed62579ef (the file last changed in abc9ba06). The script
(a) builds "input", a 48x64 RGB uint8 image from numpy (gradients, sharp boxes, a checkerboard,
seeded noise patches); (b) runs each op through DM's own ``_parse_policy_info(name, 0.5, level,
[128] * 3, ConfigDict(cutout_const=40, translate_const=100))`` (DM's level_to_arg, as
distort_image_with_randaugment calls it) and the op it returns, inside a tf.function (graph mode,
as DM's tf.data map), at levels 5, 10, 15 (Posterize also 2); (c) fixes DM's randomness by
replacing ``tf.random_uniform`` in that module with values fed as a function input: 0.75 keeps
the sign of Rotate/Shear/Translate ("_pos"), 0.25 flips it ("_neg"), and Cutout's centre is
(row, column) = "Cutout__centres"[i] ("_c<i>"); (d) stores DM's argument as "<key>__arg" and
DM's ``translate_x/translate_y(image, pixels, [128] * 3)`` for short shifts ("TranslateX_px7").
The only shim: ``inspect.getargspec = inspect.getfullargspec`` (removed in Python 3.11).

Bounds. Pixel ops (AutoContrast included): exact, every pixel at every level. Shear, Translate,
Cutout: exact. Rotate: a pixel may differ only where its source coordinate is an exact half pixel
(TF rounds away from zero, torchvision to even; TF's eager and graph modes disagree at the same
pixels), and at most 0.5% of pixels (measured: 0 at levels 5 and 10; 11 and 5 of 3072 at level
15, 45 degrees).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.data import randaugment as ra
from pipeline.data.randaugment import (
    RANDAUGMENT_OPS,
    DMRandAugment,
    apply_op,
    op_args,
    randaugment_op,
)

GOLDEN = np.load(Path(__file__).resolve().parents[1] / "data" / "randaugment_golden.npz")
LEVELS = (5, 10, 15)
PIXEL_OPS = (
    "AutoContrast",
    "Equalize",
    "Invert",
    "Posterize",
    "Solarize",
    "Color",
    "Contrast",
    "Brightness",
    "Sharpness",
    "SolarizeAdd",
)
SIGNED_OPS = ("Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY")
ROTATE_MAX_FRACTION = 0.005


def _input() -> torch.Tensor:
    return torch.from_numpy(GOLDEN["input"]).permute(2, 0, 1).contiguous()


def _hwc(image: torch.Tensor) -> np.ndarray:
    assert image.dtype == torch.uint8
    return image.permute(1, 2, 0).numpy()


def _dm_arg(key: str) -> float:
    return float(GOLDEN[key + "__arg"])


def test_ops_are_dms_sixteen_in_order() -> None:
    assert RANDAUGMENT_OPS == (
        "AutoContrast",
        "Equalize",
        "Invert",
        "Rotate",
        "Posterize",
        "Solarize",
        "Color",
        "Contrast",
        "Brightness",
        "Sharpness",
        "ShearX",
        "ShearY",
        "TranslateX",
        "TranslateY",
        "Cutout",
        "SolarizeAdd",
    )


@pytest.mark.parametrize("call", ["randaugment_op", "apply_op", "op_args"])
def test_unknown_op_raises_naming_it(call: str) -> None:
    generator = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="'Identity'"):
        if call == "randaugment_op":
            randaugment_op(_input(), "Identity", 5, generator)
        elif call == "apply_op":
            apply_op(_input(), "Identity", ())
        else:
            op_args("Identity", 5, generator, 48, 64)


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("name", [n for n in RANDAUGMENT_OPS if n != "Cutout"])
def test_level_to_argument_is_dms(name: str, level: int) -> None:
    key = f"{name}_L{level}" + ("_pos" if name in SIGNED_OPS else "")
    args = op_args(name, level, torch.Generator().manual_seed(0), 48, 64)
    if name in ("AutoContrast", "Equalize", "Invert"):
        assert args == ()
        return
    ours, dm = abs(args[0]), _dm_arg(key)
    if name in ("Posterize", "Solarize", "SolarizeAdd"):
        assert isinstance(args[0], int) and ours == dm
    else:  # DM's argument is a float32 tensor, ours a Python float.
        assert ours == pytest.approx(dm, rel=1e-6)


@pytest.mark.parametrize("level", LEVELS)
def test_cutout_pad_size_is_dms(level: int) -> None:
    pad, cy, cx = op_args("Cutout", level, torch.Generator().manual_seed(0), 48, 64)
    assert pad == _dm_arg(f"Cutout_L{level}_c0")
    assert 0 <= cy < 48 and 0 <= cx < 64


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("name", PIXEL_OPS)
def test_pixel_op_equals_dm(name: str, level: int) -> None:
    ours = _hwc(randaugment_op(_input(), name, level, torch.Generator().manual_seed(0)))
    np.testing.assert_array_equal(ours, GOLDEN[f"{name}_L{level}"])


def test_posterize_below_level_2_5_keeps_one_bit_as_tf() -> None:
    # int(0.4 * 2) = 0 bits: TF clamps the shift to 7, so DM keeps the top bit.
    ours = _hwc(randaugment_op(_input(), "Posterize", 2, torch.Generator()))
    np.testing.assert_array_equal(ours, GOLDEN["Posterize_L2"])


def test_solarize_threshold_wraps_as_uint8_in_dm() -> None:
    # DM's threshold int(25.6 L) is cast to uint8: 256 -> 0 inverts all, 384 -> 128 = level 5.
    np.testing.assert_array_equal(GOLDEN["Solarize_L10"], GOLDEN["Invert_L10"])
    np.testing.assert_array_equal(GOLDEN["Solarize_L15"], GOLDEN["Solarize_L5"])


def test_contrast_target_is_pixel_count_over_256_as_dm() -> None:
    # DM's contrast blends towards sum(histogram) / 256 = H * W / 256: 196 for 224x224 images.
    image = torch.randint(0, 256, (3, 224, 224), dtype=torch.uint8)
    assert (apply_op(image, "Contrast", (0.0,)) == 196).all()


@pytest.mark.parametrize("sign", ["pos", "neg"])
@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("name", ["ShearX", "ShearY", "TranslateX", "TranslateY"])
def test_shear_and_translate_equal_dm(name: str, level: int, sign: str) -> None:
    key = f"{name}_L{level}_{sign}"
    ours = _hwc(apply_op(_input(), name, (_dm_arg(key),)))
    np.testing.assert_array_equal(ours, GOLDEN[key])


@pytest.mark.parametrize(
    "key", ["TranslateX_px7", "TranslateX_px-13", "TranslateY_px9", "TranslateY_px-5"]
)
def test_short_translations_equal_dm(key: str) -> None:
    name, pixels = key.split("_px")
    ours = _hwc(apply_op(_input(), name, (float(pixels),)))
    np.testing.assert_array_equal(ours, GOLDEN[key])


def _half_pixel_distance(degrees: float, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Distance of the source coordinate of output pixels to the nearest half pixel (tfa rotate:
    counter-clockwise about the centre, pixel-index coordinates), in exact float64."""
    height, width = GOLDEN["input"].shape[:2]
    theta = math.radians(degrees)
    cx, cy = (width - 1) / 2, (height - 1) / 2
    x = math.cos(theta) * (cols - cx) - math.sin(theta) * (rows - cy) + cx
    y = math.sin(theta) * (cols - cx) + math.cos(theta) * (rows - cy) + cy
    return np.minimum(np.abs(x - np.floor(x) - 0.5), np.abs(y - np.floor(y) - 0.5))


@pytest.mark.parametrize("sign", ["pos", "neg"])
@pytest.mark.parametrize("level", LEVELS)
def test_rotate_equals_dm_up_to_half_pixel_ties(level: int, sign: str) -> None:
    key = f"Rotate_L{level}_{sign}"
    ours = _hwc(apply_op(_input(), "Rotate", (_dm_arg(key),)))
    rows, cols = np.nonzero((ours != GOLDEN[key]).any(-1))
    assert rows.size <= ROTATE_MAX_FRACTION * ours.shape[0] * ours.shape[1]
    assert (_half_pixel_distance(_dm_arg(key), rows, cols) < 1e-6).all()
    if level < 15:
        assert rows.size == 0


@pytest.mark.parametrize("centre", [0, 1])
@pytest.mark.parametrize("level", LEVELS)
def test_cutout_equals_dm(level: int, centre: int) -> None:
    key = f"Cutout_L{level}_c{centre}"
    cy, cx = (int(v) for v in GOLDEN["Cutout__centres"][centre])
    ours = _hwc(apply_op(_input(), "Cutout", (int(_dm_arg(key)), cy, cx)))
    np.testing.assert_array_equal(ours, GOLDEN[key])


@pytest.mark.parametrize("name", ["Rotate", "ShearX", "ShearY", "TranslateX"])
def test_random_sign_gives_dms_positive_or_negative_op(name: str) -> None:
    pos, neg = GOLDEN[f"{name}_L5_pos"], GOLDEN[f"{name}_L5_neg"]
    seen = set()
    for seed in range(16):
        ours = _hwc(randaugment_op(_input(), name, 5, torch.Generator().manual_seed(seed)))
        assert np.array_equal(ours, pos) or np.array_equal(ours, neg)
        seen.add("pos" if np.array_equal(ours, pos) else "neg")
    assert seen == {"pos", "neg"}


@pytest.mark.parametrize("name", SIGNED_OPS)
def test_sign_is_a_fair_coin(name: str) -> None:
    generator = torch.Generator().manual_seed(0)
    signs = [math.copysign(1.0, op_args(name, 5, generator, 48, 64)[0]) for _ in range(4000)]
    assert abs(sum(s > 0 for s in signs) - 2000) <= 150  # about 4.7 sigma


def test_randaugment_op_is_apply_op_of_op_args() -> None:
    image = _input()
    for index, name in enumerate(RANDAUGMENT_OPS):
        drawn = randaugment_op(image, name, 10, torch.Generator().manual_seed(index))
        args = op_args(name, 10, torch.Generator().manual_seed(index), 48, 64)
        torch.testing.assert_close(drawn, apply_op(image, name, args), rtol=0, atol=0)


def test_cutout_centre_covers_the_image() -> None:
    generator = torch.Generator().manual_seed(0)
    centres = np.array([op_args("Cutout", 5, generator, 48, 64)[1:] for _ in range(4000)])
    assert centres[:, 0].min() == 0 and centres[:, 0].max() == 47
    assert centres[:, 1].min() == 0 and centres[:, 1].max() == 63


@pytest.mark.parametrize("name", RANDAUGMENT_OPS)
def test_every_op_changes_the_image_at_level_10(name: str) -> None:
    out = randaugment_op(_input(), name, 10, torch.Generator().manual_seed(0))
    assert out.shape == _input().shape and out.dtype == torch.uint8
    assert not torch.equal(out, _input())


def test_op_frequencies_uniform_over_sixteen(monkeypatch: pytest.MonkeyPatch) -> None:
    drawn: list[tuple[str, float]] = []

    def record(image: torch.Tensor, name: str, level: float, generator: torch.Generator):
        drawn.append((name, level))
        return image

    monkeypatch.setattr(ra, "randaugment_op", record)
    augment, generator, image = DMRandAugment(4, 15), torch.Generator().manual_seed(0), _input()
    for call in range(4000):
        augment(image, generator)
        assert len(drawn) == 4 * (call + 1)  # every layer applies an op: no identity, no skip
    assert {level for _, level in drawn} == {15.0}  # DM: random_magnitude = float(magnitude)
    counts = np.array([sum(name == op for name, _ in drawn) for op in RANDAUGMENT_OPS])
    assert counts.sum() == 16_000
    # Each count within 150 of 1000 (about 4.9 sigma, sigma = sqrt(16000 / 16 * 15 / 16) = 30.6),
    # and chi-square (15 degrees of freedom) below 37.70, its 0.001 upper quantile.
    assert np.abs(counts - 1000).max() <= 150, counts
    assert ((counts - 1000) ** 2 / 1000).sum() < 37.70, counts


def test_dm_randaugment_always_changes_the_image() -> None:
    augment, image = DMRandAugment(1, 10), _input()
    for seed in range(64):
        assert not torch.equal(augment(image, torch.Generator().manual_seed(seed)), image)


def test_dm_randaugment_is_seeded() -> None:
    augment, image = DMRandAugment(2, 9), _input()
    first = augment(image, torch.Generator().manual_seed(3))
    torch.testing.assert_close(first, augment(image, torch.Generator().manual_seed(3)))
    assert torch.equal(DMRandAugment(0, 9)(image, torch.Generator()), image)
    assert repr(augment) == "DMRandAugment(num_layers=2, magnitude=9)"


@pytest.mark.parametrize("size", [(48, 64), (31, 57), (192, 192)])
def test_cached_tables_and_maps_give_the_ops_own_result(size: tuple[int, int]) -> None:
    # Pixel ops run once on the 256 grey levels, geometric ops once on an image of pixel
    # indices; applied to an image, the cached result must be the op's own, pixel for pixel.
    generator = torch.Generator().manual_seed(size[0])
    image = torch.randint(0, 256, (3, *size), dtype=torch.uint8, generator=generator)
    pixels = size[0] * size[1]
    for level in (3, 5, 10, 15):
        for name in sorted(ra._POINT_OPS):
            args = op_args(name, level, generator, *size)
            torch.testing.assert_close(
                apply_op(image, name, args), ra._point_op(image, name, args, pixels), rtol=0, atol=0
            )
        for name in sorted(ra._GEOMETRIC_OPS):
            (arg,) = op_args(name, level, generator, *size)
            direct = ra._geometric_op(image, name, arg, [float(v) for v in ra.FILL])
            torch.testing.assert_close(apply_op(image, name, (arg,)), direct, rtol=0, atol=0)
