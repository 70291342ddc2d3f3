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


def test_a_process_first_seen_inside_the_window_counts_from_zero_cpu():
    sampler = CpuSampler()
    sampler.steal = [(10.0, 0.0), (11.0, 0.0), (12.0, 0.0)]  # the sampler's looks
    # First seen at 11 (its create_time, 10.2, says nothing: psutil's may be up to 1 s early).
    sampler.series[(7, 10.2)] = ("training workers", [(11.0, 0.3), (12.0, 1.2)])
    assert sampler.by_process(10.5, 12.5)[7] == ("training workers", 1.2)
    # With no look before the window, it may have run before it: from its first sample.
    assert sampler.by_process(9.0, 12.5)[7] == ("training workers", pytest.approx(0.9))


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


def test_a_training_thread_is_on_a_core_or_waiting_while_it_spins_and_blocked_while_it_sleeps():
    spin = "# ray::RayTrainWorker\nimport time\nend = time.time() + 3\nwhile time.time() < end:\n 0"
    sleep = "# ray::RayTrainWorker\nimport time\ntime.sleep(3)"
    spinning, sleeping = (subprocess.Popen([sys.executable, "-c", code]) for code in (spin, sleep))
    try:
        with CpuSampler(interval=0.1) as sampler:
            time.sleep(0.5)  # both started and sampled
            start = time.time()
            time.sleep(1.5)
            end = time.time()
        shares = sampler.training_threads(start, end)
    finally:
        for process in (spinning, sleeping):
            process.kill()
            process.wait()
    busy, idle = shares[spinning.pid], shares[sleeping.pid]
    for thread in (busy, idle):
        total = thread["on_core"] + thread["waiting"] + thread["blocked"]
        assert total == pytest.approx(1.0, abs=0.005)  # counters and clock read µs apart
    # Runnable all the time: on its core, or waiting for it when the machine is busy.
    assert busy["on_core"] + busy["waiting"] >= 0.95, busy
    assert busy["on_core"] >= 0.5, busy  # 2 cores: nothing else can hold one for long
    assert idle["blocked"] >= 0.98, idle
    assert sampler.training_threads(end + 10, end + 20) == {}  # no sample in that window


def test_the_busiest_thread_of_a_worker_is_the_one_reported():
    sampler = CpuSampler()
    sampler.threads[(42, 1.0)] = {
        # (wall time, seconds on a core, seconds waiting for one)
        42: [(10.0, 1.0, 0.0), (12.0, 1.1, 0.0), (14.0, 1.2, 0.1)],  # the actor's main thread
        43: [(10.0, 5.0, 1.0), (12.0, 6.6, 1.2), (14.0, 8.2, 1.5)],  # the training loop
    }
    (shares,) = sampler.training_threads(11.0, 14.0).values()  # from the sample at 10 to 14
    assert shares["on_core"] == pytest.approx(3.2 / 4)
    assert shares["waiting"] == pytest.approx(0.5 / 4)
    assert shares["blocked"] == pytest.approx(0.3 / 4)
