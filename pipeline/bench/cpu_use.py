"""Where the CPU went during a run: every process's CPU time, sampled, grouped by role.

The scaling benchmark uses it to show how much of the machine the training workers had while
Ray's own processes, the driver and anything else ran beside them, and, from the kernel's
per-thread scheduler counters (``/proc/PID/task/TID/schedstat``), how much of the time each
worker's training thread was on a core, runnable but waiting for one, or blocked.
"""

from __future__ import annotations

import os
import threading
import time
from collections import defaultdict

import psutil

TRAINING = "training workers"
# Substrings of a process's command line (Ray retitles its workers "ray::Class.method") → role.
# First match wins.
ROLES: tuple[tuple[str, str], ...] = (
    ("ray::RayTrainWorker", TRAINING),
    ("ray::TrainController", "Ray Train actors"),
    ("ray::SynchronizationActor", "Ray Train actors"),
    ("ray::PlacementGroupCleaner", "Ray Train actors"),
    ("ray::_AutoscalingCoordinatorActor", "Ray Train actors"),
    ("ray::PreemptionWatcher", "Ray Train actors"),
    ("ray::DatasetManager", "Ray Train actors"),
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
    to other guests) is sampled with it, and so is every thread of a training worker: the time
    it has run on a core and the time it has waited, runnable, for one."""

    def __init__(self, interval: float = 1.0) -> None:
        self.interval = interval
        # (pid, create_time) → (role, [(wall time, cpu seconds), ...])
        self.series: dict[tuple[int, float], tuple[str, list[tuple[float, float]]]] = {}
        self.cores = psutil.cpu_count() or 1
        self.steal: list[tuple[float, float]] = []  # (wall time, steal seconds of all cores)
        # (pid, create_time) of a training worker → {tid: [(wall time, on-core s, waiting s)]}
        self.threads: dict[tuple[int, float], dict[int, list[tuple[float, float, float]]]] = {}
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
            if role == TRAINING:
                self._sample_threads(key)

    def _sample_threads(self, key: tuple[int, float]) -> None:
        """Each thread's scheduler counters, timed as read (Linux; nothing elsewhere)."""
        threads = self.threads.setdefault(key, {})
        try:
            tids = [int(name) for name in os.listdir(f"/proc/{key[0]}/task")]
        except OSError:
            return
        for tid in tids:
            try:
                with open(f"/proc/{key[0]}/task/{tid}/schedstat") as file:
                    now = time.time()
                    on_core, waiting = (int(field) / 1e9 for field in file.read().split()[:2])
            except (OSError, ValueError):
                continue
            threads.setdefault(tid, []).append((now, on_core, waiting))

    def by_process(self, start: float, end: float) -> dict[int, tuple[str, float]]:
        """``{pid: (role, CPU seconds)}`` used between wall times ``start`` and ``end`` (epoch
        seconds)."""
        # A process first seen inside the window, when the sampler also looked before it, is
        # born after that look: its CPU counts from 0. (Its create_time cannot tell: psutil
        # derives it from the boot time in whole seconds, up to 1 s early.)
        looked_before = any(moment < start for moment, _ in self.steal)  # one entry per look
        used: dict[int, tuple[str, float]] = {}
        for (pid, _), (role, samples) in self.series.items():
            born_inside = looked_before and samples[0][0] >= start
            seconds = _growth(samples, start, end, born_inside=born_inside)
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

    def training_threads(self, start: float, end: float) -> dict[int, dict[str, float]]:
        """``{pid: shares}``: for each training worker, its busiest thread (the training loop)
        in the window: the shares of the time it ran on a core (``on_core``), waited runnable
        for a core while something else ran there (``waiting``), and neither (``blocked``: in
        the all-reduce, on I/O, on the GIL). Measured between the samples that bound the
        window."""
        shares = {}
        for (pid, _), threads in self.threads.items():
            busiest: dict[str, float] | None = None
            for samples in threads.values():
                bounds = _bounds(samples, start, end)
                if bounds is None:
                    continue
                (then, on_core_then, waiting_then), (now, on_core_now, waiting_now) = bounds
                if now <= then:
                    continue  # one sample: no span to share out
                on_core = (on_core_now - on_core_then) / (now - then)
                if busiest is None or on_core > busiest["on_core"]:
                    busiest = {
                        "on_core": on_core,
                        "waiting": (waiting_now - waiting_then) / (now - then),
                    }
            if busiest is not None:
                busiest["blocked"] = max(0.0, 1.0 - busiest["on_core"] - busiest["waiting"])
                shares[pid] = busiest
        return shares


def _bounds(samples: list[tuple], start: float, end: float) -> tuple[tuple, tuple] | None:
    """The samples (each led by its wall time) that bound the window: the last before
    ``start``, else the first inside; and the last inside. None when none falls inside."""
    inside = [sample for sample in samples if start <= sample[0] <= end]
    if not inside:
        return None
    before = [sample for sample in samples if sample[0] < start]
    return (before[-1] if before else inside[0]), inside[-1]


def _growth(
    samples: list[tuple[float, float]], start: float, end: float, born_inside: bool
) -> float | None:
    """How much a sampled counter grew in the window (between its bounding samples; from 0
    for a process born inside it). None when no sample falls inside."""
    bounds = _bounds(samples, start, end)
    if bounds is None:
        return None
    (then, before), (_, last) = bounds
    return last if born_inside and then >= start else last - before
