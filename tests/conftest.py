"""Shared pytest set-up: the CPU accelerator for DeepSpeed and the session-wide fixtures."""

import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")

pytest_plugins = ["tests.fixtures.mlflow_server", "tests.fixtures.ray_cluster"]
