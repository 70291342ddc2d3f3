"""ImageFolder trees on any fsspec URL, ImageNet's layout included.

Two layouts, told apart by the tree itself:

- class folders: ``ROOT/<class>/.../<image>``; one split (the writer carves the validation split);
- ImageNet: ``ROOT/train/<synset>/<image>`` and ``ROOT/val/`` (or ``validation/``), the validation
  images either in class folders too or flat with a labels file (``--val-labels``).

Classes are the sorted names of the class folders (for ImageNet: the sorted synsets, which is the
class order of torchvision's ImageFolder and of timm), and the names are kept as the shard set's
class names. The tree is listed once; a shard's samples are read file by file with a few reads
running ahead in threads, so object-store latency overlaps the decoding.
"""

from __future__ import annotations

import logging
import posixpath
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from pipeline.data.info import TRAIN_SPLIT, VALIDATION_SPLIT
from pipeline.data.sources import IMAGE_SUFFIXES, RawSample, SourceError
from pipeline.data.storage import find_files, join_url, read_ahead, read_bytes

# Files in flight per shard being written: 32 reads of ~20 ms each (an object store's latency)
# deliver ~1,600 files/s, more than one core decodes (~1,000/s), in ~32 x 110 KB of memory.
READ_AHEAD = 32
TRAIN_DIR, VALIDATION_DIRS = "train", ("val", "validation")
_KAGGLE_HEADER = "imageid"  # Kaggle's LOC_val_solution.csv starts with "ImageId,PredictionString"

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FilesPart:
    """Some samples of a folder source: ``(index, relative path, label)``, read in this order."""

    root: str
    entries: tuple[tuple[int, str, int], ...]
    storage_options: dict | None = None

    def __iter__(self) -> Iterator[RawSample]:
        def fetch(entry: tuple[int, str, int]) -> bytes:
            return read_bytes(join_url(self.root, entry[1]), self.storage_options)

        contents = read_ahead(fetch, self.entries, READ_AHEAD)
        for (index, path, label), data in zip(self.entries, contents, strict=True):
            yield index, path, data, label


@dataclass
class FolderSource:
    """Images in class folders on any fsspec URL, by split; relative paths sorted."""

    url: str
    name: str
    class_names: list[str]
    files: dict[str, list[tuple[str, int]]] = field(default_factory=dict)
    storage_options: dict | None = None
    layout: str = "classes"
    val_labels: str | None = None

    def __len__(self) -> int:
        return sum(len(files) for files in self.files.values())

    def _entry(self, index: int) -> tuple[str, int]:
        for files in self.files.values():
            if index < len(files):
                return files[index]
            index -= len(files)
        raise IndexError(index)

    def sample(self, index: int) -> tuple[bytes, int]:
        """``(image bytes as stored, label)`` of sample ``index`` (splits in order)."""
        path, label = self._entry(index)
        return read_bytes(join_url(self.url, path), self.storage_options), label

    def split_sizes(self) -> dict[str, int]:
        """Samples per split the tree holds."""
        return {split: len(files) for split, files in self.files.items()}

    def order(self, split: str, rng: np.random.Generator) -> np.ndarray:
        """A seeded permutation: the tree is sorted by class, shards must mix classes."""
        return rng.permutation(len(self.files[split]))

    def part(self, split: str, indices: Sequence[int]) -> FilesPart:
        """The samples ``indices`` of ``split``, small enough to send to a worker."""
        files = self.files[split]
        entries = tuple((int(i), *files[int(i)]) for i in indices)
        return FilesPart(self.url, entries, self.storage_options)

    def describe(self) -> dict:
        """What identifies this source's content (for the writer's resume check)."""
        return {
            "source": "imagefolder",
            "url": self.url,
            "layout": self.layout,
            "num_samples": self.split_sizes(),
            "val_labels": self.val_labels,
        }


def _is_image(path: str) -> bool:
    return path.lower().endswith(IMAGE_SUFFIXES)


def _stem(path: str) -> str:
    return posixpath.splitext(posixpath.basename(path))[0]


def _imagenet_layout(paths: list[str]) -> bool:
    """Whether every image lies under ``train/<class>/`` or a validation folder."""
    tops = {path.split("/", 1)[0] for path in paths if "/" in path}
    in_classes = any(p.startswith(f"{TRAIN_DIR}/") and p.count("/") >= 2 for p in paths)
    return in_classes and tops <= {TRAIN_DIR, *VALIDATION_DIRS, "test"}


def _class_files(
    paths: list[str], depth: int, classes: dict[str, int], url: str
) -> list[tuple[str, int]]:
    """``(path, label)`` of images whose class is path component ``depth``."""
    files = []
    for path in paths:
        parts = path.split("/")
        if len(parts) <= depth + 1:
            continue  # an image beside the class folders belongs to no class
        if parts[depth] not in classes:
            folder = "/".join(parts[: depth + 1])
            raise SourceError(f"{join_url(url, folder)}: not a class of the training split")
        files.append((path, classes[parts[depth]]))
    return files


