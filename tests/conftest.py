"""Shared pytest set-up: the CPU accelerator for DeepSpeed, the session-wide fixtures, and the
chaos soak's options (it runs only when asked: ``python -m pipeline.bench chaos``).

``make test`` runs two pytest processes side by side (the integration tests mostly wait: for Ray
to start a worker group, a drain's deadline, a retry's backoff): the cluster-fault tests in one,
the unit tests and the integration tests that time nothing in the other (the Makefile's
``BESIDE``); each process starts its own Ray head and servers where its tests ask for them.
"""

import os

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")

pytest_plugins = ["tests.fixtures.mlflow_server", "tests.fixtures.ray_cluster"]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    soak = pytest.mark.skip(reason="the chaos soak runs with --chaos-faults N (bench chaos)")
    for item in items:
        if item.get_closest_marker("chaos") and not config.getoption("--chaos-faults"):
            item.add_marker(soak)  # before its fixtures start anything


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("chaos soak (tests/integration/test_chaos_soak.py)")
    group.addoption("--chaos-faults", type=int, default=0, help="faults to inject (0: skip)")
    group.addoption("--chaos-seed", type=int, default=0, help="seed of the fault schedule")
    group.addoption("--chaos-report", default=None, help="write the soak's figures as JSON here")
