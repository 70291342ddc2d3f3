"""``python -m pipeline.bench e2e``: ``pipeline.pretrain`` end to end against timm's ``train.py``.

Both commands run as a new user runs them, on the same shards (timm reads the shards'
``_info.json`` as its ``wds/`` dataset): ``nfnet_f0`` (timm: ``dm_nfnet_f0``) at 64 px, batch 32,
SGD with AGC λ 0.01, the EMA, label smoothing, the variant's dropout and stochastic depth, no
MixUp, CutMix or RandAugment, fp32, one worker with 2 CPUs and one loader process, ``--steps``
steps (one epoch), then each one's own end: evaluation of the raw and EMA weights, a checkpoint,
and (ours) the weights published to MLflow. Each logs every step; each run is timed from outside,
by when its step lines arrive: the time to the first step, the steady-state images/s (after the
first tenth of the steps), the time from the last step to the exit, and the total. Pairs of runs
alternate their order, so a drift in the machine's speed favours neither, and the ratio is the
median of the pairs' ratios. The 1-minute load average is printed with every run.

timm's ``train.py`` lives in timm's repository, not in its package: ``--timm-train PATH`` names it
(a checkout of huggingface/pytorch-image-models matching the installed timm). Without it the peer
is what a Ray Train worker runs, in one process without Ray (``python -m pipeline.bench.e2e
--config ...``: the same preflight, MLflow run and Trainer, no checkpoint), labelled so: that
pair measures what Ray costs, not what timm does.

``--against PATH`` makes the peer ``pipeline.pretrain`` of another checkout (the last commit, say):
the pair then measures a change of ours.

``--cpu`` adds, per run, the share of the machine's cores each role of the run's processes used
in the steady window (``cpu_use``): the training worker, Ray's own processes, the driver.

``--smoke``: ``nfnet_nano`` at 32 px, batch 8, 4 steps, one pair, in seconds: our command's exact
config goes through the preflight, and both sides train without Ray (a Ray cluster's start alone
takes longer than the smoke), or timm's train.py is the peer when ``--timm-train`` is given.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
import yaml

from pipeline.bench.cpu_use import CpuSampler

ROOT = Path(__file__).resolve().parents[2]
OURS, TIMM, WITHOUT_RAY = "pipeline.pretrain", "timm train.py", "pipeline without Ray"
CLIPPING = 0.01  # DM experiment_nfnets.py: λ = 0.01
OUR_STEP_LINE = re.compile(r"\bstep (\d+)/\d+\b")  # the progress line, after the step
TIMM_STEP_LINE = re.compile(r"\bTrain: \d+ \[\s*(\d+)/\d+")  # counts from 0, after the step


@dataclasses.dataclass(frozen=True)
class Setting:
    """What each run trains."""

    model: str
    timm_model: str
    resolution: int
    batch: int
    steps: int
    val_samples: int
    cpus: int = 2
    loader_workers: int = 1


@dataclasses.dataclass
class Run:
    """One command's run, timed from outside: when each step's line arrived, in seconds."""

    label: str
    batch: int
    arrivals: dict[int, float] = dataclasses.field(default_factory=dict)
    started: float = 0.0  # epoch seconds
    total: float = math.nan
    load: tuple[float, float] = (math.nan, math.nan)  # 1-minute load average, before and after
    family: set[int] = dataclasses.field(default_factory=set)  # the command's processes

    @property
    def last(self) -> int:
        return max(self.arrivals)

    @property
    def warm(self) -> int:
        """The step the steady state is measured from: past the first tenth, at least 2."""
        return max(2, self.last // 10)

    def images_per_s(self) -> float:
        span = self.arrivals[self.last] - self.arrivals[self.warm]
        return (self.last - self.warm) * self.batch / span if span > 0 else math.nan

    def figures(self) -> dict[str, Any]:
        return {
            "images_per_s": self.images_per_s(),
            "first_step_s": self.arrivals.get(1, math.nan),
            "exit_after_last_step_s": self.total - self.arrivals[self.last],
            "total_s": self.total,
            "load_average": list(self.load),
        }


def ours_config(setting: Setting, shards: str) -> dict[str, Any]:
    """The run config of our side; each run adds its own checkpoint folder and MLflow store."""
    size = setting.resolution
    return {
        "model": {"name": setting.model},
        "data": {
            "train_url": shards,
            "train_resolution": size,
            "test_resolution": size,
            "mixup_alpha": 0.0,
            "cutmix": False,
            "randaugment_layers": 0,
            "loader_workers": setting.loader_workers,
        },
        "optim": {"clipping": CLIPPING},
        "train": {
            "global_batch": setting.batch,
            "micro_batch": setting.batch,
            "steps": setting.steps,
            "precision": "fp32",
            "log_every": 1,
            "eval_every": setting.steps,
        },
        "checkpoint": {"every_steps": setting.steps},
        "tracking": {"experiment": "bench-e2e"},
        "scaling": {"num_workers": 1, "cpus_per_worker": setting.cpus},
    }


def run_store(folder: Path) -> list[str]:
    """Overrides that give a run its own checkpoint folder and MLflow store in ``folder``."""
    return [f"checkpoint.storage_url=file://{folder}/runs", f"tracking.uri=sqlite:///{folder}/db"]


@dataclasses.dataclass(frozen=True)
class Side:
    """One side of a pair: its name, its command (a run adds its own folder), its step lines."""

    name: str
    command: tuple[str, ...]
    timm: bool = False
    checkout: Path = ROOT  # where it runs: its pipeline package is the one imported

    def run_command(self, folder: Path) -> list[str]:
        if self.timm:
            return [*self.command, "--output", str(folder)]
        return [*self.command, *run_store(folder)]

    def step(self, line: str) -> int | None:
        """The step a line of this side's output reports done, if it is a step line."""
        match = (TIMM_STEP_LINE if self.timm else OUR_STEP_LINE).search(line)
        return None if match is None else int(match[1]) + self.timm


