"""``python -m pipeline.bench upload``: a training step's time while a checkpoint uploads.

A checkpoint the size of ``nfnet_f0``'s (weights, momentum, EMA: ~860 MB; the parameters of a
freshly built model, no forward needed) is staged by the Trainer's own code
(``pipeline.train.checkpoint.stage``) and stored as a run stores it (``checkpoint.persist``
through ``checkpoint.upload_job``: a child process at ``--upload-nice`` copies it, with its
retries, into the folder of Ray Train's ``StorageContext``) into moto's S3 server over HTTP on
127.0.0.1, started by the bench. Meanwhile a small
model (``nfnet_nano``: forward, backward, SGD on one CPU batch) trains, in one run:

- ordinary: steps with no upload, before and after each upload;
- async: the upload runs in one background thread — as under ``checkpoint.async_upload``, where
  Ray Train's worker uploads in its single upload thread — and the steps go on; the figure is
  the mean step time during the upload over the mean ordinary step (goal: at most 1.1);
- sync: the step that checkpoints waits for the upload (``checkpoint.async_upload: false``).

The staging (``checkpoint/step_seconds`` of an async checkpoint), the upload seconds and the
training time each mode lost to the checkpoint are reported beside them. moto's server runs on
this machine, where it takes CPU from the steps that a remote object store would not: by default
it runs at nice 19 (``--store-nice``), taking only what the steps and the upload leave idle;
``--store-nice 0`` shows what sharing a small machine's cores with the store costs.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import socket
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import s3fs
import torch
import torch.nn.functional as F

from pipeline.bench.latency import _moto, _options
from pipeline.config import CheckpointSection
from pipeline.models import create_model
from pipeline.optim import SGD_AGC, ModelEma, param_groups
from pipeline.run.launch import storage_target
from pipeline.train import checkpoint as ckpt

GOAL = 1.1  # a step during an async upload costs at most 1.1 ordinary steps
BUCKET = "bench-upload"


def checkpoint_parts(name: str):
    """Model, optimizer with a momentum buffer per parameter, and EMA of the variant ``name``."""
    torch.manual_seed(0)
    model = create_model(name, num_classes=1000)
    optimizer = SGD_AGC(param_groups(model, 2e-5, 0.01), lr=0.1)  # DM: lambda 0.01 at 4096
    for group in optimizer.param_groups:
        for parameter in group["params"]:
            optimizer.state[parameter]["momentum_buffer"] = torch.randn_like(parameter)
    return model, optimizer, ModelEma(model)


def step_fn(resolution: int, batch: int) -> Callable[[], float]:
    """One nfnet_nano training step on a fixed CPU batch; returns its seconds."""
    torch.manual_seed(0)
    model = create_model("nfnet_nano", num_classes=10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    images = torch.randn(batch, 3, resolution, resolution)
    labels = torch.randint(0, 10, (batch,))

    def step() -> float:
        tick = time.perf_counter()
        loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return time.perf_counter() - tick

    return step


def steps_for(step: Callable[[], float], seconds: float) -> list[float]:
    """Step times for about ``seconds``."""
    times: list[float] = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        times.append(step())
    return times


class Store:
    """Ray Train's storage of checkpoints under ``s3://BUCKET/runs/bench`` on the moto server."""

    def __init__(self, endpoint: str, upload_nice: int) -> None:
        from ray.train.v2._internal.execution.storage import StorageContext

        options = self.options = _options(endpoint)
        self.upload_nice = upload_nice
        s3fs.S3FileSystem(**options).mkdir(BUCKET)
        path, filesystem = storage_target(f"s3://{BUCKET}/runs", options)
        self.url = f"s3://{BUCKET}/runs/bench"
        self.storage = StorageContext(path, "bench", filesystem)
        self.count = 0

    def whole(self) -> int:
        """How many stored checkpoints hold every file a checkpoint has."""
        from pyarrow.fs import FileSelector

        expected = {*ckpt.WEIGHTS_FILES.values(), "optimizer.safetensors", ckpt.STATE_FILE}
        count = 0
        for index in range(1, self.count + 1):
            path = self.storage.build_checkpoint_path_from_name(f"step_{index:09d}")
            infos = self.storage.storage_filesystem.get_file_info(FileSelector(path))
            count += {info.base_name for info in infos} == expected
        return count

    def job(self, staged: str) -> Callable[[], float]:
        """The upload of the folder ``staged`` as a new checkpoint: returns its seconds."""
        import ray.train

        self.count += 1
        name = f"step_{self.count:09d}"
        checkpoint = ray.train.Checkpoint.from_directory(staged)
        upload = ckpt.Upload(self.count)

        def run() -> float:
            ckpt.upload_job(
                upload,
                lambda: ckpt.persist(
                    self.storage, checkpoint, name, self.url, self.options, self.upload_nice
                ),
            )
            shutil.rmtree(staged, ignore_errors=True)  # as Ray Train does after an upload
            return upload.seconds

        return run


