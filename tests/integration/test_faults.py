"""The fault matrix (docs/reliability.md): each fault injected into a real run — the session's
Ray head on 127.0.0.1, two DeepSpeed workers on gloo, moto's S3 server over HTTP (behind a TCP
proxy that can cut or throttle it), the MLflow server — and its outcome asserted in numbers."""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from safetensors.torch import load_file

from pipeline.models import create_model
from pipeline.optim import SGD_AGC, ModelEma, param_groups
from pipeline.train import checkpoint as ckpt
from tests.helpers.cluster import wait_until
from tests.helpers.faults import (
    CHECKPOINT_FILES,
    alive_train_actors,
    checkpoint_files,
    metric_by_step,
    registered_checkpoints,
    s3_checkpoints,
    s3_run_config,
    through_proxy,
    tiny_synthetic_config,
    train_workers,
)
from tests.helpers.runs import ROOT, checked, only_run, run_pretrain

pytestmark = pytest.mark.integration


def checkpoints(tmp_path: Path) -> dict[str, Path]:
    """``{"step_000000002": folder, ...}`` of the run under ``tmp_path/runs``."""
    return {folder.name: folder for folder in sorted((tmp_path / "runs").glob("*/step_*"))}


def tensors(folder: Path) -> dict[str, dict]:
    return {name: load_file(folder / name) for name in CHECKPOINT_FILES}


# --- 1. NaN / Inf -----------------------------------------------------------------------------


def test_nonfinite_steps_are_skipped_and_counted_and_move_nothing(
    ray_cluster, mlflow_server, tmp_path
):
    config = tiny_synthetic_config(tmp_path, "skip", mlflow_server, "&nonfinite_steps=3,4")
    checked(run_pretrain(ray_cluster, config))
    saved = checkpoints(tmp_path)
    assert list(saved) == ["step_000000002", "step_000000004", "step_000000006"]
    before, after, last = (tensors(folder) for folder in saved.values())
    # The poisoned sample lives on worker 1; rank 0 (which writes the checkpoint) only learns of
    # it through the all-reduce. Steps 3 and 4 moved no weight, no momentum, no EMA value:
    for file in CHECKPOINT_FILES:
        assert before[file].keys() == after[file].keys()
        for key in before[file]:
            assert before[file][key].equal(after[file][key]), (file, key)
    # Steps 5 and 6 trained again, and everything stayed finite.
    moved = [k for k in after["model.safetensors"] if not after["model.safetensors"][k].equal(
        last["model.safetensors"][k])]  # fmt: skip
    assert len(moved) > 0
    assert all(t.isfinite().all() for file in last.values() for t in file.values())
    state = json.loads((saved["step_000000006"] / "state.json").read_text())
    assert state["nonfinite_steps"] == 2
    counts = metric_by_step(mlflow_server, f"{tmp_path.name}-skip", "train/nonfinite_steps")
    assert counts == {1: 0, 2: 0, 3: 1, 4: 2, 5: 2, 6: 2}
    losses = metric_by_step(mlflow_server, f"{tmp_path.name}-skip", "train/loss")
    # A log line of only skipped steps has no loss to average: NaN, the others finite.
    assert [step for step, loss in losses.items() if not math.isfinite(loss)] == [3, 4]


def test_nonfinite_stop_fails_naming_the_key_and_writes_no_checkpoint_after_the_fault(
    ray_cluster, mlflow_server, tmp_path
):
    config = tiny_synthetic_config(
        tmp_path, "stop", mlflow_server, "&nonfinite_steps=3", train={"nonfinite": "stop"}
    )
    result = run_pretrain(ray_cluster, config)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output[-3000:]
    assert "step 3: the gradient (or the loss) is NaN or Inf and train.nonfinite=stop" in output
    assert list(checkpoints(tmp_path)) == ["step_000000002"]
    client, run = only_run(mlflow_server, f"{tmp_path.name}-stop")
    assert run.info.status == "FAILED"
    counts = metric_by_step(mlflow_server, f"{tmp_path.name}-stop", "train/nonfinite_steps")
    assert counts == {1: 0, 2: 0, 3: 1}


# --- 2. driver killed -------------------------------------------------------------------------


