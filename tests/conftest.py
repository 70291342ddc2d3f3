"""Shared pytest set-up: the CPU accelerator for DeepSpeed, the session-wide fixtures, and the
split of the suite over two pytest-xdist workers (``make test`` runs ``-n 2 --dist loadgroup``).

The integration tests spend most of their time waiting (for Ray to start a worker group, for a
drain's deadline, for a retry's backoff), so the unit tests run beside them in a second worker
process: each directory is one xdist group, run in order by one worker, with its own Ray cluster
and MLflow server where its tests ask for them.
"""

import os

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")

pytest_plugins = ["tests.fixtures.mlflow_server", "tests.fixtures.ray_cluster"]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    soak = pytest.mark.skip(reason="the chaos soak runs with --chaos-faults N (bench chaos)")
    for item in items:
        group = "integration" if "integration" in item.path.parts else "unit"
        item.add_marker(pytest.mark.xdist_group(group))
        if item.get_closest_marker("chaos") and not config.getoption("--chaos-faults"):
            item.add_marker(soak)  # before its fixtures start anything


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("chaos soak (tests/integration/test_chaos_soak.py)")
    group.addoption("--chaos-faults", type=int, default=0, help="faults to inject (0: skip)")
    group.addoption("--chaos-seed", type=int, default=0, help="seed of the fault schedule")
    group.addoption("--chaos-report", default=None, help="write the soak's figures as JSON here")
