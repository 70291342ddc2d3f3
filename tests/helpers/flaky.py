"""A call that fails a given number of times, for the retry tests."""

from __future__ import annotations


class Flaky:
    """A call raising ``failures`` in turn, then answering "done"; counts its calls."""

    def __init__(self, *failures: BaseException) -> None:
        self.failures, self.calls = list(failures), 0

    def __call__(self) -> str:
        self.calls += 1
        if self.failures:
            raise self.failures.pop(0)
        return "done"
