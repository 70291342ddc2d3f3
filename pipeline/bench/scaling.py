"""``python -m pipeline.bench scaling``: images/s of 2 data-parallel workers against 1.

Each run is a real pretraining run (``python -m pipeline.pretrain``: Ray Train, DeepSpeed with
gloo, shards read by the streaming loader) of ``nfnet_micro`` at its 64 px on ``shapes`` shards,
with the same micro-batch per worker (weak scaling: 1 worker trains batch 32, 2 workers batch
64). Reported from the run's own MLflow metrics, the first log interval (warm-up) left out:
total images/s, the 2-vs-1 ratio, and the shares of step time spent waiting for data and in
DeepSpeed's gradient all-reduce. Over the same window, every process's CPU time is sampled
(``cpu_use``): the share of the machine's cores the training workers had, and what Ray's own
processes, the driver and everything else took beside them; and each worker's training thread:
how much of the window it was on a core, waiting for one, or blocked.

A single core's speed drifts by up to ~20 % over minutes on a shared machine, so one 1-worker
run against one 2-worker run is a noisy ratio. ``--pairs N`` runs N pairs (1 then 2 workers,
then 2 then 1, ...) and reports every pair's ratio, their median, their mean with its standard
error, and the ratio of the mean images/s.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from pipeline.bench.cpu_use import CpuSampler

ROOT = Path(__file__).resolve().parents[2]
STEAL = "taken by the hypervisor (steal)"
METRICS = ("train/images_per_s", "train/data_wait_fraction", "train/allreduce_fraction")


def run_once(
    workdir: Path, shards: str, workers: int, steps: int, options: argparse.Namespace
) -> dict[str, float]:
    """One pretraining run in a fresh folder of ``workdir`` (the same config in the same store
    would resume the finished run, not train again); the mean of each metric over its log
    intervals but the first."""
    from mlflow import MlflowClient

    workdir = Path(tempfile.mkdtemp(prefix=f"{workers}-workers-", dir=workdir))
    uri = f"sqlite:///{workdir}/mlflow.db"
    experiment = f"scaling-{workers}"
    overrides = [
        f"model.name={options.model}",
        f"data.train_url={shards}",
        f"data.train_resolution={options.resolution}",
        f"data.test_resolution={options.resolution}",
        f"data.loader_workers={options.loader_workers}",
        f"train.global_batch={options.micro_batch * workers}",
        f"train.micro_batch={options.micro_batch}",
        f"train.steps={steps}",
        f"train.log_every={max(steps // 6, 1)}",
        f"train.eval_every={steps * 10}",
        "train.time_allreduce=true",
        f"checkpoint.storage_url=file://{workdir}/runs",
        f"checkpoint.every_steps={steps}",
        f"tracking.uri={uri}",
        f"tracking.experiment={experiment}",
        f"scaling.num_workers={workers}",
    ]
    env = dict(os.environ, DS_ACCELERATOR="cpu")
    env.pop("RAY_ADDRESS", None)
    command = [sys.executable, "-m", "pipeline.pretrain", "--config", "configs/demo.yaml"]
    with CpuSampler(interval=2.0) as sampler:  # its own CPU use is a cost the 2 workers share
        subprocess.run([*command, *overrides], cwd=ROOT, env=env, check=True, capture_output=True)
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    figures: dict[str, Any] = {}
    logged: list[float] = []  # when each images/s value was logged
    for key in METRICS:
        history = sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)
        values = [m.value for m in history[1:]] or [m.value for m in history]
        figures[key] = statistics.fmean(values) if values else float("nan")
        if key == METRICS[0]:
            logged = [m.timestamp / 1000 for m in history]
    if len(logged) > 1:
        # The window the averages cover: from the end of the warm-up interval to the last.
        start, end = logged[0], logged[-1]
        seconds = sampler.by_role(start, end)
        seconds[STEAL] = sampler.steal_seconds(start, end)
        figures["cpu_share"] = {
            role: used / (sampler.cores * (end - start)) for role, used in seconds.items()
        }
        figures["training_thread"] = list(sampler.training_threads(start, end).values())
    figures["cores"] = sampler.cores
    return figures


def mean_and_standard_error(values: list[float]) -> tuple[float, float]:
    """The mean and its standard error (sample deviation / sqrt(n); 0 for one value)."""
    mean = statistics.fmean(values)
    error = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0
    return mean, error


def mean_figures(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The mean over repeated runs of one worker count: metrics, CPU shares, thread shares."""
    figures: dict[str, Any] = {key: statistics.fmean(run[key] for run in runs) for key in METRICS}
    shares = [run["cpu_share"] for run in runs if "cpu_share" in run]
    roles = {role for share in shares for role in share}
    figures["cpu_share"] = {
        role: statistics.fmean(share.get(role, 0.0) for share in shares) for role in roles
    }
    threads = [thread for run in runs for thread in run.get("training_thread", [])]
    if threads:
        figures["training_thread"] = {
            key: statistics.fmean(thread[key] for thread in threads) for key in threads[0]
        }
    figures["cores"] = runs[0]["cores"]
    return figures