def process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_killed_driver_rerun_resumes_the_same_mlflow_run_from_its_checkpoint(
    ray_cluster, mlflow_server, tmp_path
):
    config = tiny_synthetic_config(
        tmp_path, "driver", mlflow_server, train={"steps": 60}, checkpoint={"every_steps": 5}
    )
    command = [sys.executable, "-m", "pipeline.pretrain", "--config", str(config)]
    runs = tmp_path / "runs"
    with (tmp_path / "first.log").open("w") as log:
        driver = subprocess.Popen(
            command, env=ray_cluster.env(), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT
        )
        try:
            assert wait_until(lambda: registered_checkpoints(runs), timeout=240)
            actors = alive_train_actors(ray_cluster)
            driver.send_signal(signal.SIGKILL)
            driver.wait()
            killed_at = time.monotonic()
        finally:
            if driver.poll() is None:
                driver.kill()
                driver.wait()
    registered = registered_checkpoints(runs)
    assert sorted(actors.values()) == ["RayTrainWorker", "RayTrainWorker", "TrainController"]
    # Ray fate-shares the driver's actors: controller and workers die with it, so the rerun
    # never trains next to orphans writing the same checkpoints and metrics.
    assert wait_until(lambda: not alive_train_actors(ray_cluster), timeout=30)
    assert wait_until(lambda: not any(process_exists(pid) for pid in actors), timeout=30)
    orphans_lived = time.monotonic() - killed_at
    _, run = only_run(mlflow_server, f"{tmp_path.name}-driver")
    assert run.info.status == "RUNNING"  # the killed driver ended nothing

    second = checked(run_pretrain(ray_cluster, config))
    client, again = only_run(mlflow_server, f"{tmp_path.name}-driver")  # one run, not two
    assert again.info.run_id == run.info.run_id
    run = again
    # No record says where a run resumed: the driver's output does.
    resumed = int(re.search(r"resumed from checkpoint at step (\d+)", second).group(1))
    assert f"step_{resumed:09d}" == registered[-1]
    assert run.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert sorted(steps) == list(range(1, 61))  # every step logged once
    print(f"killed after {registered}; orphans gone in {orphans_lived:.1f} s; resumed at {resumed}")


# --- 3. S3 outage -----------------------------------------------------------------------------


def cut_after_first_checkpoint(s3_endpoint, tmp_path, proxy, outage_s: float | None, times):
    """Cut the proxy once Ray Train registered a checkpoint; restore after ``outage_s``."""
    wait_until(lambda: s3_checkpoints(s3_endpoint, tmp_path)[1], timeout=300, interval=0.3)
    times["cut"] = time.time()
    proxy.cut()
    if outage_s is not None:
        time.sleep(outage_s)
        proxy.restore()
        times["restored"] = time.time()


def test_s3_outage_of_some_seconds_is_ridden_out_and_the_run_finishes(
    ray_cluster, mlflow_server, s3_endpoint, s3_shards, s3_proxy, tmp_path
):
    options = through_proxy(s3_endpoint, s3_proxy)
    config = s3_run_config(tmp_path, "blip", mlflow_server, s3_endpoint, s3_shards, options)
    times: dict[str, float] = {}
    outage = threading.Thread(
        target=cut_after_first_checkpoint, args=(s3_endpoint, tmp_path, s3_proxy, 6.0, times)
    )
    outage.start()
    output = checked(run_pretrain(ray_cluster, config))
    outage.join()
    assert "restored" in times, "the run finished before the outage began"
    assert "resumed from checkpoint" not in output  # retried in place, not restarted
    folders, registered = s3_checkpoints(s3_endpoint, tmp_path)
    expected = [f"step_{step:09d}" for step in range(5, 41, 5)]
    assert folders == registered == expected
    client, run = only_run(mlflow_server, f"{tmp_path.name}-blip")
    assert run.info.status == "FINISHED"
    history = sorted(client.get_metric_history(run.info.run_id, "train/loss"), key=lambda m: m.step)
    assert [m.step for m in history] == list(range(1, 41))
    # Training waited for S3 (a checkpoint upload or a shard read) across the outage, then went on.
    gaps = {b.step: (b.timestamp - a.timestamp) / 1000 for a, b in itertools.pairwise(history)}
    stalled = [step for step, gap in gaps.items() if gap >= 3.0]
    assert stalled, f"no step waited for the 6 s outage (longest gap {max(gaps.values()):.1f} s)"
    print(f"outage 6 s; steps after a pause >= 3 s: {stalled}; longest {max(gaps.values()):.1f} s")


