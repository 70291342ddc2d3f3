"""The laptop demo's steps (``python -m pipeline.demo``, ``make demo``).

Shards on the local disk, a Ray head on 127.0.0.1 with token authentication (or the one already
answering on the demo's dashboard port, which must take this user's token), the pretraining run
and a scratch baseline submitted as Ray jobs, and the scheduler finetuning every checkpoint
milestone on the tasks in ``jobs/finetune``. Everything lands in one output folder; running it
again reuses what is already finished.
"""

from __future__ import annotations

import logging
import shlex
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
from pipeline.run.schedule import Policy, open_scheduler, watch
from pipeline.tracking import TAG_KIND

log = logging.getLogger(__name__)

DASHBOARD_PORT = 8265
DASHBOARD_URL = f"http://127.0.0.1:{DASHBOARD_PORT}"
EXPERIMENT = "nfnet-demo"  # tracking.experiment of configs/demo.yaml and the finetune recipe
PRETRAIN_CONFIG = "configs/demo.yaml"
STOP_GRACE_S = 15.0  # for the head's processes to exit on SIGTERM before they are killed
SCRATCH_CONFIG = "configs/finetune/digits.yaml"


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


def run_jobs(out: Path, shapes: str, digits: str, every: int) -> str:
    """Submit pretraining and the scratch baseline, finetune every milestone; the pretraining
    run's MLflow id. A failed job raises DemoError."""
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
    scratch_job = client.submit_job(entrypoint=shlex.join(scratch), entrypoint_num_cpus=0.5)
    scheduler = open_scheduler(
        run_id, ROOT / "jobs/finetune", tracking_uri(out), DASHBOARD_URL, Policy(every=every)
    )
    code = watch(scheduler, poll=10)
    while job_state(client.get_job_status(scratch_job)) not in RAY_JOB_ENDED:
        time.sleep(5)
    if code != 0 or job_state(client.get_job_status(scratch_job)) not in RAY_JOB_SUCCEEDED:
        log.error(client.get_job_logs(scratch_job)[-3000:])
        raise DemoError("a demo job failed (see above and `ray job logs`)")
    return run_id


def best_top1(uri: str, experiment: str) -> dict[str, float]:
    """The best digits validation top-1 of the finished finetune and scratch runs."""
    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    runs = client.search_runs([found.experiment_id], "attributes.status = 'FINISHED'")
    best = {"finetune": 0.0, "scratch": 0.0}
    for run in runs:
        kind = run.data.tags.get(TAG_KIND)
        if kind in best:
            best[kind] = max(best[kind], run.data.metrics.get("val/top1", 0.0))
    return best


def summary(out: Path, run_id: str, minutes: float) -> str:
    """The demo's closing lines: the margin of finetuned over scratch, where to look next."""
    uri = tracking_uri(out)
    best = best_top1(uri, EXPERIMENT)
    return (
        f"\ndemo finished in {minutes:.1f} min\n"
        f"digits validation top-1: finetuned from pretraining {best['finetune']:.3f}, "
        f"scratch {best['scratch']:.3f} (margin {best['finetune'] - best['scratch']:+.3f})\n"
        f"plots: {out / 'plots'}\n"
        f"MLflow UI: mlflow ui --backend-store-uri {uri} --host 127.0.0.1  "
        f"(then open http://127.0.0.1:5000)\n"
        f"pretraining run: {run_id}"
    )
