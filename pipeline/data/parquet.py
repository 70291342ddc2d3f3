"""Hugging Face ``datasets`` parquet files as a source, read with pyarrow (the Hub is never asked).

The Hub's layout of an image-classification set (``imagenet-1k`` among them): files
``data/<split>-00000-of-00042.parquet`` (or ``<split>/0000.parquet``) with a struct column
``image`` (``bytes``, ``path``) and an integer column ``label``; the class names are those of the
``ClassLabel`` feature in the ``huggingface`` entry of the schema's metadata. A ``test`` split
(labels -1) is not read.

Parquet is read by row group, so the writer takes each split in row groups drawn in a seeded
order, rows in file order inside each group: an output shard then mixes ~10 row groups from
anywhere in the set, and each of its reads is one row group.
"""

from __future__ import annotations

import json
import logging
import posixpath
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from pipeline.data.info import TRAIN_SPLIT, VALIDATION_SPLIT
from pipeline.data.sources import RawSample, SourceError
from pipeline.data.storage import call_with_retries, filesystem, find_files, join_url

SPLIT_NAMES = {"train": TRAIN_SPLIT, "validation": VALIDATION_SPLIT, "valid": VALIDATION_SPLIT}
SPLIT_NAMES["val"] = VALIDATION_SPLIT
HF_METADATA = b"huggingface"  # where ``datasets`` stores its features in the parquet schema

log = logging.getLogger(__name__)


def _parquet_file(url: str, storage_options: dict | None):
    import pyarrow.parquet as pq  # deferred: pyarrow is needed by parquet sources only

    fs, path = filesystem(url, storage_options)
    return call_with_retries(url, lambda: pq.ParquetFile(fs.open(path, "rb")))


@dataclass(frozen=True)
class ParquetPart:
    """Some rows of a split: ``(file URL, row group, ((index, row in group), ...))`` runs."""

    runs: tuple[tuple[str, int, tuple[tuple[int, int], ...]], ...]
    storage_options: dict | None = None

    def __iter__(self) -> Iterator[RawSample]:
        opened: tuple[str, object] | None = None
        for url, group, rows in self.runs:
            if opened is None or opened[0] != url:
                opened = (url, _parquet_file(url, self.storage_options))
            table = call_with_retries(
                url, lambda f=opened[1], g=group: f.read_row_group(g, columns=["image", "label"])
            )
            images = table.column("image").combine_chunks().field("bytes")
            labels = table.column("label")
            name = posixpath.basename(url)
            for index, row in rows:
                label = labels[row].as_py()
                yield (
                    index,
                    f"{name}#g{group}r{row}",
                    images[row].as_py(),
                    -1 if label is None else label,
                )


@dataclass
class ParquetSource:
    """Parquet files by split, with each file's row-group sizes (from the footers only)."""

    url: str
    name: str
    class_names: list[str]
    files: dict[str, list[tuple[str, tuple[int, ...]]]] = field(default_factory=dict)
    storage_options: dict | None = None

    def _groups(self, split: str) -> list[tuple[str, int, int, int]]:
        """``(file URL, row group, first index, rows)`` of the split's row groups, in order."""
        groups, start = [], 0
        for url, sizes in self.files[split]:
            for group, rows in enumerate(sizes):
                groups.append((url, group, start, rows))
                start += rows
        return groups

    def split_sizes(self) -> dict[str, int]:
        """Rows per split."""
        return {split: sum(sum(sizes) for _, sizes in files) for split, files in self.files.items()}

    def order(self, split: str, rng: np.random.Generator) -> np.ndarray:
        """Row groups in a seeded order, rows in file order inside each."""
        groups = self._groups(split)
        picked = [groups[i] for i in rng.permutation(len(groups))]
        return np.concatenate([np.arange(s, s + n) for _, _, s, n in picked] or [np.arange(0)])

    def part(self, split: str, indices: Sequence[int]) -> ParquetPart:
        """The rows ``indices`` of ``split``, as runs of one row group each."""
        groups = self._groups(split)
        starts = np.array([g[2] for g in groups])
        runs: list[tuple[str, int, list]] = []
        for index in (int(i) for i in indices):
            url, group, start, _ = groups[int(np.searchsorted(starts, index, side="right")) - 1]
            if not runs or runs[-1][:2] != (url, group):
                runs.append((url, group, []))
            runs[-1][2].append((index, index - start))
        return ParquetPart(tuple((u, g, tuple(rows)) for u, g, rows in runs), self.storage_options)

    def describe(self) -> dict:
        """What identifies this source's content (for the writer's resume check)."""
        return {"source": "parquet", "url": self.url, "num_samples": self.split_sizes()}


def _split_of(path: str) -> str | None:
    """The split a file of the Hub's layout belongs to (None: not read, e.g. ``test``)."""
    parent, name = posixpath.split(path)
    for candidate in (name.split("-", 1)[0].split(".", 1)[0], posixpath.basename(parent)):
        if candidate.lower() in SPLIT_NAMES:
            return SPLIT_NAMES[candidate.lower()]
    return None


def _class_names(schema, url: str) -> list[str] | None:
    metadata = schema.metadata or {}
    if HF_METADATA not in metadata:
        return None
    try:
        features = json.loads(metadata[HF_METADATA])["info"]["features"]
        return [str(n) for n in features["label"]["names"]]
    except (ValueError, KeyError, TypeError) as exc:
        log.warning(f"{url}: no class names in the huggingface metadata ({exc})")
        return None


def parquet_source(
    url: str, storage_options: dict | None = None, paths: list[str] | None = None
) -> ParquetSource:
    """The parquet files under ``url`` (a folder, or one file), split by the Hub's file names."""
    url = url.rstrip("/")
    if url.endswith(".parquet"):
        base, paths = url.rsplit("/", 1)[0], [url.rsplit("/", 1)[1]]
    else:
        base = url
        paths = paths if paths is not None else find_files(url, storage_options)
    files: dict[str, list] = {}
    names, max_label = None, -1
    for path in sorted(p for p in paths if p.endswith(".parquet")):
        split = _split_of(path) or (TRAIN_SPLIT if len(paths) == 1 else None)
        if split is None:
            continue
        file_url = join_url(base, path)
        parquet = _parquet_file(file_url, storage_options)
        schema = parquet.schema_arrow
        if "label" not in schema.names or "image" not in schema.names:
            raise SourceError(f"{file_url}: needs the columns 'image' (bytes) and 'label'")
        meta = parquet.metadata
        sizes = tuple(meta.row_group(g).num_rows for g in range(meta.num_row_groups))
        files.setdefault(split, []).append((file_url, sizes))
        names = names or _class_names(schema, file_url)
        if names is None:
            labels = parquet.read(columns=["label"]).column("label").to_numpy(zero_copy_only=False)
            max_label = max(max_label, int(labels.max()) if len(labels) else -1)
    if TRAIN_SPLIT not in files:
        raise SourceError(f"{url}: no parquet file of a train split (train-*.parquet)")
    class_names = names or [str(i) for i in range(max_label + 1)]
    name = posixpath.basename(base.split("://", 1)[-1]) or "parquet"
    source = ParquetSource(url, name, class_names, files, storage_options)
    log.info(f"{url}: parquet, {len(class_names)} classes, {source.split_sizes()} rows")
    return source