def test_s3_gone_for_good_fails_naming_the_url_and_the_last_checkpoint_stays_loadable(
    ray_cluster, mlflow_server, s3_endpoint, s3_shards, s3_proxy, tmp_path
):
    # botocore's 5 attempts per request make the failure take ~1 min; 1 attempt keeps the test
    # short (the storage layer's own 5 tries with backoff still run).
    options = through_proxy(s3_endpoint, s3_proxy, config_kwargs={"retries": {"max_attempts": 1}})
    config = s3_run_config(tmp_path, "gone", mlflow_server, s3_endpoint, s3_shards, options)
    times: dict[str, float] = {}
    outage = threading.Thread(
        target=cut_after_first_checkpoint, args=(s3_endpoint, tmp_path, s3_proxy, None, times)
    )
    outage.start()
    result = run_pretrain(ray_cluster, config, timeout=600)  # fails ~20 s after the cut
    outage.join()
    output = result.stdout + result.stderr
    assert result.returncode == 1, output[-3000:]
    failed_after = time.time() - times["cut"]
    # The final error names the endpoint and the object: the snapshot Ray Train's controller
    # writes, the checkpoint upload (checkpoint.storage_url) or a shard, whichever came first.
    final_error = output[output.rindex("Traceback") :]
    assert f'Could not connect to the endpoint URL: "{s3_proxy.endpoint_url}/pipeline-test/' in (
        final_error
    )
    client, run = only_run(mlflow_server, f"{tmp_path.name}-gone")
    assert run.info.status == "FAILED"
    folders, registered = s3_checkpoints(s3_endpoint, tmp_path)
    # A folder uploaded just before the cut may be there unregistered; restarts never use it.
    assert registered and set(registered) <= set(folders)
    latest = registered[-1]
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True, **s3_endpoint.storage_options)
    (remote,) = fs.glob(f"{s3_endpoint.bucket}/fault-runs/{tmp_path.name}/*/{latest}")
    local = tmp_path / latest
    fs.get(remote, str(local), recursive=True)
    model = create_model("nfnet_nano", num_classes=10)
    optimizer = SGD_AGC(param_groups(model, 2e-5, 0.01), lr=0.1)
    state = ckpt.load(str(local), model, optimizer, ModelEma(model))
    assert f"step_{state['step']:09d}" == latest
    assert all(p.isfinite().all() for p in model.parameters())
    assert len(optimizer.state) > 0
    print(f"failed {failed_after:.0f} s after the cut; registered {registered}, stored {folders}")


# --- 4. killed while writing a checkpoint -----------------------------------------------------


def kill_workers_mid_upload(s3_endpoint, tmp_path, proxy, seen: dict) -> None:
    """Once a checkpoint is registered, SIGKILL both workers while a later one is half stored."""

    def half_written() -> bool:
        folders, registered = s3_checkpoints(s3_endpoint, tmp_path)
        for folder in sorted(set(folders) - set(registered)):
            files = checkpoint_files(s3_endpoint, tmp_path, folder)
            if 0 < len(files) < 4:
                seen.update(folder=folder, files=files, registered=registered)
                return True
        return False

    registered = wait_until(lambda: s3_checkpoints(s3_endpoint, tmp_path)[1], timeout=300)
    # Slower still from here: an upload under way now takes ~15 s per weights file.
    proxy.throttle(10_000)
    if registered and wait_until(half_written, timeout=120, interval=0.05):
        seen["workers"] = list(train_workers(seen["cluster"]).values())
        for pid in seen["workers"]:
            os.kill(pid, signal.SIGKILL)
    proxy.throttle(None)


