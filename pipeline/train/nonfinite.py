"""What a run does with a step whose gradient is NaN or Inf (``train.nonfinite``).

The optimizer (``SGD_AGC(skip_nonfinite=True)``) has already left parameters and momentum
untouched when such a step reaches here; this counts the step and stops the run when the
policy says so. A non-finite loss on any rank shows up here too: its backward makes that rank's
gradient non-finite, and the all-reduce spreads it, so every rank counts the same steps.
"""

from __future__ import annotations

from dataclasses import dataclass


class NonfiniteStepError(RuntimeError):
    """The run stops on non-finite steps; the message names the config key and the step."""


@dataclass
class NonfiniteSteps:
    """The count of skipped steps and the stop rule of ``train.nonfinite``."""

    policy: str  # "skip" or "stop"
    max_in_a_row: int
    total: int = 0
    in_a_row: int = 0

    def record(self, step: int, skipped: bool) -> None:
        """Count step ``step`` (1-based, as logged) if it was skipped; raise if the run stops."""
        if not skipped:
            self.in_a_row = 0
            return
        self.total += 1
        self.in_a_row += 1
        if self.policy == "stop":
            raise NonfiniteStepError(
                f"step {step}: the gradient (or the loss) is NaN or Inf and train.nonfinite=stop "
                "ends the run here; the update was not applied and no checkpoint of this step is "
                "written. Look for bad input data or an unstable learning rate (optim.lr), or "
                "set train.nonfinite=skip to skip such steps"
            )
        if self.in_a_row >= self.max_in_a_row:
            raise NonfiniteStepError(
                f"step {step}: {self.in_a_row} steps in a row had a NaN or Inf gradient "
                f"(train.max_nonfinite_in_a_row={self.max_in_a_row}); the run is diverging or "
                "its data is broken, so it stops here. The last checkpoint holds finite weights"
            )
