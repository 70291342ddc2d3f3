"""Small real runs: a shrunken demo config, the pretraining driver, and what MLflow recorded."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml
from mlflow import MlflowClient

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "configs" / "demo.yaml"


def small_run_config(tmp_path: Path, name: str, tracking_uri: str, **sections: dict) -> Path:
    """The demo config, shrunk to ``nfnet_nano`` at 32 px, with ``sections`` merged in."""
    config = yaml.safe_load(DEMO.read_text())
    config["model"] = {"name": "nfnet_nano"}
    config["train"] |= {"global_batch": 16, "micro_batch": 8, "log_every": 1, "eval_every": 5}
    config["data"] |= {"loader_workers": 1, "shuffle_buffer": 64}
    config["checkpoint"] |= {"every_steps": 5, "storage_url": f"file://{tmp_path}/runs"}
    config["tracking"] = {"uri": tracking_uri, "experiment": f"{tmp_path.name}-{name}"}
    config["scaling"] = {"num_workers": 2, "cpus_per_worker": 1}
    for section, values in sections.items():
        config.setdefault(section, {}).update(values)
    path = tmp_path / f"{name}.yaml"
    path.write_text("# test config\n" + yaml.safe_dump(config))
    return path


def run_pretrain(cluster, config: Path, *overrides: str, env: dict | None = None, timeout=300):
    """``python -m pipeline.pretrain`` as a driver process joining the session's Ray cluster."""
    return subprocess.run(
        [sys.executable, "-m", "pipeline.pretrain", "--config", str(config), *overrides],
        env=cluster.env(**(env or {})),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def checked(result: subprocess.CompletedProcess) -> str:
    """The output of a command that must have exited 0 (else the assertion shows its tail)."""
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    return output


def only_run(uri: str, experiment: str):
    """The client and the one MLflow run of ``experiment``."""
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    return client, run


def max_relative_difference(a: dict, b: dict) -> float:
    """The largest elementwise difference of two state dicts, relative to each tensor's scale."""
    assert a.keys() == b.keys()
    return max(((a[k] - b[k]).abs().max() / b[k].abs().max().clamp(min=1e-12)).item() for k in a)
