"""Sharded image datasets on object storage: sources, shard writer, streaming loaders, transforms.

``pipeline.data.streams`` states the determinism and resume contract of the loaders;
``loader.skipped()`` is how the skip counts of its workers reach the trainer.

The names below are imported when first used: a command that needs only ``storage`` (every
driver's error handling) does not pay for torch and torchvision at start-up.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline.data.info import read_info
    from pipeline.data.reader import make_eval_loader, make_train_loader
    from pipeline.data.storage import StorageError
    from pipeline.data.writer import write_shards

_WHERE = {
    "StorageError": "pipeline.data.storage",
    "make_eval_loader": "pipeline.data.reader",
    "make_train_loader": "pipeline.data.reader",
    "read_info": "pipeline.data.info",
    "write_shards": "pipeline.data.writer",
}
__all__ = ["StorageError", "make_eval_loader", "make_train_loader", "read_info", "write_shards"]


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'pipeline.data' has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE[name]), name)
