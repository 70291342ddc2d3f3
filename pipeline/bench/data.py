"""``python -m pipeline.bench data``: training images/s per loader worker, shards vs ImageFolder.

Both sides decode the same 256 px JPEGs and apply the same F0 training recipe (Inception crop,
flip, bicubic resize to 192, RandAugment 4 x 5, ImageNet normalisation) in the same run:
- peer: torchvision ``ImageFolder`` + ``DataLoader`` with the transforms on PIL images, the
  way torchvision's reference scripts do it;
- ours: ``make_train_loader`` over webdataset shards of the same bytes.
Rounds alternate between the two so that load from other processes hits both alike; the
figure is the median over rounds of images/s after the first batch, divided by the workers.
Goal: ours >= 1.2x the peer.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from torchvision import datasets
from torchvision.transforms import v2

from pipeline.data import make_train_loader, write_shards
from pipeline.data.sources import shapes
from pipeline.data.transforms import BICUBIC, CROP_AREA, CROP_ASPECT, IMAGENET_MEAN, IMAGENET_STD

GOAL = 1.2


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
            # The same ops and magnitudes as LevelRandAugment(4, 5) (see its docstring).
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


def _our_loader(url: str, args: argparse.Namespace, epoch: int):
    return make_train_loader(
        url,
        batch_size=args.batch_size,
        batches_per_epoch=args.batches,
        rank=0,
        world_size=1,
        epoch=epoch,
        seed=0,
        num_workers=args.workers,
        resolution=args.resolution,
        randaugment_layers=args.ra_layers,
        randaugment_magnitude=args.ra_magnitude,
        shuffle_buffer=256,
    )


def _images_per_second(loader, batches: int) -> float:
    """Throughput after the first batch (which pays for worker start-up and buffer filling)."""
    iterator = iter(loader)
    next(iterator)
    start, seen = time.perf_counter(), 0
    for _ in range(batches - 1):
        images, _ = next(iterator)
        seen += images.shape[0]
    elapsed = time.perf_counter() - start
    del iterator
    return seen / elapsed


def _prepare(directory: Path, args: argparse.Namespace) -> tuple[str, Path]:
    source = shapes(args.images, 256, seed=0)
    url = f"file://{directory}/shards"
    write_shards(source, url, samples_per_shard=128, val_samples=0, progress=False)
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
    parser.add_argument("--images", type=int, default=640, help="256 px JPEGs on each side")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=12, help="batches per measurement")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--resolution", type=int, default=192)  # F0 train resolution
    parser.add_argument("--ra-layers", type=int, default=4)  # F0: RandAugment 4 x 5
    parser.add_argument("--ra-magnitude", type=int, default=5)
    args = parser.parse_args(argv)
    peer, ours = [], []
    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        url, folder = _prepare(Path(tmp), args)
        for round_index in range(args.rounds):
            peer.append(_images_per_second(_peer_loader(folder, args), args.batches))
            ours.append(_images_per_second(_our_loader(url, args, round_index), args.batches))
    workers = max(1, args.workers)
    figures = {
        "torchvision_images_per_s_per_worker": statistics.median(peer) / workers,
        "shards_images_per_s_per_worker": statistics.median(ours) / workers,
    }
    figures["speedup"] = (
        figures["shards_images_per_s_per_worker"] / figures["torchvision_images_per_s_per_worker"]
    )
    figures["goal"] = GOAL
    figures["goal_met"] = figures["speedup"] >= GOAL
    print(
        f"256 px JPEG -> {args.resolution} px, RandAugment {args.ra_layers}x{args.ra_magnitude}, "
        f"batch {args.batch_size}, {args.workers} worker(s), median of {args.rounds} rounds"
    )
    print(
        f"  torchvision ImageFolder+DataLoader: "
        f"{figures['torchvision_images_per_s_per_worker']:7.1f} images/s per worker"
    )
    print(
        f"  pipeline.data shards:               "
        f"{figures['shards_images_per_s_per_worker']:7.1f} images/s per worker"
    )
    print(
        f"  speedup {figures['speedup']:.2f}x (goal >= {GOAL}x: "
        f"{'met' if figures['goal_met'] else 'MISSED'})"
    )
    return figures
