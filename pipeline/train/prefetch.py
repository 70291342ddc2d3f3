"""What reaches the device for a step: its micro-batches, copied one step ahead, and the
generator its forward draws dropout and stochastic depth from.

On a GPU, ``DevicePrefetcher`` copies the next step's micro-batches to the device on a side CUDA
stream (non-blocking copies from pinned memory) while the current step's kernels run, so the
step never waits for a host-to-device copy and never blocks the host on one. The main stream
waits for the copy on the device (an event, not a host sync) before it uses the tensors. On the
CPU it is a pass-through: no stream, no thread, the same items in the same order.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Generic, TypeVar

import torch
from torch.utils._pytree import tree_flatten, tree_map

T = TypeVar("T")


def to_device(item: T, device: torch.device) -> T:
    """Every tensor of ``item`` (tuples, lists, named tuples, dicts of them) on ``device``,
    copied without blocking the host: CPU tensors are pinned first where the loader has not
    pinned them (a non-blocking copy from pageable memory would block)."""

    def move(value: Any) -> Any:
        if not isinstance(value, torch.Tensor) or value.device == device:
            return value
        if value.device.type == "cpu" and not value.is_pinned():
            value = value.pin_memory()
        return value.to(device, non_blocking=True)

    return tree_map(move, item)


class DevicePrefetcher(Generic[T]):
    """An iterator over ``source``'s items (at most ``limit``), each with its tensors already on
    ``device``.

    On CUDA, taking item ``i`` starts the copy of item ``i + 1`` on a side stream (never past
    ``limit``: a run's last step does not open the next epoch's loader); an error ``source``
    raises while fetching ahead is raised when its item is asked for, so the items before it
    are used first. On any other device the items pass through untouched.
    """

    def __init__(self, source: Iterator[T], device: torch.device, limit: int | None = None):
        self.source, self.device, self._left = source, device, limit
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._ahead: tuple[T, torch.cuda.Event] | Exception | None = None

    def __iter__(self) -> DevicePrefetcher[T]:
        return self

    def __next__(self) -> T:
        if self._stream is None:
            return self._take()
        ahead = self._ahead if self._ahead is not None else self._fetch()
        self._ahead = None
        if isinstance(ahead, Exception):
            raise ahead
        self._ahead = self._fetch()  # the copy of the next item overlaps this one's step
        item, copied = ahead
        current = torch.cuda.current_stream(self.device)
        current.wait_event(copied)
        for tensor in tree_flatten(item)[0]:
            if isinstance(tensor, torch.Tensor) and tensor.device.type == "cuda":
                # Memory allocated on the side stream and used on this one: the caching
                # allocator must not hand it out again before this stream is done with it.
                tensor.record_stream(current)
        return item

    def _take(self) -> T:
        if self._left is not None:
            if self._left <= 0:
                raise StopIteration
            self._left -= 1
        return next(self.source)

    def _fetch(self) -> tuple[T, torch.cuda.Event] | Exception:
        try:
            item = self._take()
        except Exception as error:  # StopIteration included: raised in its turn
            return error
        with torch.cuda.stream(self._stream):
            moved = to_device(item, self.device)
            copied = torch.cuda.Event()
            copied.record(self._stream)
        return moved, copied


def prefetcher(
    source: Iterator[T],
    device: torch.device,
    current: DevicePrefetcher[T] | None,
    limit: int | None = None,
) -> DevicePrefetcher[T]:
    """``current`` if it already reads ``source``, else a new prefetcher over at most ``limit``
    of ``source``'s items."""
    if current is not None and current.source is source:
        return current
    return DevicePrefetcher(source, device, limit)


def device_generator(device: torch.device) -> torch.Generator:
    """The default generator of ``device``: the one dropout and stochastic depth draw from.

    Seeding it alone (not ``torch.manual_seed``, which seeds the CPU and every GPU and, before
    CUDA starts, records a stack trace per call) keeps a micro-batch's draws a function of its
    seed on the device that runs the forward.
    """
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return torch.cuda.default_generators[index]
    return torch.default_generator
