"""Where a worker's micro-batches come from: the shard stream, or in-memory synthetic tensors.

Both sources hand out, for optimizer step ``s``, the worker's ``accumulation_steps``
micro-batches, and can start at any step (resume without repeated or skipped samples). Slot
``a`` of worker ``r`` of ``W`` is global micro-batch ``m = a·W + r``, and what ``m`` of step
``s`` holds depends on neither ``W`` nor the loader processes: a run resumes on another worker
count with the data it would have had (for shards: the canonical streams of
``pipeline.data.streams``, ``plan.train_streams`` of them).

Both go through the same ``TrainRecipe`` (``pipeline.data.mixing``: MixUp/CutMix and DM's
RandAugment, in the configured order), so a micro-batch is ``(normalised images, MixTargets)``.

``synthetic://`` is a deterministic in-memory dataset of uint8 images without decoding or
cropping: with ``k`` images read per output (2 in DM's mixing order), micro-batch ``m`` of global
step ``s`` reads samples ``[(s·G + m·b)·k, …)`` (mod N for the pixels), where the global
micro-batch index ``m = a·W + r`` (accumulation slot ``a``, worker ``r`` of ``W``), and each
sample's recipe is seeded by (run seed, its position). One worker accumulating two micro-batches
therefore sees exactly the samples and augmentations two workers see in one — which is what the
data-parallel exactness test and the scaling benchmark need.

Fault injection for the NaN tests: ``&nonfinite_steps=3,4`` makes the last sample of the global
batch of steps 3 and 4 (numbered from 1, as logged and as checkpoints are named) all NaN. That
sample lives on the last worker only, so the other workers' own losses stay finite and only the
all-reduce can tell them about the fault.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlparse

import torch

from pipeline.config import RunConfig
from pipeline.data.info import TRAIN_SPLIT, VALIDATION_SPLIT, read_info
from pipeline.data.mixing import MixTargets, TrainRecipe
from pipeline.data.reader import make_eval_loader, make_train_loader
from pipeline.data.transforms import normalize_batch
from pipeline.seeds import sample_seed
from pipeline.train.plan import Plan

SYNTHETIC = "synthetic://"
_SYNTHETIC_SAMPLE = 0x5E1F  # the seed domain of a synthetic sample's augmentation
MicroBatch = tuple[torch.Tensor, MixTargets]


@dataclass(frozen=True)
class DatasetShape:
    """What the trainer needs to know of a dataset before it starts."""

    num_classes: int
    train_samples: int
    val_samples: int


def _synthetic_params(url: str) -> dict[str, Any]:
    query = parse_qs(urlparse(url).query)
    params: dict[str, Any] = {"samples": 512, "classes": 10, "resolution": 32, "seed": 0}
    params["nonfinite_steps"] = frozenset()
    for key, values in query.items():
        if key not in params:
            raise ValueError(f"data url {url}: unknown synthetic parameter {key!r}")
        try:
            if key == "nonfinite_steps":
                params[key] = frozenset(int(step) for step in values[-1].split(","))
            else:
                params[key] = int(values[-1])
        except ValueError:
            raise ValueError(f"data url {url}: {key}={values[-1]!r} is not a number") from None
    return params


def describe_dataset(
    url: str,
    storage_options: dict | None = None,
    allow_pipe: bool = False,
    *,
    train_samples: int | None = None,
    num_classes: int | None = None,
) -> DatasetShape:
    """Class count and split sizes, from ``_info.json`` (or the synthetic URL's parameters).

    ``url`` may be a brace pattern of shards; where no ``_info.json`` lists them, the epoch size
    ``train_samples`` and ``num_classes`` describe them (no validation split: 0 samples).
    """
    if url.startswith(SYNTHETIC):
        params = _synthetic_params(url)
        return DatasetShape(params["classes"], params["samples"], params["samples"] // 4)
    info = read_info(
        url,
        storage_options,
        allow_pipe=allow_pipe,
        num_samples=train_samples,
        num_classes=num_classes,
    )
    validation = info.splits.get(VALIDATION_SPLIT)
    return DatasetShape(
        info.num_classes,
        info.split(TRAIN_SPLIT).num_samples,
        validation.num_samples if validation is not None else 0,
    )


def train_recipe(config: RunConfig, plan: Plan) -> TrainRecipe:
    """The run's MixUp/CutMix and RandAugment, in the configured order."""
    data = config.data
    return TrainRecipe(
        plan.randaugment_layers,
        plan.randaugment_magnitude,
        mixup_alpha=data.mixup_alpha,
        cutmix=data.cutmix,
        augment_before_mix=data.augment_before_mix,
    )


class SyntheticBatches:
    """Deterministic uint8 images: class-dependent means plus noise, indexed by global sample.

    ``recipe`` (default: none, no augmentation or mixing) and ``seed`` (the run's) make the
    training micro-batches; evaluation reads the images as they are.
    """

    def __init__(
        self, url: str, plan: Plan, rank: int, recipe: TrainRecipe | None = None, seed: int = 0
    ):
        params = _synthetic_params(url)
        self.plan, self.rank, self.seed = plan, rank, seed
        self.recipe = recipe or TrainRecipe(0, 0)
        generator = torch.Generator().manual_seed(params["seed"])
        size = params["resolution"]
        count, classes = params["samples"], params["classes"]
        self.labels = torch.randint(0, classes, (count,), generator=generator)
        prototypes = torch.randn(classes, 3, size, size, generator=generator)
        noise = torch.randn(count, 3, size, size, generator=generator)
        pixels = 128.0 + 40.0 * (prototypes[self.labels] * 0.5 + noise)
        self.images = pixels.round().clamp(0, 255).to(torch.uint8)
        self.nonfinite_steps = params["nonfinite_steps"]
        self.skipped = 0

    def _slice(self, start: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        index = (torch.arange(length) + start) % len(self.labels)
        return self.images[index], self.labels[index]

    def _micro_batch(self, start: int) -> MicroBatch:
        """The micro-batch whose first output reads sample ``start`` of the endless sequence."""
        count = self.plan.micro_batch * self.recipe.images_per_output
        images, labels = self._slice(start, count)
        seeds = [sample_seed(_SYNTHETIC_SAMPLE, self.seed, start + i) for i in range(count)]
        pixels, targets = self.recipe(list(images), labels.tolist(), seeds)
        return normalize_batch(pixels), targets

    def steps(self, start_step: int) -> Iterator[list[MicroBatch]]:
        """Yield, per optimizer step, this worker's list of micro-batches."""
        plan, per_output = self.plan, self.recipe.images_per_output
        step = start_step
        while True:
            micro = []
            for slot in range(plan.accumulation_steps):
                global_micro = slot * plan.num_workers + self.rank
                start = step * plan.global_batch + global_micro * plan.micro_batch
                micro.append(self._micro_batch(start * per_output))
            if step + 1 in self.nonfinite_steps and self.rank == plan.num_workers - 1:
                micro[-1][0][-1] = float("nan")  # the global batch's last sample (a copy)
            yield micro
            step += 1

    def eval_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The validation split: the first quarter of the samples, sharded over workers."""
        val = self.plan.val_samples
        step = self.plan.num_workers * self.plan.micro_batch
        per_rank = range(self.rank * self.plan.micro_batch, val, step)
        for start in per_rank:
            images, labels = self._slice(start, min(self.plan.micro_batch, val - start))
            yield normalize_batch(images), labels


class ShardBatches:
    """The webdataset shard stream of ``pipeline.data``, cut into per-step micro-batch lists."""

    def __init__(self, config: RunConfig, plan: Plan, rank: int):
        data = config.data
        self.plan, self.seed, self.config = plan, config.train.seed, config
        self.url, self.val_url = data.train_url, data.val_url or data.train_url
        self.shuffle_buffer, self.crop_min_area = data.shuffle_buffer, data.crop_min_area
        # How both loaders read the shards: the same share, workers, storage and pipe settings.
        self.reading = {
            "rank": rank,
            "world_size": plan.num_workers,
            "num_workers": data.loader_workers,
            "storage_options": data.storage_options,
            "allow_pipe": data.allow_pipe,
            "pin_memory": config.scaling.use_gpu,
            "prefetch_shards": data.prefetch_shards,
        }
        self._loader = None

    @property
    def skipped(self) -> int:
        """Samples the reader skipped so far (corrupt, unlabelled, truncated)."""
        return self._loader.skipped() if self._loader is not None else 0

    def _epoch_loader(self, epoch: int, start_batch: int):
        plan = self.plan
        self._loader = make_train_loader(
            self.url,
            batch_size=plan.micro_batch,
            batches_per_epoch=plan.steps_per_epoch * plan.accumulation_steps,
            start_batch=start_batch,
            accumulation=plan.accumulation_steps,
            streams=plan.train_streams,
            epoch=epoch,
            seed=self.seed,
            resolution=plan.train_resolution,
            randaugment_layers=plan.randaugment_layers,
            randaugment_magnitude=plan.randaugment_magnitude,
            mixup_alpha=self.config.data.mixup_alpha,
            cutmix=self.config.data.cutmix,
            augment_before_mix=self.config.data.augment_before_mix,
            crop_min_area=self.crop_min_area,
            shuffle_buffer=self.shuffle_buffer,
            num_samples=self.config.data.train_samples,
            num_classes=self.config.model.num_classes,
            **self.reading,
        )
        return self._loader

    def steps(self, start_step: int) -> Iterator[list[MicroBatch]]:
        """Yield, per optimizer step, this worker's list of micro-batches, epoch after epoch."""
        plan = self.plan
        epoch, step_in_epoch = divmod(start_step, plan.steps_per_epoch)
        while True:
            loader = iter(self._epoch_loader(epoch, step_in_epoch * plan.accumulation_steps))
            for _ in range(step_in_epoch, plan.steps_per_epoch):
                yield [next(loader) for _ in range(plan.accumulation_steps)]
            epoch, step_in_epoch = epoch + 1, 0

    def eval_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Every validation sample exactly once across all workers."""
        plan = self.plan
        return iter(
            make_eval_loader(
                self.val_url,
                batch_size=plan.micro_batch,
                resolution=plan.test_resolution,
                eval_padding=self.config.data.eval_padding,
                **self.reading,
            )
        )


def make_batches(config: RunConfig, plan: Plan, rank: int) -> SyntheticBatches | ShardBatches:
    """The micro-batch source named by ``data.train_url``."""
    if config.data.train_url.startswith(SYNTHETIC):
        recipe = train_recipe(config, plan)
        return SyntheticBatches(config.data.train_url, plan, rank, recipe, config.train.seed)
    return ShardBatches(config, plan, rank)
