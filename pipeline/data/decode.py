"""Image decoding: bytes -> RGB uint8 tensor, whatever the stored mode (L, RGBA, P, 16-bit)."""

from __future__ import annotations

import io
import json
import warnings

import numpy as np
import torch
from PIL import Image

try:
    from torchvision.io import ImageReadMode, decode_jpeg

    _RGB = ImageReadMode.RGB
except ImportError:  # pragma: no cover - newer torchvision without image decoding
    decode_jpeg = None

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


LABEL_FIELDS = ("cls", "label", "class")  # integer class fields of a json member (img2dataset)


def sample_label(sample: dict) -> int | None:
    """A webdataset sample's class: its ``cls`` member, else an integer ``cls``, ``label`` or
    ``class`` field of its ``json`` member; None when it has none."""
    raw = sample.get("cls")
    if raw is not None:
        try:
            return int(raw.decode().strip())
        except (ValueError, UnicodeDecodeError):
            return None
    if "json" not in sample:
        return None
    try:
        document = json.loads(sample["json"])
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(document, dict):
        return None
    for key in LABEL_FIELDS:
        value = document.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def _open(data: bytes) -> Image.Image:
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        image = Image.open(io.BytesIO(data))
    if image.width * image.height > MAX_PIXELS:
        raise CorruptImage(f"image of {image.width}x{image.height} pixels is too large")
    return image


_SOF_MARKERS = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _jpeg_layout(data: bytes) -> tuple[int, int]:
    """(pixels of the frame, offset of the first scan's data): walks the segments after SOI."""
    position, pixels = 2, 0
    while position + 4 <= len(data):
        if data[position] != 0xFF:
            raise CorruptImage(f"no JPEG marker at byte {position}")
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
        elif marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7:  # markers without a length
            position += 2
        else:
            end = position + 2 + int.from_bytes(data[position + 2 : position + 4], "big")
            if marker in _SOF_MARKERS and end <= len(data):
                height = int.from_bytes(data[position + 5 : position + 7], "big")
                width = int.from_bytes(data[position + 7 : position + 9], "big")
                pixels = height * width
            elif marker == 0xDA:  # SOS: the scan data follows its header
                if not pixels:
                    raise CorruptImage("JPEG scan without a frame header")
                return pixels, end
            position = end
    raise CorruptImage("JPEG ends before its first scan")


def check_image(data: bytes) -> None:
    """Raise CorruptImage unless ``data`` looks decodable, without decoding JPEG pixels.

    JPEG: the segments must parse up to a scan of a non-empty frame, and an EOI marker must
    follow the scan, which catches truncation and broken headers at ~1/20 of a decode's cost
    (inside scan data 0xFF is always stuffed, so a later FF D9 can only be an EOI). Other
    formats are decoded in full.
    """
    if data[:3] == b"\xff\xd8\xff":
        pixels, scan = _jpeg_layout(data)
        if pixels > MAX_PIXELS:
            raise CorruptImage(f"JPEG of {pixels} pixels is too large")
        if data.rfind(b"\xff\xd9") < scan:
            raise CorruptImage("JPEG without an end-of-image marker (truncated?)")
        return
    try:
        image = _open(data)
        image.load()
        to_rgb(image)
    except Exception as exc:
        raise CorruptImage(f"{type(exc).__name__}: {exc}") from exc


def decode_rgb(data: bytes) -> torch.Tensor:
    """Decode ``data`` to an RGB uint8 tensor of shape (3, H, W); CorruptImage if it can't."""
    if decode_jpeg is not None and data[:3] == b"\xff\xd8\xff":
        try:
            # libjpeg-turbo straight into a tensor: ~25 % faster than PIL + a copy here.
            # torchvision 0.29 deprecates it for TorchCodec (not a dependency); it is pinned, and
            # PIL takes over if it ever disappears.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                encoded = torch.frombuffer(bytearray(data), dtype=torch.uint8)
                return decode_jpeg(encoded, mode=_RGB)
        except RuntimeError:
            pass  # unusual JPEG flavours (e.g. 12-bit): PIL below
    try:
        image = _open(data)
        image.load()
        array = np.asarray(to_rgb(image))
    except Exception as exc:
        raise CorruptImage(f"{type(exc).__name__}: {exc}") from exc
    return torch.from_numpy(array.copy()).permute(2, 0, 1)
