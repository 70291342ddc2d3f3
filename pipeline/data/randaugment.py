"""RandAugment exactly as DeepMind's NFNet code: the 16 ops, their level rules, grey fill.

Reference: google-deepmind/deepmind-research ``nfnets/autoaugment.py`` (``distort_image_with_
randaugment``, ``level_to_arg``, the op functions) and ``nfnets/dataset.py`` (``_augment_image``),
read at commit f5de0ede8430809180254ee957abf36ed62579ef. Citations below are "DM <file>: <name>".

Images are uint8 CHW tensors. torchvision v2 functional ops are used where one computes the same
thing as DM's TF op; the rest is written here, each with the reason:

* Color: DM's grey image is ``tf.image.rgb_to_grayscale``, which rounds as ``trunc(y/255 * 255.5)``
  where torchvision floors ``y``: the grey target can differ by 1, which the factor-2.8 blend at
  level 15 amplifies to 2 levels.
* Contrast: DM's "mean" is ``sum(histogram) / 256`` = ``H*W / 256`` (the pixel count, not the mean
  grey value), clipped to 255 — 196 for every 224x224 image. torchvision blends towards the mean
  grey value instead.
* Sharpness: DM truncates the smoothed image to uint8 where torchvision rounds it.
* Blend: DM's ``blend`` computes ``image1 + factor * (image2 - image1)`` in float32 and truncates;
  written the same way so that the three ops above agree to the last grey level.
* Solarize / Posterize at levels whose argument leaves uint8 (see ``_solarize``, ``_posterize``).
* SolarizeAdd and Cutout: torchvision has no such op.
* Shear: tie-breaking of nearest sampling (see ``_shear``).
* AutoContrast and Equalize: DM's per-channel rules, written on numpy for speed; AutoContrast then
  agrees with DM to the last grey level (torchvision's float order differs by 1 at some pixels).

Speed. The loader augments one image at a time, where torchvision's tensor kernels spend most of
their time on set-up. So most ops run once per (op, argument, image size) and are cached — a run
uses one level, so a loader worker computes each entry once — then applied with ``np.take``
(~0.1 ms on a 192 px image), with the op's own result pixel for pixel:

* pixel ops that map each grey level on its own (Invert, Posterize, Solarize, SolarizeAdd,
  Brightness, Contrast) run on the 256 grey levels: a lookup table;
* geometric ops (Rotate, Shear, Translate) run on an image of pixel indices (float32, exact below
  2^24 pixels) with fill -1: a gather map, in which -1 becomes a grey pixel.

Images are uint8 CHW tensors on the CPU.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as F

# DM autoaugment.py: distort_image_with_randaugment, available_ops (this order: it is the op that
# a layer's uniform draw indexes).
RANDAUGMENT_OPS: tuple[str, ...] = (
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
# DM autoaugment.py: _MAX_LEVEL = 10.
MAX_LEVEL = 10.0
# DM autoaugment.py: distort_image_with_randaugment, hparams cutout_const=40, translate_const=100.
CUTOUT_CONST = 40
TRANSLATE_CONST = 100
# DM autoaugment.py: distort_image_with_randaugment, replace_value = [128] * 3 (geometric fill and
# cutout; unwrap's docstring: empty pixels "grayed (set to 128)").
FILL = (128, 128, 128)
# DM autoaugment.py: solarize_add default threshold=128.
SOLARIZE_ADD_THRESHOLD = 128
# DM autoaugment.py: sharpness, "SMOOTH PIL Kernel" [[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13.
_SMOOTH = torch.tensor([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]]) / 13.0
# TF's tf.image.rgb_to_grayscale weights (called by DM autoaugment.py: color).
_GREY_WEIGHTS = (0.2989, 0.5870, 0.1140)
_NEAREST = InterpolationMode.NEAREST
_FILL_NP = np.asarray(FILL, dtype=np.uint8)[:, None]
# The 256 grey levels as a 1 x 1 x 256 image: what a pixel op's lookup table is computed from.
_GREY_LEVELS = torch.arange(256, dtype=torch.uint8).view(1, 1, 256)
_LEVELS_NP = np.arange(256, dtype=np.float32)
_POINT_OPS = frozenset({"Invert", "Posterize", "Solarize", "SolarizeAdd", "Brightness", "Contrast"})
_GEOMETRIC_OPS = frozenset({"Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY"})
_CACHE_SIZE = 256


def _check_name(name: str) -> None:
    if name not in RANDAUGMENT_OPS:
        raise ValueError(f"unknown RandAugment op {name!r}; DM's ops are {list(RANDAUGMENT_OPS)}")


def _random_sign(value: float, generator: torch.Generator) -> float:
    # DM autoaugment.py: _randomly_negate_tensor, negative with probability 1/2.
    return -value if torch.rand((), generator=generator).item() < 0.5 else value


def op_args(name: str, level: float, generator: torch.Generator, height: int, width: int) -> tuple:
    """DM's level -> argument rule for ``name`` (DM autoaugment.py: level_to_arg), plus the op's
    randomness drawn from ``generator``: the sign of Rotate/Shear/Translate, Cutout's centre."""
    _check_name(name)
    frac = level / MAX_LEVEL
    if name in ("AutoContrast", "Equalize", "Invert"):
        return ()
    if name == "Rotate":  # DM: _rotate_level_to_arg, 30 degrees at level 10, random sign.
        return (_random_sign(frac * 30.0, generator),)
    if name == "Posterize":  # DM: level_to_arg, int(level / 10 * 4) bits kept.
        return (int(frac * 4),)
    if name == "Solarize":  # DM: level_to_arg, threshold int(level / 10 * 256).
        return (int(frac * 256),)
    if name == "SolarizeAdd":  # DM: level_to_arg, addition int(level / 10 * 110).
        return (int(frac * 110),)
    if name in ("Color", "Contrast", "Brightness", "Sharpness"):
        return (frac * 1.8 + 0.1,)  # DM: _enhance_level_to_arg (1.0 = identity at level 5).
    if name in ("ShearX", "ShearY"):  # DM: _shear_level_to_arg, 0.3 at level 10, random sign.
        return (_random_sign(frac * 0.3, generator),)
    if name in ("TranslateX", "TranslateY"):  # DM: _translate_level_to_arg, random sign.
        return (_random_sign(frac * float(TRANSLATE_CONST), generator),)
    # Cutout. DM: level_to_arg, pad_size int(level / 10 * cutout_const); DM: cutout draws the
    # centre uniformly over rows [0, H) and columns [0, W), rows first.
    cy = int(torch.randint(0, height, (), generator=generator))
    cx = int(torch.randint(0, width, (), generator=generator))
    return (int(frac * CUTOUT_CONST), cy, cx)


