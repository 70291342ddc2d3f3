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


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        group = "integration" if "integration" in item.path.parts else "unit"
        item.add_marker(pytest.mark.xdist_group(group))