def measure(
    variant: str,
    resolution: int,
    batch: int,
    window: float,
    store_nice: int = 19,
    upload_nice: int = CheckpointSection().upload_nice,
) -> dict[str, float]:
    """Ordinary, async-upload and sync-upload step times and the checkpoint's costs; with the
    CPU seconds moto's server spent during the async upload (a remote store spends none of
    this machine's)."""
    import psutil

    model, optimizer, ema = checkpoint_parts(variant)
    state = {"step": 1, "run_id": None}
    step = step_fn(resolution, batch)
    steps_for(step, window / 2)  # warm-up
    sock = socket.create_server(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    moto = _moto(port, store_nice)
    figures: dict[str, float] = {}
    try:
        store = Store(f"http://127.0.0.1:{port}", upload_nice)
        ordinary = steps_for(step, window)
        # async: staged at the step boundary, uploaded by one background thread
        tick = time.perf_counter()
        staged = ckpt.stage(model, optimizer, ema, state)
        figures["stage_s"] = time.perf_counter() - tick
        figures["checkpoint_bytes"] = float(sum(p.stat().st_size for p in Path(staged).iterdir()))
        server = psutil.Process(moto.pid)  # `nice` execs the server: the same process
        before = sum(server.cpu_times()[:2])
        process_before, steps_before = time.process_time(), time.thread_time()
        children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
        with ThreadPoolExecutor(max_workers=1) as pool:
            future = pool.submit(store.job(staged))
            during = [step()]
            while not future.done():
                during.append(step())
            figures["async_upload_s"] = future.result()
        figures["store_cpu_s"] = sum(server.cpu_times()[:2]) - before
        children = resource.getrusage(resource.RUSAGE_CHILDREN)  # the ended upload process
        figures["upload_process_cpu_s"] = (children.ru_utime + children.ru_stime) - (
            children_before.ru_utime + children_before.ru_stime
        )
        # The training process's CPU beyond its stepping thread's: the upload thread, which
        # waits for the upload process.
        figures["upload_threads_cpu_s"] = (time.process_time() - process_before) - (
            time.thread_time() - steps_before
        )
        ordinary += steps_for(step, window)
        # sync: the checkpointing step stages, uploads, then steps
        tick = time.perf_counter()
        store.job(ckpt.stage(model, optimizer, ema, state))()
        step()
        figures["sync_step_s"] = time.perf_counter() - tick
        ordinary += steps_for(step, window)
        figures["stored_whole"] = float(store.whole())
    finally:
        moto.terminate()
        moto.wait()
    mean_ordinary = statistics.mean(ordinary)
    figures |= {
        "ordinary_step_ms": 1e3 * mean_ordinary,
        "ordinary_step_ms_median": 1e3 * statistics.median(ordinary),
        "async_step_ms": 1e3 * statistics.mean(during),
        "async_step_ms_median": 1e3 * statistics.median(during),
        "async_steps": float(len(during)),
        "async_vs_ordinary": statistics.mean(during) / mean_ordinary,
        "async_vs_ordinary_median": statistics.median(during) / statistics.median(ordinary),
        "sync_vs_ordinary": figures["sync_step_s"] / mean_ordinary,
        # Training time the checkpoint cost: async, the staging plus what the steps during the
        # upload took beyond ordinary steps; sync, the checkpointing step beyond an ordinary one.
        "async_lost_s": figures["stage_s"] + sum(during) - len(during) * mean_ordinary,
        "sync_lost_s": figures["sync_step_s"] - mean_ordinary,
    }
    return figures


def main(argv: list[str]) -> dict:
    """Run the measurement, print the report and return the figures."""
    parser = argparse.ArgumentParser(prog="python -m pipeline.bench upload")
    parser.add_argument("--variant", default="nfnet_f0", help="the checkpoint's model")
    parser.add_argument("--resolution", type=int, default=64, help="nfnet_nano steps' images")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the steps")
    parser.add_argument("--window", type=float, default=10.0, help="seconds of ordinary steps")
    parser.add_argument("--smoke", action="store_true", help="nfnet_nano's checkpoint, seconds")
    parser.add_argument(
        "--store-nice", type=int, default=19,
        help="run moto's server at this nice level (19: it takes only CPU the steps leave idle, "
        "as a remote store takes none of this machine's)",
    )  # fmt: skip
    parser.add_argument(
        "--upload-nice", type=int, default=CheckpointSection().upload_nice,
        help="checkpoint.upload_nice: the upload process's nice level",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.smoke:
        args.variant, args.resolution, args.batch, args.window = "nfnet_nano", 32, 4, 1.0
    torch.set_num_threads(args.threads)
    figures = measure(
        args.variant, args.resolution, args.batch, args.window, args.store_nice, args.upload_nice
    )
    figures["goal"] = GOAL
    figures["goal_met"] = figures["async_vs_ordinary"] <= GOAL
    size = figures["checkpoint_bytes"] / 1e6
    print(
        f"checkpoint of {args.variant} ({size:.0f} MB: weights, momentum, EMA) to moto's S3 on "
        f"127.0.0.1; steps of nfnet_nano, batch {args.batch} at {args.resolution} px, "
        f"{args.threads} torch thread(s)"
    )
    print(f"  ordinary step:             {figures['ordinary_step_ms']:8.1f} ms")
    print(
        f"  step during async upload:  {figures['async_step_ms']:8.1f} ms  "
        f"({figures['async_vs_ordinary']:.2f}x; median {figures['async_vs_ordinary_median']:.2f}x;"
        f" {figures['async_steps']:.0f} steps in {figures['async_upload_s']:.1f} s of upload)"
    )
    print(
        f"  checkpointing step, sync:  {1e3 * figures['sync_step_s']:8.1f} ms  "
        f"({figures['sync_vs_ordinary']:.0f}x)"
    )
    print(f"  staging (blocks the step): {1e3 * figures['stage_s']:8.1f} ms")
    print(
        f"  moto's server (nice {args.store_nice}) during the async upload: "
        f"{figures['store_cpu_s']:.1f} CPU-s in {figures['async_upload_s']:.1f} s; the upload "
        f"process (nice {args.upload_nice}) {figures['upload_process_cpu_s']:.1f} CPU-s, the "
        f"training process's other threads {figures['upload_threads_cpu_s']:.1f} CPU-s"
    )
    print(
        f"  training time lost to the checkpoint: async {figures['async_lost_s']:.1f} s "
        f"(staging and slower steps), sync {figures['sync_lost_s']:.1f} s"
    )
    verdict = "met" if figures["goal_met"] else "missed"
    print(f"  goal: async <= {GOAL}x an ordinary step: {verdict}")
    return figures