def _blend(image1: torch.Tensor, image2: torch.Tensor, factor: float) -> torch.Tensor:
    # DM autoaugment.py: blend; float32 image1 + factor * (image2 - image1), clipped only when
    # extrapolating, then cast (truncation) to uint8.
    if factor == 0.0:
        return image1.clone()
    if factor == 1.0:
        return image2.clone()
    low = image1.to(torch.float32)
    out = low + (image2.to(torch.float32) - low) * factor
    if not 0.0 < factor < 1.0:
        out = out.clamp_(0.0, 255.0)
    return out.to(torch.uint8)


def _grey(image: torch.Tensor) -> torch.Tensor:
    # tf.image.rgb_to_grayscale on uint8 (DM autoaugment.py: color): x / 255 in float32, weighted
    # sum, then convert_image_dtype back: multiply by 255.5 and truncate.
    x = image.to(torch.float32) * (1.0 / 255.0)
    w0, w1, w2 = _GREY_WEIGHTS
    y = x[..., 0, :, :] * w0 + x[..., 1, :, :] * w1 + x[..., 2, :, :] * w2
    return (y * 255.5).to(torch.uint8).unsqueeze(-3).expand_as(image)


def _color(image: torch.Tensor, factor: float) -> torch.Tensor:
    return _blend(_grey(image), image, factor)  # DM autoaugment.py: color.


def _contrast(image: torch.Tensor, factor: float, pixels: int) -> torch.Tensor:
    # DM autoaugment.py: contrast; the grey "mean" is sum(256-bin histogram) / 256 = H*W / 256
    # (``pixels`` / 256, the size of the image being augmented), clipped to [0, 255] and truncated
    # to uint8.
    mean = min(float(torch.tensor(pixels, dtype=torch.float32) / 256.0), 255.0)
    return _blend(torch.full_like(image, int(mean)), image, factor)


