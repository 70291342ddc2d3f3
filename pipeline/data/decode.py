"""Image decoding: bytes -> RGB uint8 tensor, whatever the stored mode (L, RGBA, P, 16-bit)."""

from __future__ import annotations

import io
import warnings

import numpy as np
import torch
from PIL import Image

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")

# PIL refuses images above ~179 Mpx as a decompression-bomb guard; a 16k x 16k photo is the
# largest we accept from a shard.
MAX_PIXELS = 16384 * 16384


class CorruptImage(ValueError):
    """The bytes of a sample's image cannot be decoded."""


def to_rgb(image: Image.Image) -> Image.Image:
    """``image`` as 8-bit RGB: 16/32-bit gray rescaled, transparency composited on black."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # PIL's own I->L conversion clips at 255; 16-bit scans span 0..65535 and must be rescaled.
        wide = np.asarray(image, dtype=np.float64)
        eight = np.clip(np.rint(wide / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(eight, "L").convert("RGB")
    if image.mode == "F":
        eight = np.clip(np.rint(np.asarray(image, dtype=np.float64)), 0, 255).astype(np.uint8)
        return Image.fromarray(eight, "L").convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(black, rgba).convert("RGB")
    return image.convert("RGB")


def image_bytes(sample: dict) -> bytes | None:
    """The encoded image of a webdataset sample (first of jpg/jpeg/png/webp), or None."""
    for key in IMAGE_KEYS:
        if key in sample:
            return sample[key]
    return None


def _open(data: bytes) -> Image.Image:
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        image = Image.open(io.BytesIO(data))
    if image.width * image.height > MAX_PIXELS:
        raise CorruptImage(f"image of {image.width}x{image.height} pixels is too large")
    return image


def check_image(data: bytes) -> torch.Tensor:
    """Decode ``data`` cheaply (JPEGs at 1/8 scale) to RGB uint8 (3, h, w), or CorruptImage.

    libjpeg still walks every entropy-coded block at 1/8 scale, so truncation and broken
    headers are caught exactly as a full decode would catch them, at a fraction of the cost.
    """
    try:
        image = _open(data)
        if image.format == "JPEG":
            image.draft(image.mode, (1, 1))
        image.load()
        array = np.asarray(to_rgb(image))
    except Exception as exc:
        raise CorruptImage(f"{type(exc).__name__}: {exc}") from exc
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


def decode_rgb(data: bytes) -> torch.Tensor:
    """Decode ``data`` to an RGB uint8 tensor of shape (3, H, W); CorruptImage if it can't."""
    try:
        image = _open(data)
        image.load()
        rgb = to_rgb(image)
        array = np.asarray(rgb)
    except Exception as exc:
        raise CorruptImage(f"{type(exc).__name__}: {exc}") from exc
    return torch.from_numpy(array.copy()).permute(2, 0, 1)
