"""``python -m pipeline.bench [SUITE ...] [--json PATH]``: run benchmark suites."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pipeline.bench.suites import available_suites, run_suites
from pipeline.cli import add_verbosity, bad_input, configure_logging, finish

# Run only when named: gpu needs a GPU; e2e trains nfnet_f0 for tens of minutes; upload moves
# two nfnet_f0 checkpoints (2 x 860 MB) through a local S3 server, minutes on a small machine;
# chaos runs two trainings through eight faults (about ten minutes).
ON_REQUEST = ("gpu", "e2e", "upload", "chaos")


def main(argv: list[str] | None = None) -> int:
    """Run the named suites (all when none is named) and optionally save their figures."""
    parser = argparse.ArgumentParser(prog="python -m pipeline.bench", description=__doc__)
    parser.add_argument("suites", nargs="*", help=f"default: all but {', '.join(ON_REQUEST)}")
    parser.add_argument("--json", type=Path, help="write the measured figures to this file")
    add_verbosity(parser)
    args, rest = parser.parse_known_args(argv)
    configure_logging(args)
    suites = available_suites()
    chosen = args.suites or [name for name in suites if name not in ON_REQUEST]
    unknown = [name for name in chosen if name not in suites]
    if unknown:
        return bad_input(f"unknown suite(s) {unknown}; available: {suites}")
    results = run_suites(chosen, rest)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    finish(main())
