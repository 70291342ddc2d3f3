"""What Ray Train runs on every worker: set up the process, then one Trainer over the plan."""

from __future__ import annotations

import os
import re
import sys

import ray.train
import torch

from pipeline import logs
from pipeline.config import RunConfig
from pipeline.train.plan import Plan, on_workers
from pipeline.train.trainer import Trainer


def use_this_environments_build_tools() -> None:
    """Build DeepSpeed's JIT ops with this environment's tools, into this environment's cache.

    On CPU, DeepSpeed compiles its shared-memory comm op on first use (25-35 s), with the
    ``ninja`` first on ``PATH``, into torch's extension cache. A ninja of another version than
    the one installed with DeepSpeed rejects the other's build log and rebuilds everything, so
    the worker must find the same ninja and the same cache whatever environment started the
    Ray cluster: this interpreter's own ``bin`` goes first on ``PATH``, and the cache lives in
    its environment (``TORCH_EXTENSIONS_DIR`` still overrides), one folder per path the
    environment is reached by: through a symlink, DeepSpeed's sources have other paths, and a
    shared build log would make each path rebuild after the other (a minute or more each time).
    """
    own_bin = os.path.dirname(sys.executable)
    path = os.environ.get("PATH", "")
    if not path.startswith(own_bin + os.pathsep):
        os.environ["PATH"] = own_bin + os.pathsep + path
    view = re.sub(r"[^A-Za-z0-9]+", "-", sys.prefix).strip("-")
    os.environ.setdefault(
        "TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions", view)
    )


def started_workers(planned: int) -> int:
    """How many workers Ray Train started this run on; ``planned`` outside Ray Train (the
    benchmarks and tests that call the worker function in one process)."""
    try:
        return ray.train.get_context().get_world_size()
    except RuntimeError:
        return planned


def train_loop_per_worker(loop_config: dict) -> None:
    """The function Ray Train runs on every worker.

    ``loop_config`` holds the run config and the plan as plain dicts, the MLflow run id, the
    run's checkpoint folder URL and the finetuning origin (``init``, or None). Progress lines
    go to stdout, which Ray forwards to the driver's console, once: not through the root logger,
    which Ray Train's worker logging also prints.
    """
    logs.configure(propagate=False)
    if not loop_config["config"]["scaling"]["use_gpu"]:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    use_this_environments_build_tools()
    config = RunConfig.model_validate(loop_config["config"])
    # An elastic run starts on as many workers as Ray Train found: the same global batch, the
    # accumulation re-derived (pipeline.data.streams keeps the data the same).
    plan = Plan(**loop_config["plan"])
    plan = on_workers(plan, started_workers(plan.num_workers))
    torch.set_num_threads(max(1, int(config.scaling.cpus_per_worker)))
    Trainer(
        config, plan, loop_config["run_id"], loop_config["run_url"], loop_config["init"]
    ).train()
