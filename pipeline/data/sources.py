"""Image sources for the shard writer: the protocol, procedural shapes, sklearn digits.

A source is random access: ``source.sample(i)`` returns ``(image_bytes, label)`` for index ``i``
without touching any other index, so the writer can skip complete shards on a re-run and the
output does not depend on the order in which samples are produced. The bytes are the image as
stored (any format PIL reads); the writer decides what to keep, resize or re-encode.

Sources with splits of their own, or that read cheaply only in runs (parquet files, tar shards),
also offer the split interface of ``SplitSource``: the sizes of their splits, the order in which
the writer should take each split's samples, and a small picklable ``part`` that reads the
samples of one output shard (what a Ray task receives). ``as_split_source`` gives any source
that interface.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np
from PIL import Image, ImageDraw

from pipeline.data.decode import to_rgb
from pipeline.data.info import TRAIN_SPLIT

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
JPEG_QUALITY = 90  # rendered and re-encoded images; high enough that artefacts don't dominate

# One sample as a part yields it: (index in its split, where it came from, image bytes, label).
RawSample = tuple[int, str, bytes, int]


class SourceError(ValueError):
    """A source cannot be built from what the user gave; the message names the path or name."""


@runtime_checkable
class Source(Protocol):
    """What the shard writer needs at least: random access to (image bytes, label)."""

    name: str
    class_names: list[str]

    def __len__(self) -> int: ...

    def sample(self, index: int) -> tuple[bytes, int]:
        """``(image_bytes, label)`` of sample ``index``."""
        ...

    def describe(self) -> dict:
        """What identifies the content (the writer refuses to resume with another)."""
        ...


@runtime_checkable
class SplitSource(Protocol):
    """A source with splits of its own, read one output shard's ``part`` at a time."""

    name: str
    class_names: list[str]

    def split_sizes(self) -> dict[str, int]:
        """Samples per split (``train``, and ``validation`` when the source has one)."""
        ...

    def order(self, split: str, rng: np.random.Generator) -> np.ndarray:
        """The order in which the writer takes the split's samples (cheap runs for the source)."""
        ...

    def part(self, split: str, indices: Sequence[int]) -> Iterable[RawSample]:
        """A small picklable iterable of the samples ``indices`` of ``split``, in that order."""
        ...

    def describe(self) -> dict:
        """What identifies the content (the writer refuses to resume with another)."""
        ...


@dataclass(frozen=True)
class SampledPart:
    """Samples of a random-access source, read one ``sample`` call at a time."""

    source: Source
    indices: tuple[int, ...]

    def __iter__(self) -> Iterator[RawSample]:
        for index in self.indices:
            data, label = self.source.sample(index)
            yield index, str(index), data, label


@dataclass(frozen=True)
class RandomAccessSplits:
    """A random-access source seen as a ``SplitSource``: one split, taken in a seeded order."""

    source: Source

    @property
    def name(self) -> str:
        """The source's name (the shards' file name prefix)."""
        return self.source.name

    @property
    def class_names(self) -> list[str]:
        """The source's class names."""
        return list(self.source.class_names)

    def split_sizes(self) -> dict[str, int]:
        """One split: every sample."""
        return {TRAIN_SPLIT: len(self.source)}

    def order(self, split: str, rng: np.random.Generator) -> np.ndarray:
        """A seeded permutation of the samples."""
        return rng.permutation(len(self.source))

    def part(self, split: str, indices: Sequence[int]) -> SampledPart:
        """The samples ``indices``; the whole source travels with them (it is small)."""
        return SampledPart(self.source, tuple(int(i) for i in indices))

    def describe(self) -> dict:
        """The source's own description."""
        return self.source.describe()


def as_split_source(source: Source | SplitSource) -> SplitSource:
    """``source`` itself when it has splits of its own, else a one-split view of it."""
    return source if isinstance(source, SplitSource) else RandomAccessSplits(source)


