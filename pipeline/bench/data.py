"""``python -m pipeline.bench data``: training images/s per loader worker, shards vs ImageFolder.

Both sides decode the same 256 px JPEGs and apply the F0 training recipe (Inception crop, flip,
bicubic resize to 192, RandAugment 4 x 5, ImageNet normalisation) in the same run:
- peer: torchvision ``ImageFolder`` + ``DataLoader`` with the transforms on PIL images and
  torchvision's RandAugment, the way torchvision's reference scripts do it;
- ours: ``make_train_loader`` over webdataset shards of the same bytes, with DM's RandAugment
  (``pipeline.data.randaugment``), one image per output as the peer.
Goal: ours >= 1.2x the peer in images per CPU-second.

It also measures what DM's mixing order costs: ours with MixUp/CutMix in DM's order
(``data.augment_before_mix=false``: each output decodes and crops two images, mixes them, then
runs RandAugment once) against ``augment_before_mix=true`` (one image per output, augmented, then
mixed with its neighbour in the batch). Rounds alternate between the four loaders so that load
from other processes hits all alike; each figure is the median over rounds of images/s after the
first batch, divided by the workers.

``--cores N`` sizes the CPUs a GPU needs instead: ours alone, as an ``nfnet_f0`` run loads its
data (192 px, DM's MixUp/CutMix order, RandAugment 4 x 5: the variant table and the run config's
defaults), with N loader processes. It prints images/s per core in steady state (after every
process's queue has filled once) and what that means for an 8-GPU node at an assumed F0 rate per
GPU (``--gpu-images-per-s``: an input to replace with ``bench gpu``'s measured pipeline row, not
a claim), from which ``data.loader_workers`` and ``scaling.cpus_per_worker`` follow.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from torchvision import datasets
from torchvision.transforms import v2

from pipeline.config import load_config
from pipeline.data.reader import make_train_loader
from pipeline.data.sources import shapes
from pipeline.data.transforms import BICUBIC, CROP_AREA, CROP_ASPECT, IMAGENET_MEAN, IMAGENET_STD
from pipeline.data.writer import write_shards
from pipeline.models import get_variant

GOAL = 1.2
_LOADERS = ("torchvision", "shards", "dm_order", "augment_before_mix")
# pipeline.data.reader: each loader process keeps up to 4 batches ready (prefetch_factor=4).
_QUEUED_PER_PROCESS = 4
# One F0 training image per second per GPU assumed for the node sizing (an input, not a
# measurement: bench gpu's "pipeline compiled" row measures it on the user's GPU).
DEFAULT_GPU_IMAGES_PER_S = 2000.0
GPUS_PER_NODE = 8


def _peer_loader(root: Path, args: argparse.Namespace) -> DataLoader:
    transform = v2.Compose(
        [
            v2.RandomResizedCrop(
                args.resolution,
                scale=CROP_AREA,
                ratio=CROP_ASPECT,
                interpolation=BICUBIC,
                antialias=True,
            ),
            v2.RandomHorizontalFlip(),
            # torchvision's RandAugment at DM's level scale: magnitude 5 of bins 0..10.
            v2.RandAugment(
                num_ops=args.ra_layers, magnitude=args.ra_magnitude, num_magnitude_bins=11
            ),
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD)),
        ]
    )
    dataset = datasets.ImageFolder(str(root), transform=transform)
    return DataLoader(
        dataset, batch_size=args.batch_size, shuffle=True, num_workers=args.workers, drop_last=True
    )


def _our_loader(url: str, args: argparse.Namespace, epoch: int, **mixing):
    return make_train_loader(
        url,
        batch_size=args.batch_size,
        batches_per_epoch=args.batches,
        rank=0,
        world_size=1,
        epoch=epoch,
        seed=0,
        num_workers=args.workers,
        streams=max(1, args.workers),  # a stream per process: each process is one stream's
        resolution=args.resolution,
        randaugment_layers=args.ra_layers,
        randaugment_magnitude=args.ra_magnitude,
        shuffle_buffer=256,
        **mixing,
    )


def _cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds of the processes ``pids`` so far (Linux /proc)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    return total / ticks


def _measure(loader, batches: int, skip: int = 1) -> tuple[float, float]:
    """(images per wall second, images per CPU second), both over ``batches - skip`` batches
    after the first ``skip``.

    The CPU figure adds the loader workers' CPU time and the consuming process's, so all the
    work of loading counts wherever it runs, and load from other processes on a shared machine
    barely moves it (the wall figure moves with it). Start-up is left out of both.
    """
    iterator = iter(loader)
    for _ in range(skip):
        next(iterator)
    pids = [worker.pid for worker in getattr(iterator, "_workers", [])]  # none in-process
    cpu_before, wall_before, seen = _cpu_seconds(pids) + time.process_time(), time.perf_counter(), 0
    for _ in range(batches - skip):
        images, _ = next(iterator)
        seen += images.shape[0]
    wall = seen / (time.perf_counter() - wall_before)
    cpu = _cpu_seconds(pids) + time.process_time() - cpu_before
    del iterator
    return wall, seen / cpu


def _prepare(directory: Path, args: argparse.Namespace) -> tuple[str, Path]:
    source = shapes(args.images, 256, seed=0)
    url = f"file://{directory}/shards"
    write_shards(source, url, samples_per_shard=128, val_samples=0, progress=False)
    if args.cores:
        return url, directory
    folder = directory / "folder"
    for index in range(len(source)):
        data, label = source.sample(index)
        path = folder / source.class_names[label] / f"{index:06d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return url, folder


def main(argv: list[str]) -> dict:
    """Run the comparison, print the report and return the figures."""
    parser = argparse.ArgumentParser(prog="python -m pipeline.bench data")
    parser.add_argument("--images", type=int, default=1024, help="256 px JPEGs on each side")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=30, help="batches per measurement")
    parser.add_argument("--rounds", type=int, default=3)
    f0 = get_variant("nfnet_f0")  # 192 px, RandAugment 4 x 5 (DM base.py, experiment_nfnets.py)
    parser.add_argument("--resolution", type=int, default=f0.train_resolution)
    parser.add_argument("--ra-layers", type=int, default=f0.randaugment_layers)
    parser.add_argument("--ra-magnitude", type=int, default=f0.randaugment_magnitude)
    parser.add_argument("--cores", type=int, help="size CPUs per GPU with N loader processes")
    parser.add_argument(
        "--gpu-images-per-s",
        type=float,
        default=DEFAULT_GPU_IMAGES_PER_S,
        help="assumed F0 training images/s of one GPU (an input: bench gpu measures yours)",
    )
    args = parser.parse_args(argv)
    if args.cores is not None:
        if args.cores < 1:
            parser.error(f"--cores must be >= 1, got {args.cores}")
        return size_cores(args)
    if args.images < args.batches * args.batch_size:
        parser.error("--images must be at least --batches x --batch-size (one pass of the peer)")
    # DM experiment_nfnets.py: cutmix_mixup_randaugment, MixUp alpha 0.2 (DM dataset.py).
    mixing = {"mixup_alpha": 0.2, "cutmix": True}
    ours = {
        "shards": {},
        "dm_order": mixing,
        "augment_before_mix": mixing | {"augment_before_mix": True},
    }
    measured: dict[str, list[tuple[float, float]]] = {name: [] for name in _LOADERS}
    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        url, folder = _prepare(Path(tmp), args)
        for round_index in range(args.rounds):
            for name in _LOADERS:
                if name == "torchvision":
                    loader = _peer_loader(folder, args)
                else:
                    loader = _our_loader(url, args, round_index, **ours[name])
                measured[name].append(_measure(loader, args.batches))
    workers = max(1, args.workers)
    figures: dict = {}
    # Images per CPU second is already the rate of one fully busy worker; wall rates are split.
    for key, index, divisor in (("wall", 0, workers), ("cpu", 1, 1)):
        for name, rounds in measured.items():
            figures[_rate(name, key)] = statistics.median(r[index] for r in rounds) / divisor
        figures[f"speedup_{key}"] = (
            figures[_rate("shards", key)] / figures[_rate("torchvision", key)]
        )
        cost = figures[_rate("augment_before_mix", key)] / figures[_rate("dm_order", key)]
        figures[f"dm_order_cost_{key}"] = cost
    figures["goal"] = GOAL
    figures["goal_met"] = figures["speedup_cpu"] >= GOAL
    _report(figures, args)
    return figures


def _rate(loader: str, key: str) -> str:
    """The figure name of ``loader``'s images per ``key`` ("cpu" or "wall") second per worker."""
    return f"{loader}_images_per_{key}_s_per_worker"


