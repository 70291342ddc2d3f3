"""``python -m pipeline.bench shards``: shard conversion images/s, ours against a plain loop.

The source is an ImageFolder tree of JPEGs of ImageNet-like sizes (224 to 448 px a side, shapes
on noisy backgrounds) on the local disk; every side writes shards of 128 images of it to the disk:
- peer: the plain single-process loop webdataset's documentation shows, file bytes read and
  handed to ``webdataset.ShardWriter`` as they are (nothing decoded, nothing checked);
- peer + check: the same loop opening and decoding each image with PIL before writing it (what
  it takes for that loop to catch the corrupt images ours leaves out);
- ours: ``write_shards`` in this process (every image decoded once, the JPEG bytes kept);
- ours on Ray: the same write as one Ray task per shard on a local cluster of ``--workers`` CPUs.
Rounds alternate the sides; figures are medians over rounds of images per wall second and per
CPU second (this process's threads and its Ray workers): the per-core rate, which load from
other processes barely moves. The wall speed-up of the Ray workers needs a free core each; the
speed-up they would give with one is reported beside it, from their CPU time per image. Goals:
ours per core at least the plain loop's rate; 2 Ray workers at least 1.8x one process.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import psutil
import webdataset as wds
from PIL import Image

from pipeline.data.imagefolder import imagefolder
from pipeline.data.parallel import start_ray
from pipeline.data.sources import encode_jpeg, render_shape
from pipeline.data.writer import write_shards

SPEEDUP_GOAL = 1.8


def make_tree(root: Path, images: int, classes: int = 10) -> list[tuple[Path, int]]:
    """``images`` JPEGs in ``classes`` folders, sides 224..448 px; returns (path, label)."""
    files = []
    for index in range(images):
        label, side = index % classes, 224 + (index * 37) % 225
        path = root / f"class_{label:02d}" / f"{index:06d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(encode_jpeg(render_shape(label, side, seed=0, index=index)))
        files.append((path, label))
    return sorted(files)


def plain_loop(files: list[tuple[Path, int]], out: Path, per_shard: int, check: bool) -> None:
    """webdataset's own recipe: read each file, write its bytes (``check``: decode it first)."""
    out.mkdir(parents=True)
    with wds.ShardWriter(str(out / "peer-%06d.tar"), maxcount=per_shard, verbose=0) as sink:
        for index, (path, label) in enumerate(files):
            data = path.read_bytes()
            if check:
                with Image.open(io.BytesIO(data)) as image:
                    image.load()
            sink.write({"__key__": f"{index:09d}", "jpg": data, "cls": str(label).encode()})


def _ray_workers_cpu_s() -> float:
    """CPU seconds so far of this process's Ray workers (titled ``ray::<task>`` or
    ``ray::IDLE``; Ray's agents excluded)."""
    total = 0.0
    for process in psutil.Process().children(recursive=True):
        try:
            title = " ".join(process.cmdline())
            if title.startswith("ray::") and "Agent" not in title:
                times = process.cpu_times()
                total += times.user + times.system
        except psutil.Error:  # gone meanwhile
            pass
    return total


def _measure(images: int, run: Callable[[], object]) -> tuple[float, float]:
    """(images per wall second, images per CPU second of this process, all its threads, and
    of its Ray workers)."""
    wall, cpu = time.perf_counter(), time.process_time() + _ray_workers_cpu_s()
    run()
    cpu_s = time.process_time() + _ray_workers_cpu_s() - cpu
    return images / (time.perf_counter() - wall), images / cpu_s


