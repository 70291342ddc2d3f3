"""The laptop demo's steps (``python -m pipeline.demo``, ``make demo``).

Shards on the local disk, a Ray head on 127.0.0.1 with token authentication (or the one already
answering on the demo's dashboard port, which must take this user's token), the pretraining run
and scratch baselines submitted as Ray jobs, and the scheduler finetuning every checkpoint
milestone on the tasks in ``jobs/finetune``. The headline compares the final checkpoint's
finetune with scratch, each over ``HEADLINE_SEEDS`` seeds of the finetune (not the best of the
checkpoints against one draw). Everything lands in one output folder; running it again reuses
what is already finished.
"""

from __future__ import annotations

import logging
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mlflow import MlflowClient

from pipeline.config import load_config
from pipeline.run import ROOT
from pipeline.run.launch import RUN_ID_FILE, default_run_name
from pipeline.run.ray_cluster import (
    RAY_JOB_ENDED,
    RAY_JOB_FAILED,
    RAY_JOB_SUCCEEDED,
    job_client,
    job_state,
    ray_head_answers,
    stop_ray_processes,
)
from pipeline.run.schedule import Policy, finetune_argv, open_scheduler, watch
from pipeline.tracking import TAG_KIND, TAG_PRETRAIN_STEP

log = logging.getLogger(__name__)

DASHBOARD_PORT = 8265
DASHBOARD_URL = f"http://127.0.0.1:{DASHBOARD_PORT}"
EXPERIMENT = "nfnet-demo"  # tracking.experiment of configs/demo.yaml and the finetune recipe
PRETRAIN_CONFIG = "configs/demo.yaml"
STOP_GRACE_S = 15.0  # for the head's processes to exit on SIGTERM before they are killed
SCRATCH_CONFIG = "configs/finetune/digits.yaml"
HEADLINE_SEEDS = (0, 1, 2)  # train.seed of the final checkpoint's finetunes and of scratch


class DemoError(RuntimeError):
    """A demo job failed or did not start; the message says which and shows its log."""


def tracking_uri(out: Path) -> str:
    """The demo's MLflow store: a SQLite file in the output folder."""
    return f"sqlite:///{out}/mlflow.db"


def sh(*argv: str, env: dict | None = None) -> None:
    """Run a command from the repository root, echoing it; a failure raises."""
    log.info(f"$ {shlex.join(argv)}")
    subprocess.run(argv, env=env, check=True, cwd=ROOT)


def write_shards(out: Path, samples: int) -> tuple[str, str]:
    """Pretraining and downstream shards (skipped when complete: the writer resumes)."""
    shapes, digits = f"file://{out}/shards/shapes", f"file://{out}/shards/digits"
    write = [sys.executable, "-m", "pipeline.shards", "write"]
    sh(*write, "shapes", shapes, "--num-samples", str(samples), "--resolution", "64",
       "--samples-per-shard", "1000")  # fmt: skip
    sh(*write, "digits", digits, "--resolution", "64", "--samples-per-shard", "500")
    return shapes, digits


@contextmanager
def ray_head(env: dict[str, str]) -> Iterator[None]:
    """A Ray head on 127.0.0.1 for the demo's jobs, stopped afterwards (also when its start
    fails half-way); one that already answers on the dashboard port is used as it is and left
    running. ``env`` carries ``RAY_AUTH_MODE`` and where the token is (``local_ray_env``)."""
    if ray_head_answers(DASHBOARD_URL):
        log.info(f"using the Ray head already answering on 127.0.0.1:{DASHBOARD_PORT}")
        yield
        return
    temp_dir = tempfile.mkdtemp(prefix="ray-demo-")
    try:
        # 8 logical CPUs on 2 cores: pretraining (2 workers), a finetune and the scratch baseline
        # (1 driver + 2 workers each) run side by side and share the cores.
        sh("ray", "start", "--head", "--node-ip-address", "127.0.0.1",
           "--dashboard-host", "127.0.0.1", "--dashboard-port", str(DASHBOARD_PORT),
           "--num-cpus", "8", "--temp-dir", temp_dir, "--disable-usage-stats",
           env=env)  # fmt: skip
        yield
    finally:
        stop_ray_processes([temp_dir], grace=STOP_GRACE_S)
        log.info(f"stopped the demo's Ray head ({temp_dir})")


def wait_for_marker(path: Path, job_id: str, client, timeout: float = 600) -> str:
    """The MLflow run id the pretraining driver records next to its checkpoints."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            return path.read_text().strip()
        status = job_state(client.get_job_status(job_id))
        if status in RAY_JOB_FAILED:
            raise DemoError(f"pretraining job {job_id} {status}:\n{client.get_job_logs(job_id)}")
        time.sleep(1)
    raise DemoError(f"pretraining did not start within {timeout} s")


def _wait_for(client, jobs: list[str], what: str) -> None:
    """Wait until every job ended; DemoError with the first failed job's log otherwise."""
    while not all(job_state(client.get_job_status(job)) in RAY_JOB_ENDED for job in jobs):
        time.sleep(5)
    for job in jobs:
        if job_state(client.get_job_status(job)) not in RAY_JOB_SUCCEEDED:
            log.error(client.get_job_logs(job)[-3000:])
            raise DemoError(f"{what} job {job} failed (see above and `ray job logs {job}`)")


