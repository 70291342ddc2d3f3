"""One output shard: its samples verified, kept or resized, written locally, uploaded whole.

Each image is decoded in full once, by the decoder the training reader uses (``decode_rgb``
after ``check_image``), so an image that would fail at training time is left out here, counted
and listed with where it came from instead of becoming a blank training sample. A JPEG within
``max_side`` keeps its bytes (no re-encode, no quality loss); a larger image is resized once, its
longer side to ``max_side``, and encoded at ``quality``; other formats are encoded as JPEG.

``write_shard`` depends only on its job, so a shard's bytes are the same whichever process
writes it. After the upload, a small record of the shard (bytes, samples, corrupt images) goes
to ``_parts/<shard>.json``: a re-run keeps a shard only when its size and counts match it.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

import numpy as np
import webdataset as wds
from PIL import Image

from pipeline.data.decode import CorruptImage, check_image, decode_rgb
from pipeline.data.sources import JPEG_QUALITY, RawSample, encode_jpeg
from pipeline.data.storage import atomic_write_bytes, join_url, upload_file

PARTS_DIR = "_parts"  # per-shard records of a write in progress (not shards: no reader lists it)
RESIZE_FILTER = Image.Resampling.BICUBIC  # the filter the training recipe resizes with


@dataclass(frozen=True)
class ImageOptions:
    """What the writer stores: JPEGs within ``max_side`` as they are, the rest re-encoded."""

    max_side: int | None = None
    quality: int = JPEG_QUALITY

    def __post_init__(self) -> None:
        if self.max_side is not None and self.max_side < 8:
            raise ValueError(f"--max-side must be >= 8 pixels, got {self.max_side}")
        if not 1 <= self.quality <= 100:
            raise ValueError(f"--quality must be in 1..100, got {self.quality}")


def prepare_image(data: bytes, options: ImageOptions) -> bytes:
    """The JPEG bytes to store for ``data``; CorruptImage if it does not decode in full."""
    check_image(data)
    pixels = decode_rgb(data)
    height, width = pixels.shape[1:]
    fits = options.max_side is None or max(height, width) <= options.max_side
    if fits and data[:3] == b"\xff\xd8\xff":
        return data
    image = Image.fromarray(pixels.permute(1, 2, 0).numpy())
    if not fits:
        scale = options.max_side / max(height, width)
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        image = image.resize(size, RESIZE_FILTER)
    return encode_jpeg(image, options.quality)


@dataclass(frozen=True)
class ShardJob:
    """One output shard: its split, file name, and the samples it holds (their indices in the
    source's split ``source_split``, in the order they are written)."""

    split: str
    filename: str
    indices: np.ndarray
    source_split: str

    @property
    def planned(self) -> int:
        """Samples the shard is planned to hold, corrupt ones included."""
        return len(self.indices)


@dataclass
class ShardResult:
    """A written shard: its bytes, the samples in it and the corrupt images left out."""

    split: str
    filename: str
    samples: int
    bytes: int
    corrupt: list[dict] = field(default_factory=list)

    def to_json(self) -> bytes:
        """The record's bytes (stable key order)."""
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> ShardResult:
        """A record read back; ValueError if it is not one."""
        try:
            return cls(**json.loads(raw))
        except (TypeError, KeyError) as exc:
            raise ValueError(f"not a shard record: {exc}") from exc


def record_url(dest_url: str, filename: str) -> str:
    """Where the record of shard ``filename`` goes."""
    return join_url(dest_url, f"{PARTS_DIR}/{filename}.json")


def _tar_writer(stream) -> wds.TarWriter:
    # Fixed mtime and owner: the tar bytes then depend only on the samples.
    return wds.TarWriter(stream, user="", group="", mode=0o444, mtime=0, encoder=False)


def write_shard(
    job: ShardJob,
    samples: Iterable[RawSample],
    dest_url: str,
    options: ImageOptions,
    storage_options: dict | None = None,
) -> ShardResult:
    """Write ``samples`` as the shard ``job`` names: a local temporary file, then one upload."""
    corrupt, count = [], 0
    with tempfile.NamedTemporaryFile(prefix=".shard-", suffix=".tar") as local:
        with _tar_writer(local) as tar:
            for index, origin, data, label in samples:
                try:
                    stored = prepare_image(data, options)
                except CorruptImage as exc:
                    corrupt.append({"split": job.split, "source": origin, "reason": str(exc)})
                    continue
                tar.write({"__key__": f"{index:09d}", "jpg": stored, "cls": str(label).encode()})
                count += 1
        local.flush()
        size = os.path.getsize(local.name)
        upload_file(local.name, join_url(dest_url, job.filename), storage_options)
    result = ShardResult(job.split, job.filename, count, size, corrupt)
    atomic_write_bytes(record_url(dest_url, job.filename), result.to_json(), storage_options)
    return result