def _sharpness(image: torch.Tensor, factor: float) -> torch.Tensor:
    # DM autoaugment.py: sharpness; VALID depthwise 3x3 smoothing, clip, truncate to uint8, border
    # pixels from the original, then blend(smoothed, image, factor).
    if factor == 1.0:
        return image.clone()
    # Channels as a batch of one-channel images: the same sums as a depthwise (grouped)
    # convolution, 4x faster on the CPU.
    kernel = _SMOOTH.to(image.device).view(1, 1, 3, 3)
    smooth = torch.nn.functional.conv2d(image.to(torch.float32).unsqueeze(-3), kernel)
    degenerate = image.clone()
    degenerate[..., 1:-1, 1:-1] = smooth.squeeze(-3).clamp_(0.0, 255.0).to(torch.uint8)
    return _blend(degenerate, image, factor)


def _posterize(image: torch.Tensor, bits: int) -> torch.Tensor:
    # DM autoaugment.py: posterize shifts by 8 - bits with tf.bitwise; TF clamps a shift to
    # [0, 7], so bits <= 0 (level < 2.5) keeps 1 bit and bits >= 8 keeps all.
    return F.posterize(image, min(max(bits, 1), 8))


def _solarize(image: torch.Tensor, threshold: int) -> torch.Tensor:
    # DM autoaugment.py: solarize, where(image < threshold, image, 255 - image) on uint8: TF casts
    # the threshold to uint8, i.e. modulo 256, so level 10 (256 -> 0) inverts every pixel and
    # level 15 (384 -> 128) equals level 5. Verified on TF 2.15 eager, tf.function and tf.data.
    return F.solarize(image, threshold % 256)


def _solarize_add(image: torch.Tensor, addition: int) -> torch.Tensor:
    # DM autoaugment.py: solarize_add; add (int64 in DM, int32 here), clip to [0, 255], only
    # where image < 128.
    added = (image.to(torch.int32) + addition).clamp_(0, 255).to(torch.uint8)
    return torch.where(image < SOLARIZE_ADD_THRESHOLD, added, image)


def _round_half_away(value: torch.Tensor) -> torch.Tensor:
    # std::round (halves away from zero), as TF's nearest sampling; torch.round rounds to even.
    whole = value.trunc()
    return torch.where((value - whole).abs() == 0.5, whole + value.sign(), value.round())


def _transform_nearest(
    image: torch.Tensor, coeffs: tuple[float, ...], fill: list[float]
) -> torch.Tensor:
    # tfa image.transform (TF ImageProjectiveTransformV3, NEAREST, fill 0) then DM autoaugment.py:
    # unwrap: output pixel (x, y) reads input (a0 x + a1 y + a2, b0 x + b1 y + b2), computed in
    # float32 on pixel indices and rounded with std::round; a source outside the image gives fill.
    height, width = image.shape[-2:]
    a0, a1, a2, b0, b1, b2 = torch.tensor(coeffs, dtype=torch.float32, device=image.device)
    y = torch.arange(height, dtype=torch.float32, device=image.device).view(-1, 1)
    x = torch.arange(width, dtype=torch.float32, device=image.device).view(1, -1)
    xi = _round_half_away(a0 * x + a1 * y + a2).long()
    yi = _round_half_away(b0 * x + b1 * y + b2).long()
    inside = (xi >= 0) & (xi < width) & (yi >= 0) & (yi < height)
    out = image[..., yi.clamp(0, height - 1), xi.clamp(0, width - 1)]
    grey = torch.tensor(fill, dtype=image.dtype, device=image.device).view(-1, 1, 1)
    return torch.where(inside, out, grey)


