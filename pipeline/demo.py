"""``python -m pipeline.demo`` (what ``make demo`` runs): the whole mission on one laptop.

1. ``shapes`` shards for pretraining and ``digits`` shards for finetuning, on the local disk;
2. a Ray head on 127.0.0.1;
3. the pretraining run submitted as a Ray job (``configs/demo.yaml``);
4. the scheduler finetuning every checkpoint milestone on the tasks in ``jobs/finetune``, and a
   scratch baseline job;
5. ``pipeline.compare`` drawing the plots; a summary of finetuned against scratch.
Everything lands in ``demo_out/``; running it again reuses what is already finished.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD_PORT = 8265


def sh(*argv: str, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """Run a command, echoing it."""
    print("$", shlex.join(argv), flush=True)
    return subprocess.run(argv, env=env, check=check, cwd=ROOT)


def demo_env() -> dict[str, str]:
    """Environment for Ray and the jobs: the project's Python first, CPU DeepSpeed."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    env.update(DS_ACCELERATOR="cpu", RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled")
    return env


def stop_local_ray(temp_dir: str) -> None:
    """Stop the Ray processes started with ``--temp-dir temp_dir`` (``ray stop`` stops all)."""
    from pipeline.launch import stop_ray_processes

    stop_ray_processes([temp_dir])
    print(f"stopped the demo's Ray head ({temp_dir})")


def ray_head_answers() -> bool:
    """Whether a Ray job server already listens on the demo's dashboard port."""
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(f"http://127.0.0.1:{DASHBOARD_PORT}/api/version", timeout=2)
    except urllib.error.HTTPError:
        return True  # it answers (401 with token authentication)
    except OSError:
        return False
    return True


def write_shards(out: Path, samples: int) -> tuple[str, str]:
    """Pretraining and downstream shards (skipped when complete: the writer resumes)."""
    shapes, digits = f"file://{out}/shards/shapes", f"file://{out}/shards/digits"
    python = sys.executable
    sh(
        python,
        "-m",
        "pipeline.shards",
        "write",
        "shapes",
        shapes,
        "--num-samples",
        str(samples),
        "--resolution",
        "64",
        "--samples-per-shard",
        "1000",
    )
    sh(
        python,
        "-m",
        "pipeline.shards",
        "write",
        "digits",
        digits,
        "--resolution",
        "64",
        "--samples-per-shard",
        "500",
    )
    return shapes, digits


def wait_for_marker(path: Path, job_id: str, client, timeout: float = 600) -> str:
    """The MLflow run id the pretraining driver records next to its checkpoints."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            return path.read_text().strip()
        status = str(client.get_job_status(job_id))
        if status.endswith(("FAILED", "STOPPED")):
            raise SystemExit(f"pretraining job {job_id} {status}:\n{client.get_job_logs(job_id)}")
        time.sleep(1)
    raise SystemExit(f"pretraining did not start within {timeout} s")


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m pipeline.demo``."""
    parser = argparse.ArgumentParser(prog="python -m pipeline.demo", description=__doc__)
    parser.add_argument("--out", type=Path, default=ROOT / "demo_out")
    parser.add_argument("--samples", type=int, default=8000, help="shapes images to write")
    parser.add_argument("--every", type=int, default=500, help="finetune every N pretrain steps")
    args = parser.parse_args(argv)
    out = args.out.resolve()
    started = time.monotonic()
    env = demo_env()
    os.environ.update(env)
    shapes, digits = write_shards(out, args.samples)
    common = [
        f"checkpoint.storage_url=file://{out}/runs",
        f"tracking.uri=sqlite:///{out}/mlflow.db",
    ]
    started_ray = not ray_head_answers()
    temp_dir = tempfile.mkdtemp(prefix="ray-demo-")
    if started_ray:
        # 8 logical CPUs on 2 cores: pretraining (2 workers), a finetune and the scratch baseline
        # (1 driver + 2 workers each) run side by side and share the cores.
        sh("ray", "start", "--head", "--node-ip-address", "127.0.0.1",
           "--dashboard-host", "127.0.0.1", "--dashboard-port", str(DASHBOARD_PORT),
           "--num-cpus", "8", "--temp-dir", temp_dir, "--disable-usage-stats", env=env)  # fmt: skip
    else:
        print(f"using the Ray head already answering on 127.0.0.1:{DASHBOARD_PORT}")
    try:
        return run_pipeline(args, out, shapes, digits, common, started)
    finally:
        if started_ray:
            stop_local_ray(temp_dir)


