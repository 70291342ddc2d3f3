"""Test images and shards: a source whose label is the sample's index, JPEG/PNG/tar builders."""

from __future__ import annotations

import io
import json

import numpy as np
import webdataset as wds
from PIL import Image

from pipeline.data.sources import encode_jpeg


class IndexedSource:
    """``num_samples`` small images whose label is their own index: labels identify samples."""

    name = "indexed"

    def __init__(self, num_samples: int, resolution: int = 32) -> None:
        self.num_samples, self.resolution = num_samples, resolution
        self.class_names = [str(i) for i in range(num_samples)]

    def __len__(self) -> int:
        return self.num_samples

    def sample(self, index: int) -> tuple[bytes, int]:
        """A noisy image seeded by ``index`` and label ``index``."""
        rng = np.random.default_rng(index)
        pixels = rng.integers(0, 256, size=(self.resolution, self.resolution, 3), dtype=np.uint8)
        return encode_jpeg(Image.fromarray(pixels, "RGB")), index

    def describe(self) -> dict:
        """Identity of the content."""
        return {"source": "indexed", "num_samples": self.num_samples}


def jpeg_bytes(seed: int, size: int = 32) -> bytes:
    """A valid JPEG of random pixels drawn from ``seed``."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    return encode_jpeg(Image.fromarray(pixels, "RGB"))


def png_bytes(image: Image.Image) -> bytes:
    """PNG bytes of ``image`` (keeps its mode)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def tar_bytes(samples: list[dict]) -> bytes:
    """A webdataset tar of ``samples`` (dicts with ``__key__`` and byte members)."""
    buffer = io.BytesIO()
    with wds.TarWriter(buffer, mtime=0, encoder=False) as tar:
        for sample in samples:
            tar.write(sample)
    return buffer.getvalue()


def write_info(directory, splits: dict[str, list[tuple[str, int]]], num_classes: int) -> None:
    """An ``_info.json`` for hand-made shards: ``splits = {name: [(filename, length), ...]}``."""
    document = {
        "name": "handmade",
        "num_classes": num_classes,
        "class_names": [str(i) for i in range(num_classes)],
        "splits": {
            name: {
                "name": name,
                "num_samples": sum(n for _, n in shards),
                "filenames": [f for f, _ in shards],
                "shard_lengths": [n for _, n in shards],
            }
            for name, shards in splits.items()
        },
    }
    (directory / "_info.json").write_text(json.dumps(document))


def without_segment(jpeg: bytes, marker: int) -> bytes:
    """``jpeg`` with every header segment of type ``marker`` (e.g. 0xDB, DQT) removed."""
    out, position = bytearray(jpeg[:2]), 2
    while jpeg[position + 1] != 0xDA:  # copy header segments up to the first scan
        end = position + 2 + int.from_bytes(jpeg[position + 2 : position + 4], "big")
        if jpeg[position + 1] != marker:
            out += jpeg[position:end]
        position = end
    return bytes(out + jpeg[position:])