def encode_jpeg(image: Image.Image, quality: int = JPEG_QUALITY) -> bytes:
    """JPEG bytes of ``image`` (grayscale kept grayscale, everything else as RGB)."""
    if image.mode not in ("L", "RGB"):
        image = to_rgb(image)
    buffer = io.BytesIO()
    # Baseline, no optimize pass: the bytes must be identical on every run for the same pixels.
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


SHAPE_KINDS = (
    "circle",
    "square",
    "triangle",
    "diamond",
    "pentagon",
    "hexagon",
    "star",
    "cross",
    "ring",
    "ellipse",
)
TEXTURES = ("solid", "stripes", "checker", "dots")


def _polygon(sides: int, centre: tuple[float, float], radius: float, turn: float) -> list:
    cx, cy = centre
    return [
        (
            cx + radius * math.cos(turn + 2 * math.pi * k / sides),
            cy + radius * math.sin(turn + 2 * math.pi * k / sides),
        )
        for k in range(sides)
    ]


def _shape_mask(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """A boolean mask of one shape with random size, position and rotation."""
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    radius = size * rng.uniform(0.18, 0.38)
    cx, cy = (rng.uniform(radius, size - radius) for _ in range(2))
    turn = rng.uniform(0, 2 * math.pi)
    box = (cx - radius, cy - radius, cx + radius, cy + radius)
    if kind == "circle":
        draw.ellipse(box, fill=255)
    elif kind == "ring":
        draw.ellipse(box, fill=255)
        inner = radius * 0.55
        draw.ellipse((cx - inner, cy - inner, cx + inner, cy + inner), fill=0)
    elif kind == "ellipse":
        draw.ellipse((cx - radius, cy - radius * 0.5, cx + radius, cy + radius * 0.5), fill=255)
    elif kind == "star":
        points = []
        for k in range(10):
            r = radius if k % 2 == 0 else radius * 0.45
            angle = turn + math.pi * k / 5
            points.append((cx + r * math.cos(angle), cy + r * math.sin(angle)))
        draw.polygon(points, fill=255)
    elif kind == "cross":
        arm = radius * 0.3
        draw.rectangle((cx - radius, cy - arm, cx + radius, cy + arm), fill=255)
        draw.rectangle((cx - arm, cy - radius, cx + arm, cy + radius), fill=255)
    else:
        sides = {"square": 4, "triangle": 3, "diamond": 4, "pentagon": 5, "hexagon": 6}[kind]
        if kind == "diamond":
            draw.polygon(
                [
                    (cx, cy - radius),
                    (cx + radius * 0.6, cy),
                    (cx, cy + radius),
                    (cx - radius * 0.6, cy),
                ],
                fill=255,
            )
        else:
            draw.polygon(_polygon(sides, (cx, cy), radius, turn), fill=255)
    return np.asarray(mask) > 127


def _texture(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """A [0, 1] pattern that modulates the shape's colour."""
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    period = max(2.0, size * rng.uniform(0.06, 0.14))
    if kind == "solid":
        return np.ones((size, size), np.float32)
    if kind == "stripes":
        angle = rng.uniform(0, math.pi)
        phase = (xs * math.cos(angle) + ys * math.sin(angle)) / period
        return (np.floor(phase) % 2).astype(np.float32) * 0.7 + 0.3
    if kind == "checker":
        return ((np.floor(xs / period) + np.floor(ys / period)) % 2).astype(np.float32) * 0.7 + 0.3
    cell_x, cell_y = (xs % period) / period - 0.5, (ys % period) / period - 0.5
    return ((cell_x**2 + cell_y**2) < 0.09).astype(np.float32) * 0.7 + 0.3


def render_shape(label: int, resolution: int, seed: int, index: int) -> Image.Image:
    """Sample ``index`` of class ``label``: one textured shape on a noisy, shaded background."""
    rng = np.random.default_rng([seed, index])
    kind, texture = SHAPE_KINDS[label % len(SHAPE_KINDS)], TEXTURES[label // len(SHAPE_KINDS)]
    size = resolution
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) / size
    corner_colours = rng.uniform(0, 255, size=(2, 3))
    gradient = rng.uniform(0, 1, size=2)
    mix = np.clip(xs * gradient[0] + ys * gradient[1], 0, 1)[..., None]
    image = corner_colours[0] * (1 - mix) + corner_colours[1] * mix
    image += rng.normal(0, rng.uniform(4, 24), size=image.shape)
    colour = rng.uniform(0, 255, size=3)
    mask = _shape_mask(kind, size, rng)
    shaded = colour[None, None, :] * _texture(texture, size, rng)[..., None]
    image[mask] = shaded[mask]
    return Image.fromarray(np.clip(image, 0, 255).astype(np.uint8), "RGB")


@dataclass
class ShapesSource:
    """Procedural shapes: class = shape kind x texture; everything else drawn from (seed, index)."""

    num_samples: int
    resolution: int
    seed: int
    num_classes: int = 10
    name: str = "shapes"

    @property
    def class_names(self) -> list[str]:
        """``kind`` for solid shapes, ``kind-texture`` beyond the first ten classes."""
        names = []
        for label in range(self.num_classes):
            kind, texture = SHAPE_KINDS[label % 10], TEXTURES[label // 10]
            names.append(kind if texture == "solid" else f"{kind}-{texture}")
        return names

    def __len__(self) -> int:
        return self.num_samples

    def sample(self, index: int) -> tuple[bytes, int]:
        """``(jpeg_bytes, label)`` of sample ``index``; classes are balanced (label = i mod C)."""
        label = index % self.num_classes
        return encode_jpeg(render_shape(label, self.resolution, self.seed, index)), label

    def describe(self) -> dict:
        """What identifies this source's content (for the writer's resume check)."""
        return {
            "source": "shapes",
            "num_samples": self.num_samples,
            "resolution": self.resolution,
            "seed": self.seed,
            "num_classes": self.num_classes,
        }


def shapes(num_samples: int, resolution: int, seed: int, num_classes: int = 10) -> ShapesSource:
    """The procedural shapes dataset (deterministic from ``seed``), the embedded default."""
    max_classes = len(SHAPE_KINDS) * len(TEXTURES)
    if not 2 <= num_classes <= max_classes:
        raise SourceError(f"shapes: num_classes must be in 2..{max_classes}, got {num_classes}")
    if num_samples < 1 or resolution < 8:
        raise SourceError(
            f"shapes: need num_samples >= 1 and resolution >= 8, got {num_samples}, {resolution}"
        )
    return ShapesSource(num_samples, resolution, seed, num_classes)


@dataclass
class DigitsSource:
    """scikit-learn's bundled 8x8 scans of handwritten digits, upscaled (bicubic) and grayscale."""

    images: np.ndarray
    labels: np.ndarray
    resolution: int
    name: str = "digits"
    class_names: list[str] = field(default_factory=lambda: [str(d) for d in range(10)])

    def __len__(self) -> int:
        return len(self.labels)

    def sample(self, index: int) -> tuple[bytes, int]:
        """``(jpeg_bytes, label)`` of scan ``index``."""
        # sklearn stores 0..16 gray levels, 16 = ink: invert to dark ink on white paper.
        pixels = (255 - self.images[index] * (255.0 / 16.0)).round().astype(np.uint8)
        image = Image.fromarray(pixels, "L").resize(
            (self.resolution, self.resolution), Image.Resampling.BICUBIC
        )
        return encode_jpeg(image), int(self.labels[index])

    def describe(self) -> dict:
        """What identifies this source's content (for the writer's resume check)."""
        return {"source": "digits", "num_samples": len(self), "resolution": self.resolution}


def digits(resolution: int = 64, num_samples: int | None = None) -> DigitsSource:
    """The 1797 bundled sklearn digit scans (no download), or the first ``num_samples``."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    count = len(bunch.target) if num_samples is None else min(num_samples, len(bunch.target))
    return DigitsSource(bunch.images[:count], bunch.target[:count], resolution)