def run_pipeline(args, out: Path, shapes: str, digits: str, common: list[str], started: float):
    """Submit pretraining and the scratch baseline, schedule finetunes, compare."""
    from ray.job_submission import JobSubmissionClient

    from pipeline.config import load_config
    from pipeline.launch import RUN_ID_FILE, default_run_name
    from pipeline.schedule import main as schedule

    address = f"http://127.0.0.1:{DASHBOARD_PORT}"
    client = JobSubmissionClient(address)
    overrides = [f"data.train_url={shapes}", *common]
    pretrain = ["python", "-m", "pipeline.pretrain", "--config", "configs/demo.yaml", *overrides]
    job = client.submit_job(entrypoint=shlex.join(pretrain))
    print(f"submitted pretraining as Ray job {job}: {shlex.join(pretrain)}", flush=True)
    config = load_config(ROOT / "configs/demo.yaml", overrides).with_absolute_paths()
    run_name = default_run_name(config, "pretrain")
    run_id = wait_for_marker(out / "runs" / run_name / RUN_ID_FILE, job, client)
    print(f"pretraining MLflow run: {run_id}", flush=True)
    scratch = [
        "python",
        "-m",
        "pipeline.finetune",
        "--config",
        "configs/finetune/digits.yaml",
        "--from",
        "scratch",
        "--task",
        "digits",
        f"data.train_url={digits}",
        *common,
    ]
    scratch_job = client.submit_job(entrypoint=shlex.join(scratch), entrypoint_num_cpus=0.5)
    code = schedule([
        "--pretrain-run", run_id, "--jobs", str(ROOT / "jobs/finetune"),
        "--every", str(args.every), "--tracking-uri", f"sqlite:///{out}/mlflow.db",
        "--ray-address", address, "--poll", "10",
    ])  # fmt: skip
    while not str(client.get_job_status(scratch_job)).endswith(("SUCCEEDED", "FAILED", "STOPPED")):
        time.sleep(5)
    if code != 0 or not str(client.get_job_status(scratch_job)).endswith("SUCCEEDED"):
        print(client.get_job_logs(scratch_job)[-3000:])
        raise SystemExit("a demo job failed (see above and `ray job logs`)")
    return summarize(out, run_id, started)


def summarize(out: Path, run_id: str, started: float) -> int:
    """Draw the comparison and print the margin of finetuned over scratch."""
    from pipeline.compare import main as compare

    uri = f"sqlite:///{out}/mlflow.db"
    compare(["--experiment", "nfnet-demo", "--out", str(out / "plots"), "--tracking-uri", uri])
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("nfnet-demo")
    runs = client.search_runs([experiment.experiment_id], "attributes.status = 'FINISHED'")
    best = {"finetune": 0.0, "scratch": 0.0}
    for run in runs:
        kind = run.data.tags.get("pipeline.kind")
        if kind in best:
            best[kind] = max(best[kind], run.data.metrics.get("val/top1", 0.0))
    minutes = (time.monotonic() - started) / 60
    print(
        f"\ndemo finished in {minutes:.1f} min\n"
        f"digits validation top-1: finetuned from pretraining {best['finetune']:.3f}, "
        f"scratch {best['scratch']:.3f} (margin {best['finetune'] - best['scratch']:+.3f})\n"
        f"plots: {out / 'plots'}\n"
        f"MLflow UI: mlflow ui --backend-store-uri {uri} --host 127.0.0.1  "
        f"(then open http://127.0.0.1:5000)\n"
        f"pretraining run: {run_id}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
