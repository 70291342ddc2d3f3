"""Benchmarks, side by side with the peer in one run, reported as ratios.

Each suite is a module ``pipeline.bench.<suite>`` exposing ``main(argv: list[str]) -> dict``:
it prints a human-readable report and returns the figures it measured.
"""
