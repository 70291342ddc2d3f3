"""The datasets behind the loaders: canonical training streams, an exact-once eval stream.

Training: elastic determinism. Global micro-batch ``g`` (``0 <= g < M``, ``M = global batch /
micro-batch``) of step ``s`` of an epoch holds the same samples, cropped, mixed and augmented
alike, however many ranks and loader processes serve the run: it depends only on the seed, the
epoch, ``s``, ``g`` and the run's number of canonical streams ``C``, a multiple of ``M`` fixed at
the run's start (``data.streams``; by default ``C = M``).

Which stream. Micro-batch ``(s, g)`` is entry ``j = s·M + g`` of the epoch's sequence of
micro-batches, and canonical stream ``c = j mod C`` makes it as its batch number ``j div C``. With
``C = M``, stream ``g`` makes micro-batch ``g`` of every step.

A stream. Pass ``p`` over the split's shards is a permutation drawn from (seed, epoch, p); the
passes are concatenated and stream ``c`` takes every ``C``-th entry from entry ``c``, so streams
read disjoint shards within a pass (given at least ``C`` shards) and never end. Its samples go
through a shuffle buffer seeded by (seed, epoch, c); each sample's crop, and the mixing and
RandAugment of the output it is the own image of, are seeded by (seed, epoch, c, position in the
stream). A batch of B outputs takes
``recipe.images_per_output`` x B samples (2B in DM's order: disjoint pairs), crops each, and hands
them to the ``TrainRecipe`` (``pipeline.data.mixing``); images stay uint8 until the recipe is
done, then the batch is normalised in one vectorised step straight into shared memory.

Who serves it. Rank ``r`` of ``W`` accumulates ``A = M / W`` micro-batches per step, its slot
``a`` being global micro-batch ``a·W + r`` (the index the trainer seeds dropout and stochastic
depth with). ``W`` divides ``M`` and so ``C``: stream ``c`` belongs to rank ``c mod W``, which
owns ``C / W`` streams. Batch ``i`` of a rank comes from its loader process ``i mod L`` (the
DataLoader's round-robin); with ``L`` a divisor of ``C / W`` every stream belongs to one process,
which hands out its streams' batches in position order. ``Layout.loader_processes`` lowers a
requested ``L`` to the largest such divisor (more processes than streams would have nothing to
do). Each process keeps one generator per stream it owns.

Resume. With ``start_batch = i`` each stream starts at the first batch it makes at or after
batch ``i`` of the rank, skipping the batches before it by checking (not decoding in full, not
augmenting) the samples they would hold. Hence a rank yields exactly the tensors an
uninterrupted rank yields from batch ``i`` on, and a run resumed on another number of ranks or
loader processes continues with exactly the micro-batches it would have had.

Cost. Every stream holds its own shuffle buffer (``shuffle_buffer`` encoded samples), its shard
being read and ``prefetch_shards`` shards fetched ahead: a rank holds ``C / W`` of each.

Skip counts go to a ``SkipCounter`` in shared memory that every loader worker adds to. A sample
counts as usable when its label parses and ``check_image`` passes, in the skipped batches too,
so a resumed stream drops the same samples as the original.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from pipeline.data.decode import CorruptImage, check_image, decode_rgb, image_bytes, sample_label
from pipeline.data.mixing import MixTargets, TrainRecipe
from pipeline.data.shardio import SkipCounter, iter_shard, iter_shards
from pipeline.data.transforms import normalize_batch
from pipeline.seeds import sample_seed

# Distinct streams of randomness derived from the same user seed.
_SHARD_ORDER, _SHUFFLE, _AUGMENT = 0x5A4D, 0x5B5F, 0x5C6E
BLANK_RGB = (124, 116, 104)  # ImageNet mean colour: normalises to ~0


def shard_sequence(
    num_shards: int, seed: int, epoch: int, stream: int, num_streams: int
) -> Iterator[int]:
    """Endless shard indices of ``stream``: every ``num_streams``-th entry of seeded passes."""
    position, cached_pass, order = stream, -1, None
    while True:
        shard_pass, offset = divmod(position, num_shards)
        if shard_pass != cached_pass:
            rng = np.random.default_rng([seed, epoch, shard_pass, _SHARD_ORDER])
            order, cached_pass = rng.permutation(num_shards), shard_pass
        yield int(order[offset])
        position += num_streams


def shuffled(items: Iterator, size: int, rng: np.random.Generator) -> Iterator:
    """``items`` through a shuffle buffer of ``size`` (0 or 1: unchanged)."""
    if size <= 1:
        yield from items
        return
    buffer: list = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        slot = int(rng.integers(size))
        buffer[slot], item = item, buffer[slot]
        yield item
    for slot in rng.permutation(len(buffer)):
        yield buffer[slot]


def _shared_float_like(images: torch.Tensor) -> torch.Tensor:
    """An uninitialised float32 tensor of ``images``' shape in shared memory."""
    template = torch.empty(0, dtype=torch.float32)
    try:
        # What default_collate does in a worker: allocate the batch in shared memory at once,
        # so that sending it to the main process moves no bytes.
        storage = template._typed_storage()._new_shared(images.numel(), device="cpu")
        return template.new(storage).view(images.shape)
    except AttributeError:  # pragma: no cover - private API gone in a later torch
        return torch.empty(images.shape, dtype=torch.float32).share_memory_()


