"""``python -m pipeline.bench [SUITE ...] [--json PATH]``: run benchmark suites."""

from __future__ import annotations

import argparse
import importlib
import json
import pkgutil
import sys
from pathlib import Path

import pipeline.bench as bench_pkg


def available_suites() -> list[str]:
    """Names of the benchmark suites (modules of ``pipeline.bench`` with a ``main``)."""
    names = []
    for info in pkgutil.iter_modules(bench_pkg.__path__):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"pipeline.bench.{info.name}")
        if callable(getattr(module, "main", None)):
            names.append(info.name)
    return sorted(names)


def main(argv: list[str] | None = None) -> int:
    """Run the named suites (all when none is named) and optionally save their figures."""
    parser = argparse.ArgumentParser(prog="python -m pipeline.bench", description=__doc__)
    parser.add_argument("suites", nargs="*", help="suites to run (default: all but gpu)")
    parser.add_argument("--json", type=Path, help="write the measured figures to this file")
    args, rest = parser.parse_known_args(argv)
    suites = available_suites()
    chosen = args.suites or [name for name in suites if name != "gpu"]
    unknown = [name for name in chosen if name not in suites]
    if unknown:
        print(f"error: unknown suite(s) {unknown}; available: {suites}", file=sys.stderr)
        return 2
    results = {}
    for name in chosen:
        print(f"== bench {name} ==", flush=True)
        results[name] = importlib.import_module(f"pipeline.bench.{name}").main(rest)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