def main(argv: list[str]) -> dict:
    """Run the comparison, print the report and return the figures."""
    parser = argparse.ArgumentParser(prog="python -m pipeline.bench shards")
    parser.add_argument("--images", type=int, default=1536, help="JPEGs in the source tree")
    parser.add_argument("--samples-per-shard", type=int, default=128)
    parser.add_argument("--workers", type=int, default=2, help="CPUs of the local Ray cluster")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    per_shard = args.samples_per_shard
    sides = ("plain", "plain_check", "ours", "ours_ray")
    rates: dict[str, list[tuple[float, float]]] = {name: [] for name in sides}
    with tempfile.TemporaryDirectory(prefix="bench-shards-") as folder:
        tmp = Path(folder)
        files = make_tree(tmp / "tree", args.images)
        source = imagefolder(str(tmp / "tree"))
        start_ray(args.workers)  # started, and its workers warmed up, before any timing
        warm_up = f"file://{tmp}/warm-up"
        write_shards(source, warm_up, samples_per_shard=per_shard, progress=False, use_ray=True)
        for round_index in range(args.rounds):
            out = tmp / f"round-{round_index}"
            runs = {
                "plain": partial(plain_loop, files, out / "plain", per_shard, False),
                "plain_check": partial(plain_loop, files, out / "plain_check", per_shard, True),
            }
            for name, use_ray in (("ours", False), ("ours_ray", True)):
                runs[name] = partial(
                    write_shards,
                    source,
                    f"file://{out}/{name}",
                    samples_per_shard=per_shard,
                    val_samples=0,
                    progress=False,
                    use_ray=use_ray,
                )
            for name, run in runs.items():
                rates[name].append(_measure(args.images, run))
    figures = {}
    for name, measured in rates.items():
        figures[f"{name}_images_per_s"] = statistics.median(wall for wall, _ in measured)
        figures[f"{name}_images_per_cpu_s"] = statistics.median(cpu for _, cpu in measured)
    figures["ours_vs_plain_per_core"] = (
        figures["ours_images_per_cpu_s"] / figures["plain_images_per_cpu_s"]
    )
    figures["ours_vs_plain_check_per_core"] = (
        figures["ours_images_per_cpu_s"] / figures["plain_check_images_per_cpu_s"]
    )
    figures["ray_speedup"] = figures["ours_ray_images_per_s"] / figures["ours_images_per_s"]
    # What the workers would give with a core each: their work per image against one process's.
    figures["ray_speedup_core_each"] = args.workers * (
        figures["ours_ray_images_per_cpu_s"] / figures["ours_images_per_cpu_s"]
    )
    figures["workers"] = args.workers
    figures["load_average"] = os.getloadavg()[0]
    print(
        f"{args.images} JPEGs of 224-448 px -> {per_shard}-image shards on local disk, "
        f"median of {args.rounds} rounds, load average {figures['load_average']:.2f}"
    )
    for name, label in (
        ("plain", "plain ShardWriter loop (bytes copied)"),
        ("plain_check", "plain loop + PIL decode of each image"),
        ("ours", "write_shards, 1 process (decoded, bytes kept)"),
        ("ours_ray", f"write_shards, {args.workers} Ray workers"),
    ):
        print(
            f"  {label:46s} {figures[f'{name}_images_per_s']:8.1f} images/s, "
            f"{figures[f'{name}_images_per_cpu_s']:8.1f} per CPU second"
        )
    per_core_met = figures["ours_vs_plain_per_core"] >= 1
    print(
        f"  ours per CPU second vs the plain loop: {figures['ours_vs_plain_per_core']:.2f}x "
        f"(goal >= 1x: {'met' if per_core_met else 'MISSED'}; vs the loop that decodes too: "
        f"{figures['ours_vs_plain_check_per_core']:.2f}x)"
    )
    met = figures["ray_speedup"] >= SPEEDUP_GOAL
    print(
        f"  {args.workers} Ray workers vs 1 process: {figures['ray_speedup']:.2f}x "
        f"(goal >= {SPEEDUP_GOAL}x: {'met' if met else 'MISSED'}); with a core each, from "
        f"their CPU time per image: {figures['ray_speedup_core_each']:.2f}x"
    )
    return figures