def _shear(image: torch.Tensor, level: float, axis: int, fill: list[float]) -> torch.Tensor:
    # DM autoaugment.py: shear_x / shear_y, tfa transform [1, level, 0, 0, 1, 0, 0, 0] (shear_y:
    # [1, 0, 0, level, 1, 0, 0, 0]), i.e. about pixel (0, 0). Written by hand: at DM's levels
    # level * y lands exactly on a half pixel for whole rows (0.15 * 10 = 1.5), and torchvision's
    # affine breaks those ties to even after a normalise/unnormalise round trip, moving 1-4% of
    # the pixels by one; TF breaks them away from zero, as _transform_nearest does.
    if axis == 0:
        return _transform_nearest(image, (1.0, level, 0.0, 0.0, 1.0, 0.0), fill)
    return _transform_nearest(image, (1.0, 0.0, 0.0, level, 1.0, 0.0), fill)


def _translate(image: torch.Tensor, pixels: float, axis: int, fill: list[float]) -> torch.Tensor:
    # DM autoaugment.py: translate_x / translate_y, tfa translate by -pixels (content moves left /
    # up for pixels > 0), nearest, grey where nothing maps.
    shift = [-pixels, 0.0] if axis == 0 else [0.0, -pixels]
    return F.affine(image, 0.0, shift, 1.0, [0.0, 0.0], interpolation=_NEAREST, fill=fill)


def _cutout(image: torch.Tensor, pad_size: int, cy: int, cx: int) -> torch.Tensor:
    # DM autoaugment.py: cutout; grey square rows [cy - pad, cy + pad), columns [cx - pad,
    # cx + pad), clipped to the image.
    height, width = image.shape[-2:]
    out = image.clone()
    top, left = max(0, cy - pad_size), max(0, cx - pad_size)
    bottom, right = min(height, cy + pad_size), min(width, cx + pad_size)
    if bottom > top and right > left:
        fill = torch.tensor(FILL, dtype=image.dtype, device=image.device)
        out[..., top:bottom, left:right] = fill.view(-1, 1, 1)
    return out


def _autocontrast(image: torch.Tensor) -> torch.Tensor:
    # DM autoaugment.py: autocontrast, per channel: lo, hi = min, max as float32; where hi > lo,
    # trunc(clip(x * (255 / (hi - lo)) - lo * scale, 0, 255)) in float32, else unchanged.
    pixels = image.numpy().reshape(image.shape[-3], -1)
    out = np.empty_like(pixels)
    for channel, values in enumerate(pixels):
        low, high = np.float32(values.min()), np.float32(values.max())
        if high > low:
            scale = np.float32(255.0) / (high - low)
            table = np.clip(_LEVELS_NP * scale + (-low * scale), 0, 255).astype(np.uint8)
            out[channel] = np.take(table, values)
        else:
            out[channel] = values
    return torch.from_numpy(out.reshape(image.shape))


