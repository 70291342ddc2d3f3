"""The Ray Train worker's set-up: its own ninja and JIT cache, logging to stdout, the Trainer."""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import asdict
from pathlib import Path

import torch

from pipeline.config import load_config
from pipeline.train import worker
from pipeline.train.plan import make_plan
from pipeline.train.worker import use_this_environments_build_tools


def test_this_environments_bin_goes_first_on_path_once(monkeypatch):
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    use_this_environments_build_tools()
    use_this_environments_build_tools()
    own_bin = os.path.dirname(sys.executable)
    assert os.environ["PATH"] == f"{own_bin}:/usr/bin:/bin"
    assert Path(os.environ["TORCH_EXTENSIONS_DIR"]).parent == Path(sys.prefix, "torch_extensions")
    # The ninja torch's extension builder will run is the one installed beside DeepSpeed.
    ninja = shutil.which("ninja")
    assert ninja is not None and os.path.dirname(ninja) == own_bin


def test_each_path_to_the_environment_has_its_own_extension_cache(monkeypatch):
    """A symlinked environment compiles DeepSpeed's op from other source paths: with one cache,
    each path would rebuild after the other."""
    caches = []
    for prefix in ("/work/main/.venv", "/work/exp/.venv"):  # the second a symlink to the first
        monkeypatch.setattr(sys, "prefix", prefix)
        monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
        use_this_environments_build_tools()
        caches.append(os.environ["TORCH_EXTENSIONS_DIR"])
    assert caches == [
        "/work/main/.venv/torch_extensions/work-main-venv",
        "/work/exp/.venv/torch_extensions/work-exp-venv",
    ]


def test_a_chosen_extension_cache_is_kept(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    use_this_environments_build_tools()
    assert os.environ["TORCH_EXTENSIONS_DIR"] == str(tmp_path)


def test_the_worker_logs_to_stdout_and_trains_the_plan_it_was_given(monkeypatch):
    config = load_config(
        None, ["model.name=nfnet_nano", "train.global_batch=8", "train.micro_batch=8"]
    )
    plan = make_plan(config, num_classes=10, train_samples=64, val_samples=16)
    calls = []

    class Trainer:
        def __init__(self, *args):
            calls.append(("trainer", *args))

        def train(self):
            calls.append(("train",))

    monkeypatch.setattr(worker, "Trainer", Trainer)
    monkeypatch.setattr(worker.logs, "configure", lambda **how: calls.append(("logging", how)))
    for name in ("DS_ACCELERATOR", "TORCH_EXTENSIONS_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PATH", os.environ["PATH"])  # the worker puts its own bin first
    monkeypatch.setattr(torch, "set_num_threads", lambda count: calls.append(("threads", count)))
    worker.train_loop_per_worker(
        {
            "config": config.model_dump(),
            "plan": asdict(plan),
            "run_id": "run",
            "run_url": "file:///runs/x",
            "init": None,
        }
    )
    assert [call[0] for call in calls] == ["logging", "threads", "trainer", "train"]
    assert calls[0] == ("logging", {"propagate": False})  # Ray Train's root logger prints too
    assert calls[1] == ("threads", int(config.scaling.cpus_per_worker))
    assert calls[2][1:] == (config, plan, "run", "file:///runs/x", None)
    assert os.environ["DS_ACCELERATOR"] == "cpu"