def _submit_seeded(client, argv: list[str], seed: int) -> str:
    """Submit a finetune (or scratch) command with ``train.seed``; its Ray job id."""
    return client.submit_job(
        entrypoint=shlex.join([*argv, f"train.seed={seed}"]), entrypoint_num_cpus=0.5
    )


def run_jobs(out: Path, shapes: str, digits: str, every: int) -> str:
    """Submit pretraining and the scratch baselines, finetune every milestone, then the final
    checkpoint with the other headline seeds; the pretraining run's MLflow id. A failed job
    raises DemoError."""
    client = job_client(DASHBOARD_URL)
    common = [f"checkpoint.storage_url=file://{out}/runs", f"tracking.uri={tracking_uri(out)}"]
    overrides = [f"data.train_url={shapes}", *common]
    pretrain = ["python", "-m", "pipeline.pretrain", "--config", PRETRAIN_CONFIG, *overrides]
    job = client.submit_job(entrypoint=shlex.join(pretrain))
    log.info(f"submitted pretraining as Ray job {job}: {shlex.join(pretrain)}")
    config = load_config(ROOT / PRETRAIN_CONFIG, overrides).with_absolute_paths()
    run_name = default_run_name(config, "pretrain")
    run_id = wait_for_marker(out / "runs" / run_name / RUN_ID_FILE, job, client)
    log.info(f"pretraining MLflow run: {run_id}")
    scratch = ["python", "-m", "pipeline.finetune", "--config", SCRATCH_CONFIG, "--from", "scratch",
               "--task", "digits", f"data.train_url={digits}", *common]  # fmt: skip
    scratch_jobs = [_submit_seeded(client, scratch, seed) for seed in HEADLINE_SEEDS]
    scheduler = open_scheduler(
        run_id, ROOT / "jobs/finetune", tracking_uri(out), DASHBOARD_URL, Policy(every=every)
    )
    if watch(scheduler, poll=10) != 0:
        raise DemoError("a scheduled finetune failed (see above and `ray job list`)")
    # The scheduler finetuned the final checkpoint with the recipe's seed; the other seeds here.
    final = [
        finetune_argv(
            task, run_id, config.train.steps, tracking_uri(out), EXPERIMENT, scheduler.model_name
        )
        for task in scheduler.tasks
    ]
    seeded = [_submit_seeded(client, argv, seed) for argv in final for seed in HEADLINE_SEEDS[1:]]
    _wait_for(client, scratch_jobs + seeded, "a headline finetune or scratch")
    return run_id


def headline_top1(uri: str, experiment: str) -> dict[str, list[float]]:
    """Digits validation top-1 of the finished runs: ``finetune`` from the latest checkpoint
    (one value per seed), ``scratch`` (per seed), ``step <n>`` for every other checkpoint."""
    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    runs = client.search_runs([found.experiment_id], "attributes.status = 'FINISHED'")
    by_start: dict[str, list[float]] = {}
    for run in runs:
        kind, top1 = run.data.tags.get(TAG_KIND), run.data.metrics.get("val/top1")
        if top1 is None or kind not in ("finetune", "scratch"):
            continue
        start = f"step {run.data.tags.get(TAG_PRETRAIN_STEP)}" if kind == "finetune" else kind
        by_start.setdefault(start, []).append(top1)
    steps = sorted((k for k in by_start if k.startswith("step ")), key=lambda k: int(k[5:]))
    if steps:
        by_start["finetune"] = by_start.pop(steps[-1])
        by_start["final step"] = [float(steps[-1][5:])]
    return by_start


def _spread(values: list[float]) -> str:
    if not values:
        return "-"
    mean = statistics.fmean(values)
    return f"{mean:.3f} ({min(values):.3f}-{max(values):.3f}, {len(values)} seeds)"


def summary(out: Path, run_id: str, minutes: float) -> str:
    """The demo's closing lines: the margin of finetuned over scratch, where to look next."""
    uri = tracking_uri(out)
    top1 = headline_top1(uri, EXPERIMENT)
    finetuned, scratch = top1.get("finetune", []), top1.get("scratch", [])
    margin = statistics.fmean(finetuned) - statistics.fmean(scratch) if finetuned and scratch else 0
    apart = (
        finetuned and scratch and (min(finetuned) > max(scratch) or max(finetuned) < min(scratch))
    )
    final = int(top1.get("final step", [0])[0])
    others = ", ".join(f"{k} {v[0]:.3f}" for k, v in top1.items() if k.startswith("step "))
    return (
        f"\ndemo finished in {minutes:.1f} min\n"
        f"digits validation top-1, mean (min-max): finetuned from the final checkpoint (step "
        f"{final}) {_spread(finetuned)}, scratch {_spread(scratch)}; margin {margin:+.3f}, "
        f"{'outside' if apart else 'within'} the spread of the seeds\n"
        f"finetuned from the earlier checkpoints (one seed): {others or '-'}\n"
        f"plots: {out / 'plots'}\n"
        f"MLflow UI: mlflow ui --backend-store-uri {uri} --host 127.0.0.1  "
        f"(then open http://127.0.0.1:5000)\n"
        f"pretraining run: {run_id}"
    )
