"""``python -m pipeline.bench chaos [--faults N] [--seed S]``: the chaos soak.

One elastic ``nfnet_micro`` run on a local Ray cluster (the head and two ``ray start`` nodes on
127.0.0.1, one worker slot each), shards and checkpoints on moto's S3 server behind a TCP proxy
that can cut it, MLflow over HTTP, through a seeded schedule of ``--faults`` faults of five kinds:
a training worker killed, a node drained with a deadline, a node killed without notice (each node
comes back after the run shrank, and the run grows again), S3 cut for 5 s, the driver killed and
the same command run again. Then: final parameters against the same run trained without a fault
on a fixed 2 workers, every step logged once, every checkpoint a restart could pick stored
whole, the steps trained twice (``train/steps_lost``) and the wall time against the reference.

The soak is the test ``tests/integration/test_chaos_soak.py`` run with ``--chaos-faults``: it
uses the suite's own fixtures for the cluster, S3, the proxy and MLflow (the suite skips it).
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[2]
SOAK = "tests/integration/test_chaos_soak.py"


def main(argv: list[str]) -> dict[str, Any]:
    """Run the soak in a pytest process of its own; return its figures."""
    parser = argparse.ArgumentParser(prog="python -m pipeline.bench chaos")
    parser.add_argument("--faults", type=int, default=8, help="faults to inject (default 8)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the fault schedule")
    args, _ = parser.parse_known_args(argv)
    if not (ROOT / SOAK).is_file():
        raise SystemExit(f"the chaos soak needs the repository's tests ({ROOT / SOAK})")
    with tempfile.TemporaryDirectory() as folder:
        report = Path(folder) / "chaos.json"
        command = [
            sys.executable, "-m", "pytest", SOAK, "-q", "-s", "-p", "no:cacheprovider",
            f"--chaos-faults={args.faults}", f"--chaos-seed={args.seed}",
            f"--chaos-report={report}",
        ]  # fmt: skip
        log.info("$ " + " ".join(command))
        finished = subprocess.run(command, cwd=ROOT)
        figures = json.loads(report.read_text()) if report.is_file() else {}
    if finished.returncode != 0:
        log.error(f"the chaos soak failed (pytest exit {finished.returncode}); figures: {figures}")
        figures["failed"] = True
        return figures
    log.info(describe(figures))
    return figures


def describe(figures: dict[str, Any]) -> str:
    """The soak's figures as the README's reliability table reports them."""
    faults = ", ".join(f"{kind} {n}" for kind, n in figures["faults"].items())
    return "\n".join(
        [
            f"faults injected: {sum(figures['faults'].values())} ({faults}); survived: "
            f"{figures['survived']} (the run finished, one MLflow run, every step logged once)",
            f"final parameters vs the uninterrupted run on 2 workers: max relative difference "
            f"{figures['max_relative_difference']:.2e}",
            f"steps trained twice in all: {figures['steps_lost']:.0f} of {figures['steps']}; "
            f"worker counts over the run: {figures['world_sizes']}; driver starts: "
            f"{figures['driver_starts']}",
            f"wall time: {figures['chaos_s']:.0f} s against {figures['reference_s']:.0f} s "
            f"uninterrupted ({figures['overhead']:.2f}x)",
        ]
    )