def parse_val_labels(
    text: str, files: list[str], classes: dict[str, int], labels_url: str
) -> list[tuple[str, int]]:
    """Labels of flat validation ``files`` from a labels file, in one of the common formats.

    - ``<file> <synset>`` per line (or ``<file>,<synset> ...``, Kaggle's LOC_val_solution.csv);
    - ``<file> <index>``: a 0-based index in sorted-synset order (Caffe's val.txt);
    - ``<synset>`` per line: the labels of the files in sorted order.
    A line with only a number is refused: the devkit's ground truth counts ILSVRC ids, which do
    not follow the sorted synsets.
    """
    rows = [re.split(r"[,\s]+", line.strip()) for line in text.splitlines() if line.strip()]
    if rows and rows[0][0].lower() == _KAGGLE_HEADER:
        rows = rows[1:]

    def label(token: str, where: str) -> int:
        if token in classes:
            return classes[token]
        if token.isdigit() and int(token) < len(classes):
            return int(token)
        raise SourceError(f"{labels_url}: {where}: {token!r} is not a class of the training split")

    if rows and all(len(row) == 1 for row in rows):
        if any(row[0].isdigit() for row in rows):
            raise SourceError(
                f"{labels_url}: bare numbers per line are ambiguous (the devkit's ILSVRC ids are "
                "not the sorted-synset order); give '<file> <synset>' or one synset per line"
            )
        if len(rows) != len(files):
            raise SourceError(
                f"{labels_url}: {len(rows)} labels for {len(files)} validation images"
            )
        pairs = enumerate(zip(files, rows, strict=True))
        return [(path, label(row[0], f"line {n + 1}")) for n, (path, row) in pairs]
    by_stem = {_stem(row[0]): (row[1], n + 1) for n, row in enumerate(rows) if len(row) > 1}
    labelled = []
    for path in files:
        if _stem(path) not in by_stem:
            raise SourceError(f"{labels_url}: no label for {path}")
        token, line = by_stem[_stem(path)]
        labelled.append((path, label(token, f"line {line}")))
    return labelled


def _validation_files(
    url: str,
    paths: list[str],
    classes: dict[str, int],
    val_labels: str | None,
    storage_options: dict | None,
) -> list[tuple[str, int]]:
    folder = next((d for d in VALIDATION_DIRS if any(p.startswith(f"{d}/") for p in paths)), None)
    if folder is None:
        return []
    inside = [p for p in paths if p.startswith(f"{folder}/")]
    flat = [p for p in inside if p.count("/") == 1]
    if not flat:
        return _class_files(inside, 1, classes, url)
    if val_labels is None:
        raise SourceError(
            f"{join_url(url, folder)}: the validation images are not in class folders; "
            "give their labels file with --val-labels"
        )
    text = read_bytes(val_labels, storage_options).decode("utf-8", "replace")
    return parse_val_labels(text, flat, classes, val_labels)


def imagefolder(
    url: str,
    storage_options: dict | None = None,
    val_labels: str | None = None,
    paths: list[str] | None = None,
) -> FolderSource:
    """The image tree at ``url`` (any fsspec URL or a path) in either layout; ``paths``: its
    files relative to ``url`` when the caller listed them already."""
    url = url.rstrip("/")
    if paths is None:
        paths = find_files(url, storage_options)
    paths = [path for path in paths if _is_image(path)]
    if not paths:
        raise SourceError(f"source {url!r} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
    name = posixpath.basename(url.split("://", 1)[-1]) or "images"
    if _imagenet_layout(paths):
        names = sorted(
            {p.split("/")[1] for p in paths if p.startswith(f"{TRAIN_DIR}/") and p.count("/") >= 2}
        )
        classes = {synset: label for label, synset in enumerate(names)}
        train = [p for p in paths if p.startswith(f"{TRAIN_DIR}/")]
        files = {TRAIN_SPLIT: _class_files(train, 1, classes, url)}
        validation = _validation_files(url, paths, classes, val_labels, storage_options)
        if validation:
            files[VALIDATION_SPLIT] = validation
        layout = "imagenet"
    else:
        names = sorted({p.split("/", 1)[0] for p in paths if "/" in p})
        if not names:
            raise SourceError(f"source {url!r} has no class sub-folders")
        classes = {folder: label for label, folder in enumerate(names)}
        files = {TRAIN_SPLIT: _class_files(paths, 0, classes, url)}
        layout = "classes"
    log.info(
        f"{url}: {layout} layout, {len(names)} classes, {sum(map(len, files.values()))} images"
    )
    return FolderSource(url, name, names, files, storage_options, layout, val_labels)