def timm_side(train_py: Path, setting: Setting, config: Any, plan: Any) -> Side:
    """timm's train.py with our config's recipe (its lr, λ, EMA decay, smoothing, dropout)."""
    optim = config.optim
    command = (
        sys.executable, str(train_py), "--data-dir", config.data.train_url.removeprefix("file://"),
        "--dataset", "wds/shards", "--train-split", "train", "--val-split", "validation",
        "--train-num-samples", str(setting.steps * setting.batch),
        "--val-num-samples", str(setting.val_samples), "--num-classes", str(plan.num_classes),
        "--model", setting.timm_model, "--img-size", str(setting.resolution),
        "-b", str(setting.batch), "--opt", "sgd", "--lr", str(plan.peak_lr),
        "--momentum", str(optim.momentum), "--weight-decay", str(optim.weight_decay),
        "--clip-grad", str(plan.clipping), "--clip-mode", "agc",
        "--model-ema", "--model-ema-decay", str(optim.ema_decay),
        "--smoothing", str(optim.label_smoothing),
        "--drop", str(plan.drop_rate), "--drop-path", str(plan.stochdepth_rate),
        "--color-jitter", "0",  # ours has no colour jitter
        "-j", str(setting.loader_workers), "--device", "cpu", "--epochs", "1",
        "--log-interval", "1",
    )  # fmt: skip
    return Side(TIMM, command, timm=True)


def sides(args: argparse.Namespace, setting: Setting, config_path: Path, checked) -> list[Side]:
    """Ours (``pipeline.pretrain``; in the smoke, without Ray) and the peer."""
    config = ("--config", str(config_path))
    alone = Side(WITHOUT_RAY, (sys.executable, "-m", "pipeline.bench.e2e", *config))
    if args.timm_train:
        peer = timm_side(args.timm_train, setting, *checked)
    elif args.against:
        command = (sys.executable, "-m", OURS, *config)
        peer = Side(f"{OURS} at {args.against}", command, checkout=args.against.resolve())
    else:
        peer = dataclasses.replace(alone, name=f"{WITHOUT_RAY} (again)") if args.smoke else alone
    ours = alone if args.smoke else Side(OURS, (sys.executable, "-m", OURS, *config))
    return [ours, peer]