def print_cpu_shares(results: dict[int, dict[str, Any]]) -> None:
    """The share of all cores each role used in each run's measured window."""
    roles = sorted({role for figures in results.values() for role in figures.get("cpu_share", {})})
    roles.sort(key=lambda role: (role == STEAL, role != "training workers"))
    header = "".join(f"{f'{w} worker' + ('s' if w > 1 else ''):>12}" for w in results)
    cores = next(iter(results.values()))["cores"]
    print(f"share of the machine's {cores} cores used, measured window:")
    print(f"{'':<32}{header}")
    for role in roles:
        row = "".join(f"{results[w].get('cpu_share', {}).get(role, 0.0):>12.1%}" for w in results)
        print(f"{role:<32}{row}")
    idle = "".join(f"{1 - sum(results[w].get('cpu_share', {}).values()):>12.1%}" for w in results)
    print(f"{'idle':<32}{idle}")


THREAD_ROWS = (
    ("on its core", "on_core"),
    ("runnable, waiting for the core", "waiting"),
    ("blocked (all-reduce, I/O, GIL)", "blocked"),
)


def print_thread_shares(results: dict[int, dict[str, Any]]) -> None:
    """Where each worker's training thread spent the measured window (mean over workers)."""
    if not all("training_thread" in figures for figures in results.values()):
        return  # no per-thread scheduler counters on this system
    print("each worker's training thread, measured window:")
    for label, key in THREAD_ROWS:
        row = "".join(f"{results[w]['training_thread'][key]:>12.1%}" for w in results)
        print(f"{label:<32}{row}")


def main(argv: list[str]) -> dict:
    """Run 1 then 2 workers (``--pairs`` times) and print the scaling report."""
    parser = argparse.ArgumentParser(prog="python -m pipeline.bench scaling")
    parser.add_argument("--steps", type=int, default=400, help="optimizer steps per run")
    parser.add_argument("--model", default="nfnet_micro", help="a small variant")
    parser.add_argument("--resolution", type=int, default=64, help="nfnet_micro's own: 64 px")
    parser.add_argument("--micro-batch", type=int, default=32, help="per worker (weak scaling)")
    parser.add_argument(
        "--loader-workers",
        type=int,
        default=0,
        help="loader processes per worker; 0 decodes in the worker's own process, so a worker "
        "uses exactly its one CPU (scaling.cpus_per_worker=1)",
    )
    parser.add_argument(
        "--pairs", type=int, default=3, help="pairs of a 1- and a 2-worker run, order alternating"
    )
    parser.add_argument(
        "--data", choices=("shards", "synthetic"), default="shards", help="synthetic: no decoding"
    )
    args, _ = parser.parse_known_args(argv)
    if args.pairs < 1:
        parser.error(f"--pairs must be at least 1, not {args.pairs}")  # exit code 2
    # deferred (both): the data package loads torch, which the argument checks do not need
    from pipeline.data.sources import shapes  # deferred with the line above
    from pipeline.data.writer import write_shards  # deferred with the line above

    with tempfile.TemporaryDirectory(prefix="bench-scaling-") as folder:
        workdir = Path(folder)
        if args.data == "synthetic":
            shards = f"synthetic://?samples=4000&resolution={args.resolution}&classes=10&seed=0"
        else:
            shards = f"file://{workdir}/shapes"
            images = shapes(4000, args.resolution, seed=0)
            write_shards(images, shards, samples_per_shard=500, progress=False)
        print(
            f"{args.model} at {args.resolution} px, {args.micro_batch} images per worker per step, "
            f"{args.data}, {args.loader_workers} loader processes per worker, 1 CPU per worker, "
            f"{args.steps} steps per run, {args.pairs} pair(s) of runs",
            flush=True,
        )
        runs: dict[int, list[dict[str, Any]]] = {1: [], 2: []}
        ratios = []
        for pair in range(1, args.pairs + 1):
            # 1, 2, then 2, 1, ...: a drift in the machine's speed favours neither count.
            for workers in (1, 2) if pair % 2 else (2, 1):
                runs[workers].append(run_once(workdir, shards, workers, args.steps, args))
            one, two = (runs[w][-1]["train/images_per_s"] for w in (1, 2))
            ratios.append(two / one)
            print(
                f"pair {pair}/{args.pairs}: 1 worker {one:.1f} images/s, 2 workers {two:.1f}: "
                f"{two / one:.2f}x",
                flush=True,
            )
    results = {w: mean_figures(runs[w]) for w in (1, 2)}
    print(f"mean over {args.pairs} pair(s):")
    print(f"{'workers':>8} {'images/s':>10} {'data wait':>10} {'all-reduce':>11}")
    for workers, figures in results.items():
        print(
            f"{workers:>8} {figures['train/images_per_s']:>10.1f} "
            f"{figures['train/data_wait_fraction']:>10.1%} "
            f"{figures['train/allreduce_fraction']:>11.1%}"
        )
    print_cpu_shares(results)
    print_thread_shares(results)
    median = statistics.median(ratios)
    of_means = results[2]["train/images_per_s"] / results[1]["train/images_per_s"]
    shown = ", ".join(f"{ratio:.2f}x" for ratio in ratios)
    mean, error = mean_and_standard_error(ratios)
    spread = f" ± {error:.2f} (standard error)" if len(ratios) > 1 else ""
    print(
        f"2 workers / 1 worker: {shown}; median {median:.2f}x, mean {mean:.2f}x{spread}, "
        f"ratio of the mean images/s {of_means:.2f}x (goal >= 1.6x)"
    )
    return {
        "ratio_2_over_1": median,
        "mean_ratio": mean,
        "mean_ratio_standard_error": error,
        "ratio_of_means": of_means,
        "pair_ratios": ratios,
        "runs": {str(w): figures for w, figures in results.items()},
    }