def _seeded(transform: Callable, image: torch.Tensor, seed: int) -> torch.Tensor:
    """``transform(image)`` with torch's global CPU generator seeded, then restored."""
    # torchvision's transforms draw from the global generator; restoring it keeps the trainer's
    # stream untouched when num_workers=0. Not torch.manual_seed: it also queues a lazy CUDA
    # seeding call with a formatted stack on every call (slow, and the queue grows).
    state = torch.get_rng_state()
    try:
        torch.default_generator.manual_seed(seed)
        return transform(image)
    finally:
        torch.set_rng_state(state)


def _normalised(pixels: torch.Tensor) -> torch.Tensor:
    """A batch of pixels normalised once for the whole batch (in a worker: into shared memory)."""
    out = _shared_float_like(pixels) if get_worker_info() is not None else None
    return normalize_batch(pixels, out=out)


def _eval_batch(images: list[torch.Tensor], labels: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    return _normalised(torch.stack(images)), torch.tensor(labels, dtype=torch.int64)


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


@dataclass(frozen=True)
class Layout:
    """How a rank's batches map onto the run's canonical streams (see the module docstring).

    ``accumulation`` micro-batches per step on each of ``world_size`` ranks; ``streams`` is the
    run's canonical stream count (None: one per micro-batch of a step).
    """

    rank: int = 0
    world_size: int = 1
    accumulation: int = 1
    streams: int | None = None

    def __post_init__(self) -> None:
        if self.num_streams % self.micro_batches:
            raise ValueError(
                f"streams={self.streams} must be a multiple of the micro-batches of a step, "
                f"{self.world_size} ranks x {self.accumulation} = {self.micro_batches}"
            )

    @property
    def micro_batches(self) -> int:
        """Micro-batches of one step over all ranks (``M``)."""
        return self.world_size * self.accumulation

    @property
    def num_streams(self) -> int:
        """Canonical streams of the run (``C``)."""
        return self.streams or self.micro_batches

    def locate(self, batch: int) -> tuple[int, int]:
        """``(stream, its batch number)`` of this rank's ``batch``-th batch of the epoch."""
        step, slot = divmod(batch, self.accumulation)
        entry = step * self.micro_batches + slot * self.world_size + self.rank
        return entry % self.num_streams, entry // self.num_streams

    def loader_processes(self, requested: int) -> int:
        """The largest divisor of this rank's stream count up to ``requested`` (0 stays 0)."""
        own = self.num_streams // self.world_size
        return max(n for n in range(1, min(requested, own) + 1) if own % n == 0) if requested else 0


@dataclass(frozen=True)
class Shards:
    """One split's shards, how to read them, and the skip counter every loader worker adds to."""

    urls: tuple[str, ...]
    lengths: tuple[int, ...]
    num_classes: int
    storage_options: dict | None = None
    allow_pipe: bool = False
    prefetch_shards: int = 0
    counter: SkipCounter = field(default_factory=SkipCounter)

    @property
    def num_samples(self) -> int:
        """Samples in the split, as ``_info.json`` records them."""
        return sum(self.lengths)

    def read(self, url: str) -> Iterator[dict]:
        """The samples of the shard at ``url``, in order."""
        return iter_shard(url, self.counter, self.storage_options, self.allow_pipe)

    def read_in_order(self, order: Iterator[int]) -> Iterator[tuple[str, Iterator[dict]]]:
        """``(url, samples)`` of the shards ``order`` names, the next ones fetched ahead."""
        urls = (self.urls[index] for index in order)
        return iter_shards(
            urls,
            self.counter,
            self.storage_options,
            self.allow_pipe,
            prefetch_shards=self.prefetch_shards,
        )

    def labelled(self, samples: Iterator[dict]) -> Iterator[tuple[bytes, int]]:
        """(image bytes, label) of the samples that have both; the others are counted."""
        for sample in samples:
            data = image_bytes(sample)
            if data is None:
                self.counter.add("missing_image")
                continue
            label = sample_label(sample)
            if label is None or not 0 <= label < self.num_classes:
                self.counter.add("missing_label")
                continue
            yield data, label

    def decode(self, data: bytes) -> torch.Tensor | None:
        """RGB uint8 tensor of an image that passes ``check_image``; None (counted) if it fails."""
        try:
            check_image(data)
        except CorruptImage:
            self.counter.add("corrupt_image")
            return None
        try:
            return decode_rgb(data)
        except CorruptImage:
            # Passed the check, failed the decode (rare: broken scan data). Dropping it would
            # shift every later batch of a resumed stream, so it is kept as a blank image.
            self.counter.add("blank_substitute")
            blank = torch.tensor(BLANK_RGB, dtype=torch.uint8).view(3, 1, 1)
            return blank.expand(3, 8, 8).clone()


class TrainStream(IterableDataset):
    """A rank's training batches for one epoch (see the module docstring)."""

    def __init__(
        self,
        shards: Shards,
        *,
        batch_size: int,
        batches_per_epoch: int,
        start_batch: int,
        layout: Layout,
        epoch: int,
        seed: int,
        transform: Callable[[torch.Tensor], torch.Tensor],
        recipe: TrainRecipe,
        shuffle_buffer: int,
    ) -> None:
        self.shards, self.layout = shards, layout
        self.batch_size, self.batches_per_epoch = batch_size, batches_per_epoch
        self.start_batch, self.epoch, self.seed = start_batch, epoch, seed
        self.transform, self.recipe, self.shuffle_buffer = transform, recipe, shuffle_buffer

    def _raw_samples(self, order: Iterator[int], patience: int) -> Iterator[dict]:
        """The samples of the shards in order; an error after ``patience`` empty shards in a row."""
        empty = 0
        for url, samples in self.shards.read_in_order(order):
            found = False
            for sample in samples:
                found = True
                yield sample
            empty = 0 if found else empty + 1
            if empty > patience:
                raise RuntimeError(f"{url}: no shard of the split holds a sample")

    def _samples(self, stream: int) -> Iterator[tuple[bytes, int]]:
        count, streams = len(self.shards.urls), self.layout.num_streams
        order = shard_sequence(count, self.seed, self.epoch, stream, streams)
        raw = self._raw_samples(order, 2 * count + streams)
        rng = np.random.default_rng([self.seed, self.epoch, stream, _SHUFFLE])
        return shuffled(self.shards.labelled(raw), self.shuffle_buffer, rng)

    def _stream(self, stream: int, first: int) -> Iterator[tuple[int, tuple]]:
        """``(number, batch)`` of canonical ``stream`` from its batch ``first`` on, endlessly."""
        per_batch = self.batch_size * self.recipe.images_per_output  # usable samples
        to_skip, number = first * per_batch, first
        images, labels, seeds = [], [], []
        counter = self.shards.counter
        patience, last_usable = 2 * self.shards.num_samples + self.shuffle_buffer + 100, 0
        for position, (data, label) in enumerate(self._samples(stream)):
            if position - last_usable > patience:
                raise RuntimeError(
                    f"{self.shards.urls[0]} (and the other shards of the split): no usable "
                    f"sample in the last {patience} read ({counter.by_reason()})"
                )
            if to_skip:
                try:
                    check_image(data)
                    to_skip, last_usable = to_skip - 1, position
                except CorruptImage:
                    counter.add("corrupt_image")
                continue
            image = self.shards.decode(data)
            if image is None:
                continue
            last_usable = position
            seed = sample_seed(_AUGMENT, self.seed, self.epoch, stream, position)
            images.append(_seeded(self.transform, image, seed))
            labels.append(label)
            seeds.append(seed)
            if len(images) == per_batch:
                pixels, targets = self.recipe(images, labels, seeds)
                yield number, (_normalised(pixels), targets)
                images, labels, seeds, number = [], [], [], number + 1

    def __iter__(self) -> Iterator[tuple[torch.Tensor, MixTargets]]:
        worker, processes = _worker()
        owned: dict[int, Iterator[tuple[int, tuple]]] = {}
        try:
            for batch in range(self.start_batch + worker, self.batches_per_epoch, processes):
                stream, number = self.layout.locate(batch)
                if stream not in owned:
                    owned[stream] = self._stream(stream, number)
                made, produced = next(owned[stream])
                if made != number:  # only a layout whose processes share a stream gets here
                    raise RuntimeError(
                        f"stream {stream} made batch {made} where batch {number} was due; "
                        f"{processes} loader processes do not divide its streams ({self.layout})"
                    )
                yield produced
        finally:
            for generator in owned.values():
                generator.close()  # stops the streams' shard prefetching now, not at collection


class EvalStream(IterableDataset):
    """Every sample of the split once across ranks x workers: contiguous, balanced ranges."""

    def __init__(
        self,
        shards: Shards,
        *,
        batch_size: int,
        rank: int,
        world_size: int,
        transform: Callable[[torch.Tensor], torch.Tensor],
    ) -> None:
        self.shards, self.batch_size, self.transform = shards, batch_size, transform
        self.rank, self.world_size = rank, world_size

    def sample_range(self, worker: int, num_workers: int) -> tuple[int, int]:
        """[start, stop) of the split's sample indices that ``worker`` of this rank reads."""
        total = self.shards.num_samples
        low, high = total * self.rank // self.world_size, total * (self.rank + 1) // self.world_size
        span = high - low
        return low + span * worker // num_workers, low + span * (worker + 1) // num_workers

    def _samples(self, start: int, stop: int) -> Iterator[dict]:
        offset = 0
        for url, length in zip(self.shards.urls, self.shards.lengths, strict=True):
            if offset < stop and offset + length > start:
                for position, sample in enumerate(self.shards.read(url)):
                    # Samples beyond the recorded length belong to no range: ignored.
                    if position < length and start <= offset + position < stop:
                        yield sample
            offset += length

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        start, stop = self.sample_range(*_worker())
        images, labels = [], []
        for data, label in self.shards.labelled(self._samples(start, stop)):
            image = self.shards.decode(data)
            if image is None:
                continue
            images.append(self.transform(image))
            labels.append(label)
            if len(images) == self.batch_size:
                yield _eval_batch(images, labels)
                images, labels = [], []
        if images:
            yield _eval_batch(images, labels)
