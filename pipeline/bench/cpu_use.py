"""Where the CPU went during a run: every process's CPU time, sampled, grouped by role.

The scaling benchmark uses it to show how much of the machine the training workers had while
Ray's own processes, the driver and anything else ran beside them.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict

import psutil

# Substrings of a process's command line (Ray retitles its workers "ray::Class.method") → role.
# First match wins.
ROLES: tuple[tuple[str, str], ...] = (
    ("ray::RayTrainWorker", "training workers"),
    ("ray::TrainController", "Ray Train actors"),
    ("ray::SynchronizationActor", "Ray Train actors"),
    ("ray::PlacementGroupCleaner", "Ray Train actors"),
    ("ray::_AutoscalingCoordinatorActor", "Ray Train actors"),
    ("pipeline.pretrain", "driver (pipeline.pretrain)"),
    ("pipeline.bench", "this benchmark (its sampling)"),
    # A Ray worker before it takes its "ray::" title: its arguments name the raylet and GCS.
    ("ray/_private/workers/", "other Ray processes"),
    ("gcs_server", "Ray GCS and raylet"),
    ("raylet", "Ray GCS and raylet"),
    ("ray/dashboard/", "Ray dashboard and agents"),
    ("ray-dashboard-", "Ray dashboard and agents"),
    ("ray::DashboardAgent", "Ray dashboard and agents"),
    ("ray::RuntimeEnvAgent", "Ray dashboard and agents"),
    ("log_monitor.py", "other Ray processes"),
    ("autoscaler/_private/monitor.py", "other Ray processes"),
    ("ray::", "other Ray processes"),
)
OTHER = "everything else"


def role_of(cmdline: str) -> str:
    """The role of a process, from its command line."""
    return next((role for mark, role in ROLES if mark in cmdline), OTHER)


class CpuSampler:
    """Samples the CPU time (user + system) of every process on the machine once per interval,
    in a thread, so that the use in any window of the run can be read off afterwards. A process
    keeps the role of its last sample with a command line (Ray workers are retitled after they
    start; an exiting one shows none). The machine's steal time (CPU time the hypervisor gave
    to other guests) is sampled with it."""

    def __init__(self, interval: float = 1.0) -> None:
        self.interval = interval
        # (pid, create_time) → (role, [(wall time, cpu seconds), ...])
        self.series: dict[tuple[int, float], tuple[str, list[tuple[float, float]]]] = {}
        self.cores = psutil.cpu_count() or 1
        self.steal: list[tuple[float, float]] = []  # (wall time, steal seconds of all cores)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> CpuSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)
        self.sample()

    def sample(self) -> None:
        """Read every process's CPU time, and the machine's steal time, now."""
        now = time.time()
        self.steal.append((now, getattr(psutil.cpu_times(), "steal", 0.0)))  # Linux only
        for process in psutil.process_iter(["cmdline", "cpu_times", "create_time"]):
            info = process.info
            if info["cpu_times"] is None or info["create_time"] is None:
                continue  # gone meanwhile, or not ours to read
            key = (process.pid, info["create_time"])
            role, samples = self.series.get(key, (OTHER, []))
            times = info["cpu_times"]
            samples.append((now, times.user + times.system))
            if info["cmdline"]:  # an exiting process (a zombie) shows none: keep its role
                role = role_of(" ".join(info["cmdline"]))
            self.series[key] = (role, samples)

    def by_process(self, start: float, end: float) -> dict[int, tuple[str, float]]:
        """``{pid: (role, CPU seconds)}`` used between wall times ``start`` and ``end`` (epoch
        seconds)."""
        used: dict[int, tuple[str, float]] = {}
        for (pid, born), (role, samples) in self.series.items():
            seconds = _growth(samples, start, end, born_inside=born >= start)
            if seconds is not None:
                used[pid] = (role, used.get(pid, (role, 0.0))[1] + seconds)  # a reused pid adds
        return used

    def steal_seconds(self, start: float, end: float) -> float:
        """CPU seconds (over all cores) the hypervisor took between ``start`` and ``end``."""
        return _growth(self.steal, start, end, born_inside=False) or 0.0

    def by_role(self, start: float, end: float) -> dict[str, float]:
        """CPU seconds each role used between wall times ``start`` and ``end``."""
        used: dict[str, float] = defaultdict(float)
        for role, seconds in self.by_process(start, end).values():
            used[role] += seconds
        return dict(used)


def _growth(
    samples: list[tuple[float, float]], start: float, end: float, born_inside: bool
) -> float | None:
    """How much a sampled counter grew in the window: from its last sample before ``start``
    (0 for a process born inside the window, else its first sample inside) to its last sample
    inside. None when no sample falls inside."""
    inside = [value for moment, value in samples if start <= moment <= end]
    if not inside:
        return None
    before = [value for moment, value in samples if moment < start]
    return inside[-1] - (before[-1] if before else (0.0 if born_inside else inside[0]))
