"""Sharded image datasets on object storage: sources, shard writer, streaming loaders, transforms.

``pipeline.data.streams`` states the determinism and resume contract of the loaders;
``loader.skipped()`` is how the skip counts of its workers reach the trainer. The package imports
nothing itself: ``pipeline.data.storage`` (fsspec alone) stays light for processes that only move
bytes, such as the checkpoint upload's.
"""