def timed_run(side: Side, folder: Path, log_path: Path, setting: Setting) -> Run:
    """Run one side in ``folder``, its output into ``log_path``; when each step line arrived."""
    env = {name: value for name, value in os.environ.items() if name != "RAY_ADDRESS"}
    # No RAY_ADDRESS: the local Ray cluster is ours. Every side computes on setting.cpus threads.
    env |= {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": str(setting.cpus)}
    run = Run(side.name, setting.batch, load=(os.getloadavg()[0], math.nan))
    run.started = time.time()
    with (
        log_path.open("w") as log,
        subprocess.Popen(
            side.run_command(folder), cwd=side.checkout, env=env, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        ) as process,
    ):  # fmt: skip
        root = psutil.Process(process.pid)
        run.family.add(process.pid)
        for line in process.stdout:
            arrived = time.time() - run.started
            log.write(f"{arrived:8.2f} {line}")  # seconds after the start: where time goes
            log.flush()  # a stuck run's log shows where it stands
            if (step := side.step(line)) is not None:
                run.arrivals.setdefault(step, arrived)
            try:
                run.family.update(child.pid for child in root.children(recursive=True))
            except psutil.Error:  # the command is exiting
                pass
        code = process.wait()
    run.total = time.time() - run.started
    run.load = (run.load[0], os.getloadavg()[0])
    if code != 0 or 1 not in run.arrivals:
        tail = "".join(log_path.read_text().splitlines(keepends=True)[-30:])
        raise RuntimeError(f"{side.name} exited with {code} (log: {log_path}):\n{tail}")
    return run


def cpu_shares(sampler: CpuSampler, run: Run) -> dict[str, float]:
    """The share of all cores each role of ``run``'s processes used in its steady window."""
    start, end = run.started + run.arrivals[run.warm], run.started + run.arrivals[run.last]
    used: dict[str, float] = {}
    for pid, (role, seconds) in sampler.by_process(start, end).items():
        if pid in run.family:
            used[role] = used.get(role, 0.0) + seconds / (sampler.cores * (end - start))
    return dict(sorted(used.items(), key=lambda item: -item[1]))


def report(pair: list[Side], runs: list[list[Run]], ratios: list[float], shares: list) -> None:
    """Every run's figures by side, then the ratio of the steady-state rates."""
    for side, side_runs, side_shares in zip(pair, runs, shares, strict=True):
        figures = [run.figures() for run in side_runs]

        def joined(key: str, form: str, figures=figures) -> str:
            return ", ".join(format(figure[key], form) for figure in figures)

        loads = ", ".join(f"{a:.1f}→{b:.1f}" for a, b in (f["load_average"] for f in figures))
        print(
            f"{side.name}: {joined('images_per_s', '.2f')} images/s; first step after "
            f"{joined('first_step_s', '.1f')} s; exit {joined('exit_after_last_step_s', '.1f')} s "
            f"after the last step; {joined('total_s', '.0f')} s in all (load average {loads})"
        )
        for run_shares in side_shares:
            text = ", ".join(f"{role} {share:.1%}" for role, share in run_shares.items())
            print(f"  share of the machine's cores, steady window: {text}")
    shown = ", ".join(f"{ratio:.2f}x" for ratio in ratios)
    print(
        f"{pair[0].name} / {pair[1].name}, steady-state images/s: {shown}; "
        f"median {statistics.median(ratios):.2f}x"
    )


def main(argv: list[str]) -> dict:
    """Write the shards, run the pairs, print and return the figures."""
    parser = argparse.ArgumentParser(prog="python -m pipeline.bench e2e")
    parser.add_argument("--steps", type=int, default=120, help="optimizer steps per run")
    parser.add_argument("--pairs", type=int, default=3, help="pairs of runs, order alternating")
    peer = parser.add_mutually_exclusive_group()
    peer.add_argument("--timm-train", type=Path, help="timm's train.py (from its repository)")
    peer.add_argument("--against", type=Path, help="the peer: pipeline.pretrain of this checkout")
    parser.add_argument("--workdir", type=Path, help="keep shards and logs here (default: temp)")
    parser.add_argument("--cpu", action="store_true", help="CPU shares by process role")
    parser.add_argument("--smoke", action="store_true", help="nfnet_nano, 4 steps, seconds")
    args, _ = parser.parse_known_args(argv)
    if args.pairs < 1 or args.steps < 4:
        parser.error("--pairs must be at least 1 and --steps at least 4")  # exit code 2
    if args.timm_train and not args.timm_train.is_file():
        parser.error(f"--timm-train: no file {args.timm_train}")
    if args.against and not (args.against / "pipeline" / "pretrain.py").is_file():
        parser.error(f"--against: {args.against} holds no pipeline/pretrain.py")
    setting = Setting("nfnet_f0", "dm_nfnet_f0", 64, 32, args.steps, 64)
    if args.smoke:
        setting, args.pairs = Setting("nfnet_nano", "dm_nfnet_f0", 32, 8, 4, 16), 1
    folder = args.workdir or Path(tempfile.mkdtemp(prefix="bench-e2e-"))
    try:
        return measure(args, setting, folder)
    finally:
        if args.workdir is None:
            shutil.rmtree(folder, ignore_errors=True)


def measure(args: argparse.Namespace, setting: Setting, folder: Path) -> dict:
    """The pairs of runs on shards written into ``folder``; the figures."""
    # deferred (all): the data package loads torch and the preflight MLflow (seconds)
    from pipeline.data.sources import shapes  # deferred with the line above
    from pipeline.data.writer import write_shards  # deferred with the line above
    from pipeline.run.preflight import prepare  # deferred with the line above

    shards = folder / "shards"
    if not (shards / "_info.json").exists():
        source = shapes(setting.steps * setting.batch + setting.val_samples, setting.resolution, 0)
        write_shards(
            source, f"file://{shards}", samples_per_shard=500,
            val_samples=setting.val_samples, progress=False,
        )  # fmt: skip
    config_path = folder / "run.yaml"
    config_path.write_text(yaml.safe_dump(ours_config(setting, f"file://{shards}")))
    # Our command's config and overrides, checked as pipeline.pretrain checks them.
    checked = prepare(config_path, run_store(folder / "preflight"))
    pair = sides(args, setting, config_path, checked)
    print(
        f"{pair[0].name} vs {pair[1].name}: {setting.model} (timm: {setting.timm_model}) at "
        f"{setting.resolution} px, batch {setting.batch}, {setting.steps} steps, SGD + AGC "
        f"{CLIPPING}, EMA, label smoothing, fp32, 1 worker with {setting.cpus} CPUs, "
        f"{setting.loader_workers} loader process; {args.pairs} pair(s), order alternating",
        flush=True,
    )
    runs: list[list[Run]] = [[], []]
    ratios = []
    with CpuSampler(interval=2.0) if args.cpu else contextlib.nullcontext() as sampler:
        for number in range(1, args.pairs + 1):
            for index in (0, 1) if number % 2 else (1, 0):
                side = pair[index]
                name = re.sub(r"[^A-Za-z0-9.]+", "-", f"{number}-{side.name}")
                run_folder = folder / "runs" / name
                run_folder.mkdir(parents=True, exist_ok=True)
                runs[index].append(timed_run(side, run_folder, folder / f"{name}.log", setting))
                shutil.rmtree(run_folder, ignore_errors=True)  # checkpoints: gigabytes for F0
            ours, peer = (side_runs[-1].images_per_s() for side_runs in runs)
            ratios.append(ours / peer)
            print(
                f"pair {number}/{args.pairs}: {pair[0].name} {ours:.2f} images/s, "
                f"{pair[1].name} {peer:.2f}: {ratios[-1]:.2f}x",
                flush=True,
            )
    shares = [
        [cpu_shares(sampler, run) for run in side_runs] if args.cpu else [] for side_runs in runs
    ]
    report(pair, runs, ratios, shares)
    return {
        "sides": [side.name for side in pair],
        "ratio": statistics.median(ratios),
        "pair_ratios": ratios,
        "runs": {
            side.name: [run.figures() for run in r] for side, r in zip(pair, runs, strict=True)
        },
        "cpu_shares": {side.name: s for side, s in zip(pair, shares, strict=True)},
    }


def train_without_ray(argv: list[str]) -> int:
    """What a Ray Train worker runs, in this one process without Ray: the same preflight, MLflow
    run, thread count and Trainer as ``pipeline.pretrain``, but no checkpoint (there is no Ray
    Train to report one to) and no resuming."""
    parser = argparse.ArgumentParser(prog="python -m pipeline.bench.e2e")
    parser.add_argument("--config", required=True)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    # deferred (all): torch, DeepSpeed and MLflow take seconds to import
    import torch

    from pipeline import logs  # deferred with the line above
    from pipeline.bench.gpu import LocalTrainer, single_process_group  # deferred as above
    from pipeline.config import absolute_sqlite_uri  # deferred with the lines above
    from pipeline.run.launch import default_run_name, open_mlflow_run, run_url  # as above
    from pipeline.run.preflight import prepare  # deferred with the lines above
    from pipeline.tracking import TAG_KIND, end_run  # deferred with the lines above

    class TrainerWithoutRay(LocalTrainer):
        def save_checkpoint(self, *args, **kwargs) -> None:
            if self.logger is not None:
                self.logger.flush()

    logs.configure()
    config, plan = prepare(args.config, args.overrides)
    config.tracking.uri = absolute_sqlite_uri(config.tracking.uri)
    name = default_run_name(config, "pretrain")
    run_id, _ = open_mlflow_run(config, plan, name, {TAG_KIND: "pretrain"})
    torch.set_num_threads(max(1, int(config.scaling.cpus_per_worker)))
    with single_process_group(torch.device("cpu")):
        TrainerWithoutRay(config, plan, run_id, run_url(config, name)).train()
    end_run(config.tracking.uri, run_id)
    return 0


if __name__ == "__main__":
    sys.exit(train_without_ray(sys.argv[1:]))
