"""The benchmark suites: every module of ``pipeline.bench`` with a ``main(argv) -> dict``."""

from __future__ import annotations

import importlib
import logging
import pkgutil
from typing import Any

import pipeline.bench as bench_pkg

log = logging.getLogger(__name__)


def available_suites() -> list[str]:
    """Names of the benchmark suites, sorted."""
    names = []
    for info in pkgutil.iter_modules(bench_pkg.__path__):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"pipeline.bench.{info.name}")
        if callable(getattr(module, "main", None)):
            names.append(info.name)
    return sorted(names)


def run_suites(names: list[str], argv: list[str]) -> dict[str, Any]:
    """Run each named suite with ``argv``; returns ``{suite: the figures it measured}``."""
    results = {}
    for name in names:
        log.info(f"== bench {name} ==")
        results[name] = importlib.import_module(f"pipeline.bench.{name}").main(argv)
    return results