def _equalize(image: torch.Tensor) -> torch.Tensor:
    # DM autoaugment.py: equalize (PIL's rule), per channel: step = (pixels - count of the last
    # occupied level) // 255; unchanged where step is 0, else the table (cumsum + step // 2) //
    # step shifted right by one level (0 first), clipped to [0, 255].
    pixels = image.numpy().reshape(image.shape[-3], -1)
    out = np.empty_like(pixels)
    for channel, values in enumerate(pixels):
        histogram = np.bincount(values, minlength=256)
        occupied = histogram[histogram != 0]
        step = (int(occupied.sum()) - int(occupied[-1])) // 255
        if step == 0:
            out[channel] = values
            continue
        shifted = (np.cumsum(histogram) + step // 2) // step
        table = np.concatenate([[0], shifted[:-1]]).clip(0, 255).astype(np.uint8)
        out[channel] = np.take(table, values)
    return torch.from_numpy(out.reshape(image.shape))


def _point_op(image: torch.Tensor, name: str, args: tuple, pixels: int) -> torch.Tensor:
    """A pixel op of ``_POINT_OPS`` on ``image``, for an augmented image of ``pixels`` pixels."""
    if name == "Invert":
        return F.invert(image)  # DM autoaugment.py: invert, 255 - image.
    if name == "Posterize":
        return _posterize(image, args[0])
    if name == "Solarize":
        return _solarize(image, args[0])
    if name == "SolarizeAdd":
        return _solarize_add(image, args[0])
    if name == "Brightness":
        # DM autoaugment.py: brightness = blend(zeros, image, factor) = trunc(clip(factor * image)),
        # which is torchvision's adjust_brightness on uint8.
        return F.adjust_brightness(image, args[0])
    return _contrast(image, args[0], pixels)


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _level_table(name: str, args: tuple, pixels: int) -> np.ndarray:
    """The 256-entry lookup table of a pixel op (the op applied to every grey level)."""
    return _point_op(_GREY_LEVELS, name, args, pixels).flatten().numpy()


def _geometric_op(image: torch.Tensor, name: str, arg: float, fill: list[float]) -> torch.Tensor:
    """A geometric op of ``_GEOMETRIC_OPS`` on ``image``, filling uncovered pixels with ``fill``."""
    if name == "Rotate":
        # DM autoaugment.py: rotate, tfa rotate (counter-clockwise for positive angles, about the
        # image centre, nearest), grey fill. Differs from TF only where a source coordinate is an
        # exact half pixel (torchvision rounds to even, TF away from zero): rare for rotations
        # (45 degrees at level 15 is one), and TF's own eager and graph modes disagree there.
        return F.rotate(image, arg, interpolation=_NEAREST, fill=fill)
    if name in ("ShearX", "ShearY"):
        return _shear(image, arg, 0 if name == "ShearX" else 1, fill)
    return _translate(image, arg, 0 if name == "TranslateX" else 1, fill)


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _gather_map(name: str, arg: float, height: int, width: int) -> np.ndarray:
    """The flat source index of each output pixel; ``height * width`` (one past the image, where
    ``_gathered`` puts the fill) for the pixels that get the fill."""
    positions = torch.arange(height * width, dtype=torch.float32).view(1, height, width)
    source = _geometric_op(positions, name, arg, [-1.0]).flatten().to(torch.int64).numpy()
    return np.where(source < 0, height * width, source)


def _gathered(image: torch.Tensor, name: str, arg: float) -> torch.Tensor:
    height, width = image.shape[-2:]
    pixels = image.numpy().reshape(image.shape[-3], -1)
    source = np.concatenate([pixels, _FILL_NP], axis=1)
    out = np.take(source, _gather_map(name, float(arg), height, width), axis=1)
    return torch.from_numpy(out.reshape(image.shape))


def apply_op(image: torch.Tensor, name: str, args: tuple) -> torch.Tensor:
    """Apply DM's op ``name`` with explicit arguments (as returned by ``op_args``)."""
    _check_name(name)
    if name in _POINT_OPS:
        table = _level_table(name, tuple(args), image.shape[-2] * image.shape[-1])
        return torch.from_numpy(np.take(table, image.numpy()))
    if name in _GEOMETRIC_OPS:
        return _gathered(image, name, args[0])
    if name == "AutoContrast":
        return _autocontrast(image)
    if name == "Equalize":
        return _equalize(image)
    if name == "Color":
        return _color(image, args[0])
    if name == "Sharpness":
        return _sharpness(image, args[0])
    return _cutout(image, *args)


def randaugment_op(
    image: torch.Tensor, name: str, level: float, generator: torch.Generator
) -> torch.Tensor:
    """Apply one of DM's RandAugment ops at ``level`` to a uint8 CHW image (always applied)."""
    height, width = image.shape[-2:]
    return apply_op(image, name, op_args(name, level, generator, height, width))


class DMRandAugment:
    """DM autoaugment.py: distort_image_with_randaugment on a uint8 CHW image.

    Each of ``num_layers`` layers draws one of the 16 ops uniformly (no identity; the drawn op is
    always applied) and applies it at level ``magnitude``: DM's ``random_magnitude =
    float(magnitude)`` adds no randomness to the level. DM's per-op ``prob`` draw is unused by
    RandAugment (no op takes a ``prob`` argument), so it is not drawn here.
    """

    def __init__(self, num_layers: int, magnitude: float) -> None:
        if num_layers < 0:
            raise ValueError(f"num_layers must be >= 0, got {num_layers}")
        self.num_layers, self.magnitude = num_layers, float(magnitude)

    def __call__(self, image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        for _ in range(self.num_layers):
            index = int(torch.randint(0, len(RANDAUGMENT_OPS), (), generator=generator))
            image = randaugment_op(image, RANDAUGMENT_OPS[index], self.magnitude, generator)
        return image

    def __repr__(self) -> str:
        return f"DMRandAugment(num_layers={self.num_layers}, magnitude={self.magnitude:g})"