def _report(figures: dict, args: argparse.Namespace) -> None:
    print(
        f"256 px JPEG -> {args.resolution} px, RandAugment {args.ra_layers}x{args.ra_magnitude}, "
        f"batch {args.batch_size}, {args.workers} worker(s), median of {args.rounds} rounds"
    )
    for key, label in (("cpu", "per CPU second"), ("wall", "per wall second/worker")):
        rate = {name: figures[_rate(name, key)] for name in _LOADERS}
        print(
            f"  images {label}: torchvision ImageFolder+DataLoader (torchvision RandAugment) "
            f"{rate['torchvision']:6.1f}, pipeline.data shards (DM RandAugment) "
            f"{rate['shards']:6.1f}, speedup {figures[f'speedup_{key}']:.2f}x"
        )
        print(
            f"  mixed images {label}: augment_before_mix=true {rate['augment_before_mix']:6.1f}, "
            f"DM's order (false, two decodes per output) {rate['dm_order']:6.1f}: DM's order "
            f"takes {figures[f'dm_order_cost_{key}']:.2f}x the time per image"
        )
    print(f"  goal: >= {GOAL}x per worker (CPU time): {'met' if figures['goal_met'] else 'MISSED'}")


def size_cores(args: argparse.Namespace) -> dict:
    """Steady-state images/s per loader core of an nfnet_f0 run's loader with ``args.cores``
    processes, and the cores an 8-GPU node needs at ``args.gpu_images_per_s`` per GPU."""
    data = load_config(None).data  # the run's mixing: MixUp 0.2 + CutMix, in DM's order
    mixing = {"mixup_alpha": data.mixup_alpha, "cutmix": data.cutmix}
    mixing["augment_before_mix"] = data.augment_before_mix
    skip = args.cores * _QUEUED_PER_PROCESS + 1  # the queues filled during start-up
    sized = argparse.Namespace(**vars(args) | {"workers": args.cores})
    sized.batches = args.batches + skip
    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        url, _ = _prepare(Path(tmp), args)
        wall, cpu = _measure(_our_loader(url, sized, 0, **mixing), sized.batches, skip)
    per_core = {"wall": wall / args.cores, "cpu": cpu}
    loaders = math.ceil(args.gpu_images_per_s / per_core["cpu"])
    figures = {
        "cores": args.cores,
        "images_per_s": wall,
        "images_per_s_per_core": per_core["wall"],
        "images_per_cpu_s": per_core["cpu"],
        "assumed_gpu_images_per_s": args.gpu_images_per_s,
        "loader_cores_per_gpu": args.gpu_images_per_s / per_core["cpu"],
        "loader_cores_per_node": GPUS_PER_NODE * args.gpu_images_per_s / per_core["cpu"],
        "load_average": os.getloadavg(),
    }
    print(
        f"pipeline.data shards, 256 px JPEG -> {args.resolution} px, DM's MixUp/CutMix order, "
        f"RandAugment {args.ra_layers}x{args.ra_magnitude}, batch {args.batch_size}, "
        f"{args.cores} loader process(es), {args.batches} batches after {skip} "
        f"(load average {' '.join(f'{x:.2f}' for x in figures['load_average'])})"
    )
    print(
        f"  {wall:.1f} images/s in all: {per_core['wall']:.1f} per core (wall), "
        f"{per_core['cpu']:.1f} per CPU-second (a fully busy core)"
    )
    print(
        f"  at an assumed {args.gpu_images_per_s:g} F0 images/s per GPU (--gpu-images-per-s, an "
        f"input, not a measurement): {figures['loader_cores_per_gpu']:.1f} loader cores per GPU, "
        f"{figures['loader_cores_per_node']:.0f} for an {GPUS_PER_NODE}-GPU node; per worker "
        f"data.loader_workers={loaders} and scaling.cpus_per_worker={loaders + 1} (one more for "
        "the training process; a worker runs at most as many loader processes as it owns data "
        "streams, data.streams / scaling.num_workers)"
    )
    return figures
