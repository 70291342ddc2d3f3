"""Sharded image datasets on object storage: sources, shard writer, streaming loaders, transforms.

``pipeline.data.streams`` states the determinism and resume contract of the loaders;
``loader.skipped()`` is how the skip counts of its workers reach the trainer.
"""

from pipeline.data.info import read_info
from pipeline.data.reader import make_eval_loader, make_train_loader
from pipeline.data.storage import StorageError
from pipeline.data.writer import write_shards

__all__ = [
    "StorageError",
    "make_eval_loader",
    "make_train_loader",
    "read_info",
    "write_shards",
]