def test_a_worker_killed_mid_checkpoint_write_resumes_from_the_previous_checkpoint(
    ray_cluster, mlflow_server, s3_endpoint, s3_proxy, tmp_path
):
    options = through_proxy(s3_endpoint, s3_proxy)
    config = s3_run_config(
        tmp_path, "midwrite", mlflow_server, s3_endpoint,
        "synthetic://?samples=64&resolution=16&classes=4", {},
        checkpoint={"storage_options": options}, train={"steps": 20},
        scaling={"max_failures": 1},
    )  # fmt: skip
    # ~160 kB per weights file at 40 kB/s (then 10 kB/s): an upload takes seconds, so the kill
    # lands in one.
    s3_proxy.throttle(40_000)
    seen: dict = {"cluster": ray_cluster}
    killer = threading.Thread(
        target=kill_workers_mid_upload, args=(s3_endpoint, tmp_path, s3_proxy, seen)
    )
    killer.start()
    # Ray Train takes minutes to replace killed workers on a loaded 2-core box.
    output = checked(run_pretrain(ray_cluster, config, timeout=600))
    killer.join()
    assert len(seen.get("workers", [])) == 2, "the kill did not land during an upload"
    assert 0 < len(seen["files"]) < 4  # the folder was half written when its writer died
    previous = int(seen["registered"][-1].removeprefix("step_"))
    assert f"resumed from checkpoint at step {previous}" in output
    folders, registered = s3_checkpoints(s3_endpoint, tmp_path)
    assert folders == registered == [f"step_{step:09d}" for step in (5, 10, 15, 20)]
    for name in registered:  # the half-written one written again, whole
        assert checkpoint_files(s3_endpoint, tmp_path, name) == sorted(
            [*CHECKPOINT_FILES, "state.json"]
        )
    client, run = only_run(mlflow_server, f"{tmp_path.name}-midwrite")
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert sorted(steps) == list(range(1, 21))
    print(f"killed with {seen['folder']} holding {seen['files']}; resumed at step {previous}")


# --- 5. checkpoint storage full or read-only --------------------------------------------------


@pytest.fixture
def disk(tmp_path, request) -> Iterator[Path]:
    """A real tmpfs of ``request.param`` bytes, unmounted afterwards (needs root)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={request.param}", "tmpfs", str(mount)],
        capture_output=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)


# 800 kB holds one nfnet_nano checkpoint (~480 kB) but not two; 8 MB holds them all.
@pytest.mark.parametrize(
    ("fault", "disk"), [("full", 800_000), ("read-only", 8_000_000)], indirect=["disk"]
)
def test_checkpoint_storage_full_or_read_only_fails_naming_the_url(
    ray_cluster, mlflow_server, disk, tmp_path, fault
):
    storage = f"file://{disk}/runs"
    config = tiny_synthetic_config(
        tmp_path, "disk", mlflow_server, train={"steps": 30},
        checkpoint={"storage_url": storage, "every_steps": 5},
    )  # fmt: skip
    runs = disk / "runs"
    if fault == "read-only":

        def remount_read_only() -> None:
            wait_until(lambda: registered_checkpoints(runs), timeout=300, interval=0.05)
            subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)

        watcher = threading.Thread(target=remount_read_only)
        watcher.start()
    result = run_pretrain(ray_cluster, config)
    if fault == "read-only":
        watcher.join()
    output = result.stdout + result.stderr
    assert result.returncode == 1, output[-3000:]
    reason = "No space left on device" if fault == "full" else "Read-only file system"
    # The final error names the place and the reason: our upload's "checkpoint.storage_url
    # <url>/<run>/step_N: writing the checkpoint failed", or, when Ray Train's controller wrote
    # its records there first (the step's files got in just before the fault, or the disk was
    # full for the moment our upload took to fail and clear its partial folder), launch's
    # "checkpoint.storage_url <url>/<run>: Ray Train's controller could not write".
    final_error = output[output.rindex("Traceback") :]
    assert f"checkpoint.storage_url {storage}/pretrain-nfnet_nano-" in final_error
    assert reason in final_error
    ours = re.search(f"checkpoint.storage_url {storage}/[^ ]+/step_\\d{{9}}: writing", final_error)
    assert ours or "Ray Train's controller could not write its checkpoint records" in final_error
    client, run = only_run(mlflow_server, f"{tmp_path.name}-disk")
    assert run.info.status == "FAILED"
    registered = registered_checkpoints(runs)
    folders = sorted(p.name for p in runs.glob("*/step_*"))
    assert registered and registered[-1] in folders
    if fault == "full" and ours:
        assert folders == registered  # the partial folder was removed again
    latest = next(runs.glob(f"*/{registered[-1]}"))
    model = create_model("nfnet_nano", num_classes=4)
    optimizer = SGD_AGC(param_groups(model, 2e-5, 0.01), lr=0.1)
    state = ckpt.load(str(latest), model, optimizer, ModelEma(model))
    assert f"step_{state['step']:09d}" == registered[-1]
    print(f"{fault}: registered {registered}, on disk {folders}")
