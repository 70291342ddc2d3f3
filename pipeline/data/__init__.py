"""Sharded image datasets on object storage: sources, shard writer, streaming loaders, transforms.

See ``pipeline.data.reader`` for the determinism / resume contract of the loaders and how the
skip counts reach the trainer (``loader.skipped()``).
"""

from pipeline.data.info import DatasetInfo, SplitInfo, read_info
from pipeline.data.reader import ShardLoader, make_eval_loader, make_train_loader
from pipeline.data.shardio import SKIP_REASONS
from pipeline.data.storage import StorageError
from pipeline.data.writer import write_shards

__all__ = [
    "SKIP_REASONS",
    "DatasetInfo",
    "ShardLoader",
    "SplitInfo",
    "StorageError",
    "make_eval_loader",
    "make_train_loader",
    "read_info",
    "write_shards",
]
