"""``_info.json``: what a shard set holds, in the layout timm's webdataset reader reads.

```
{"name": "shapes", "num_classes": 10, "class_names": [...],
 "splits": {"train": {"name": "train", "num_samples": 900,
                      "filenames": ["shapes-train-000000.tar", ...], "shard_lengths": [256, ...]},
            "validation": {...}},
 "writer": {...parameters of the write...}}
```
File names are relative to the dataset URL, so a shard set can be copied between stores as is.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from pipeline.data.storage import StorageError, join_url, read_bytes

INFO_NAME = "_info.json"
TRAIN_SPLIT, VALIDATION_SPLIT = "train", "validation"  # the names timm's reader uses


@dataclass(frozen=True)
class SplitInfo:
    """One split: its shard URLs and how many samples each holds."""

    name: str
    shard_urls: tuple[str, ...]
    shard_lengths: tuple[int, ...]

    @property
    def num_samples(self) -> int:
        """Samples in the split."""
        return sum(self.shard_lengths)


@dataclass(frozen=True)
class DatasetInfo:
    """A shard set as described by its ``_info.json``."""

    url: str
    name: str
    num_classes: int
    class_names: tuple[str, ...]
    splits: dict[str, SplitInfo] = field(default_factory=dict)
    writer: dict = field(default_factory=dict)

    def split(self, name: str) -> SplitInfo:
        """The split called ``name``; ValueError listing the available ones otherwise."""
        if name not in self.splits:
            raise ValueError(f"{self.url}: no split {name!r} (available: {sorted(self.splits)})")
        return self.splits[name]


def shard_url(dataset_url: str, filename: str) -> str:
    """The URL of shard ``filename`` of the dataset at ``dataset_url``."""
    if dataset_url.startswith("pipe:"):
        # A pipe: dataset URL is a command template: {path} becomes the file's name.
        return dataset_url.replace("{path}", filename)
    return join_url(dataset_url, filename)


def info_to_json(info: DatasetInfo) -> bytes:
    """The ``_info.json`` bytes of ``info`` (stable key order, so writes are byte-identical)."""
    splits = {
        name: {
            "name": name,
            "num_samples": split.num_samples,
            "filenames": [url.rsplit("/", 1)[-1] for url in split.shard_urls],
            "shard_lengths": list(split.shard_lengths),
        }
        for name, split in info.splits.items()
    }
    document = {
        "name": info.name,
        "num_classes": info.num_classes,
        "class_names": list(info.class_names),
        "splits": splits,
        "writer": info.writer,
    }
    return (json.dumps(document, indent=1, sort_keys=True) + "\n").encode()


def parse_info(dataset_url: str, raw: bytes) -> DatasetInfo:
    """A DatasetInfo from ``_info.json`` bytes; StorageError naming the URL if malformed."""
    where = shard_url(dataset_url, INFO_NAME)
    try:
        document = json.loads(raw)
        splits = {}
        for name, split in document["splits"].items():
            filenames = [str(f) for f in split["filenames"]]
            if any("/" in f or f.startswith(".") or ":" in f for f in filenames):
                raise ValueError(f"split {name!r} names a shard outside the dataset: {filenames}")
            lengths = tuple(int(n) for n in split["shard_lengths"])
            if len(lengths) != len(filenames):
                raise ValueError(f"split {name!r}: {len(filenames)} files, {len(lengths)} lengths")
            urls = tuple(shard_url(dataset_url, f) for f in filenames)
            splits[name] = SplitInfo(name, urls, lengths)
        class_names = tuple(str(c) for c in document["class_names"])
        num_classes = int(document.get("num_classes", len(class_names)))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise StorageError(where, f"not a valid shard-set info file ({exc})") from exc
    return DatasetInfo(
        url=dataset_url,
        name=str(document.get("name", "")),
        num_classes=num_classes,
        class_names=class_names,
        splits=splits,
        writer=dict(document.get("writer", {})),
    )


def read_info(
    url: str, storage_options: dict | None = None, *, allow_pipe: bool = False
) -> DatasetInfo:
    """Read the ``_info.json`` at ``url``; StorageError naming the URL if it is absent."""
    url = url.rstrip("/")
    if url.startswith("pipe:"):
        if not allow_pipe:
            raise StorageError(url, "pipe: URLs run shell commands; pass allow_pipe=True to permit")
        from webdataset.gopen import gopen

        with gopen(shard_url(url, INFO_NAME), "rb") as stream:
            return parse_info(url, stream.read())
    try:
        raw = read_bytes(join_url(url, INFO_NAME), storage_options)
    except StorageError as exc:
        if exc.reason != "does not exist":
            raise
        hint = f"{exc.reason} (no shard set here: missing {INFO_NAME})"
        raise StorageError(exc.url, hint) from exc
    return parse_info(url, raw)
