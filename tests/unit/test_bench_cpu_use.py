"""The CPU sampler behind the scaling benchmark's "where the CPU went" table."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from pipeline.bench.cpu_use import OTHER, CpuSampler, role_of


@pytest.mark.parametrize(
    ("cmdline", "role"),
    [
        ("ray::RayTrainWorker.run_train_fn", "training workers"),
        ("ray::TrainController.run", "Ray Train actors"),
        ("ray::SynchronizationActor", "Ray Train actors"),
        (".venv/bin/python -m pipeline.pretrain --config configs/demo.yaml", "driver (pipeline.pretrain)"),  # noqa: E501
        ("site-packages/ray/core/src/ray/gcs/gcs_server --log_dir=/tmp/ray", "Ray GCS and raylet"),
        ("site-packages/ray/core/src/ray/raylet/raylet --socket=x", "Ray GCS and raylet"),
        ("python site-packages/ray/dashboard/dashboard.py --host=x", "Ray dashboard and agents"),
        ("ray-dashboard-StateHead-0 (python -B -c ...)", "Ray dashboard and agents"),
        ("ray::DashboardAgent", "Ray dashboard and agents"),
        ("python -u site-packages/ray/_private/log_monitor.py --x", "other Ray processes"),
        ("ray::IDLE", "other Ray processes"),
        ("python ray/_private/workers/default_worker.py --raylet-name=x", "other Ray processes"),
        ("/usr/sbin/sshd -D", OTHER),
    ],
)  # fmt: skip
def test_processes_are_grouped_by_their_command_line(cmdline, role):
    assert role_of(cmdline) == role


def test_a_busy_process_is_charged_its_cpu_time_inside_the_window_only():
    busy = (
        "# ray::RayTrainWorker\nimport time\n"
        "end = time.process_time() + 1.0\nwhile time.process_time() < end: pass\n"
        "time.sleep(0.5)  # alive, idle: sampled after its last busy moment"
    )
    with CpuSampler(interval=0.1) as sampler:
        time.sleep(0.3)
        start = time.time()
        process = subprocess.Popen([sys.executable, "-c", busy])
        assert process.wait() == 0
        wall = time.time() - start
        time.sleep(0.3)
        end = time.time()
    role, used = sampler.by_process(start, end)[process.pid]
    assert role == "training workers"
    # The loop burns 1.0 s of CPU (plus the interpreter's start-up), all inside the window.
    # (A process that exits loses the CPU time after its last sample: up to one interval.)
    assert 0.98 <= used <= wall, (used, wall)  # CPU time is counted in 10 ms ticks
    assert sampler.by_role(start, end)["training workers"] >= used
    # A window that ends before the process was born charges it nothing.
    assert process.pid not in sampler.by_process(start - 0.3, start - 0.01)


def test_an_exited_process_keeps_its_role():
    import psutil

    sampler = CpuSampler()
    process = subprocess.Popen([sys.executable, "-c", "# ray::RayTrainWorker\nimport time"])
    sampler.sample()
    while psutil.Process(process.pid).status() != psutil.STATUS_ZOMBIE:  # exited, not reaped
        time.sleep(0.01)
    sampler.sample()
    process.wait()
    (role,) = {role for (pid, _), (role, _) in sampler.series.items() if pid == process.pid}
    assert role == "training workers"


def test_steal_time_is_read_over_the_window():
    sampler = CpuSampler()
    sampler.steal = [(10.0, 5.0), (11.0, 5.5), (12.0, 7.0), (13.0, 7.25), (14.0, 9.0)]
    # From the last sample before the window to the last inside it.
    assert sampler.steal_seconds(10.5, 13.5) == 7.25 - 5.0
    assert sampler.steal_seconds(9.0, 12.0) == 7.0 - 5.0  # none before: from the first inside
    assert sampler.steal_seconds(20.0, 30.0) == 0.0
