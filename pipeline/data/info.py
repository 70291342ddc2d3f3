"""``_info.json``: what a shard set holds, in the layout timm's webdataset reader reads.

```
{"name": "shapes", "num_classes": 10, "class_names": [...],
 "splits": {"train": {"name": "train", "num_samples": 900,
                      "filenames": ["shapes-train-000000.tar", ...], "shard_lengths": [256, ...]},
            "validation": {...}},
 "corrupt": [{"split": "train", "source": "train/n01/x.JPEG", "reason": "..."}, ...],
 "writer": {...parameters of the write...}}
```
File names are relative to the dataset URL, so a shard set can be copied between stores as is.
An index of shards that live elsewhere (``pipeline.shards index --info-url``, for a bucket that
cannot be written) gives a split a ``base_url``: its file names are relative to that instead.

A brace pattern (``s3://b/train-{000000..001023}.tar``) also names a shard set: the one whose
``_info.json`` lies next to the shards and lists them, or, with the epoch size and class count
given, the train split those shards make.
"""

from __future__ import annotations

import json
import posixpath
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
    corrupt: tuple[dict, ...] = ()

    def split(self, name: str) -> SplitInfo:
        """The split called ``name``; ValueError listing the available ones otherwise."""
        if name not in self.splits:
            raise ValueError(f"{self.url}: no split {name!r} (available: {sorted(self.splits)})")
        return self.splits[name]


def is_pattern(url: str) -> bool:
    """Whether ``url`` is a brace pattern of shard URLs (``...-{000..099}.tar``)."""
    return "{" in url and "}" in url


def expand_pattern(pattern: str) -> list[str]:
    """The URLs a brace pattern names, in order (a plain URL names itself)."""
    import braceexpand  # deferred: webdataset's dependency, needed only for patterns

    return list(braceexpand.braceexpand(pattern))


def shard_url(dataset_url: str, filename: str) -> str:
    """The URL of shard ``filename`` of the dataset at ``dataset_url``."""
    if dataset_url.startswith("pipe:"):
        # A pipe: dataset URL is a command template: {path} becomes the file's name.
        return dataset_url.replace("{path}", filename)
    return join_url(dataset_url, filename)


def _folder(url: str) -> str:
    return url.rsplit("/", 1)[0]


def info_to_json(info: DatasetInfo) -> bytes:
    """The ``_info.json`` bytes of ``info`` (stable key order, so writes are byte-identical)."""
    splits = {}
    for name, split in info.splits.items():
        entry = {
            "name": name,
            "num_samples": split.num_samples,
            "filenames": [url.rsplit("/", 1)[-1] for url in split.shard_urls],
            "shard_lengths": list(split.shard_lengths),
        }
        folders = {_folder(url) for url in split.shard_urls}
        if folders and folders != {info.url.rstrip("/")}:
            if len(folders) > 1:
                raise ValueError(f"split {name!r}: shards in several folders {sorted(folders)}")
            entry["base_url"] = folders.pop()
        splits[name] = entry
    document = {
        "name": info.name,
        "num_classes": info.num_classes,
        "class_names": list(info.class_names),
        "splits": splits,
        "corrupt": list(info.corrupt),
        "writer": info.writer,
    }
    return (json.dumps(document, indent=1, sort_keys=True) + "\n").encode()


def _split_base(dataset_url: str, split: dict) -> str:
    base = split.get("base_url")
    if base is None:
        return dataset_url
    if not isinstance(base, str) or base.startswith("pipe:") or "{" in base:
        raise ValueError(f"base_url {base!r} is not a storage URL")
    return base


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
            base = _split_base(dataset_url, split)
            urls = tuple(shard_url(base, f) for f in filenames)
            splits[name] = SplitInfo(name, urls, lengths)
        class_names = tuple(str(c) for c in document["class_names"])
        num_classes = int(document.get("num_classes", len(class_names)))
        corrupt = tuple(dict(entry) for entry in document.get("corrupt", []))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise StorageError(where, f"not a valid shard-set info file ({exc})") from exc
    return DatasetInfo(
        url=dataset_url,
        name=str(document.get("name", "")),
        num_classes=num_classes,
        class_names=class_names,
        splits=splits,
        writer=dict(document.get("writer", {})),
        corrupt=corrupt,
    )


def pattern_info(
    pattern: str,
    storage_options: dict | None = None,
    *,
    num_samples: int | None = None,
    num_classes: int | None = None,
) -> DatasetInfo:
    """The shard set a brace pattern names (see the module docstring)."""
    urls = expand_pattern(pattern)
    folder = _folder(urls[0])
    try:
        info = read_info(folder, storage_options)
    except StorageError as exc:
        if exc.reason.split(" (", 1)[0] != "does not exist":
            raise
    else:
        listed = {url for split in info.splits.values() for url in split.shard_urls}
        if listed >= set(urls):
            return info
    if num_samples is None or num_classes is None:
        raise StorageError(
            pattern,
            f"no {INFO_NAME} next to these shards lists them: run `python -m pipeline.shards "
            "index` on the pattern, or give the epoch size and class count "
            "(data.train_samples, model.num_classes)",
        )
    # Without an index the shard lengths are estimates: the epoch size spread evenly.
    lengths = tuple(
        (num_samples * (k + 1)) // len(urls) - (num_samples * k) // len(urls)
        for k in range(len(urls))
    )
    return DatasetInfo(
        url=pattern,
        name=posixpath.basename(folder),
        num_classes=num_classes,
        class_names=tuple(str(c) for c in range(num_classes)),
        splits={TRAIN_SPLIT: SplitInfo(TRAIN_SPLIT, tuple(urls), lengths)},
        writer={"pattern": pattern},
    )


def read_info(
    url: str,
    storage_options: dict | None = None,
    *,
    allow_pipe: bool = False,
    num_samples: int | None = None,
    num_classes: int | None = None,
) -> DatasetInfo:
    """Read the ``_info.json`` at ``url``; StorageError naming the URL if it is absent.

    ``url`` may also be a brace pattern of shards (see ``pattern_info``, which takes
    ``num_samples`` and ``num_classes`` for shards no ``_info.json`` lists).
    """
    url = url.rstrip("/")
    if url.startswith("pipe:"):
        if not allow_pipe:
            raise StorageError(url, "pipe: URLs run shell commands; pass allow_pipe=True to permit")
        from webdataset.gopen import gopen

        with gopen(shard_url(url, INFO_NAME), "rb") as stream:
            return parse_info(url, stream.read())
    if is_pattern(url):
        return pattern_info(url, storage_options, num_samples=num_samples, num_classes=num_classes)
    try:
        raw = read_bytes(join_url(url, INFO_NAME), storage_options)
    except StorageError as exc:
        if exc.reason != "does not exist":
            raise
        hint = f"{exc.reason} (no shard set here: missing {INFO_NAME})"
        raise StorageError(exc.url, hint) from exc
    return parse_info(url, raw)
