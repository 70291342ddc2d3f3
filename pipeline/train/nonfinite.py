"""What a run does with a step whose gradient is NaN or Inf (``train.nonfinite``).

The optimizer (``SGD_AGC(skip_nonfinite=True)``) has already left parameters, momentum and (in
the Trainer) the EMA untouched when such a step happens, decided on the device. The flag of
each step stays on the device too (``add``): the Trainer reads the flags of the steps since the
last read in one go (``read``) at each log line and before each checkpoint, then counts them
here (``record``), in step order, and stops the run when the policy says so. A stop is therefore
detected at the next log line or checkpoint at the latest, never after a checkpoint that holds
the step. A non-finite loss on any rank shows up here too: its backward makes that rank's
gradient non-finite, and the all-reduce spreads it, so every rank counts the same steps.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


class NonfiniteStepError(RuntimeError):
    """The run stops on non-finite steps; the message names the config key and the step."""

    def __init__(self, step: int, message: str) -> None:
        super().__init__(message)
        self.step = step


@dataclass
class NonfiniteSteps:
    """The count of skipped steps and the stop rule of ``train.nonfinite``."""

    policy: str  # "skip" or "stop"
    max_in_a_row: int
    total: int = 0
    in_a_row: int = 0
    pending: list[tuple[int, torch.Tensor]] = field(default_factory=list)

    def add(self, step: int, skipped: torch.Tensor) -> None:
        """Keep step ``step``'s flag (a 0-d bool tensor, on the device) for the next ``read``."""
        self.pending.append((step, skipped))

    def read(self) -> list[tuple[int, bool]]:
        """``(step, skipped)`` of every step added since the last read: one host read in all."""
        if not self.pending:
            return []
        steps, flags = zip(*self.pending, strict=True)
        self.pending = []
        return list(zip(steps, torch.stack(flags).tolist(), strict=True))

    def record(self, step: int, skipped: bool) -> None:
        """Count step ``step`` (1-based, as logged) if it was skipped; raise if the run stops."""
        if not skipped:
            self.in_a_row = 0
            return
        self.total += 1
        self.in_a_row += 1
        if self.policy == "stop":
            raise NonfiniteStepError(
                step,
                f"step {step}: the gradient (or the loss) is NaN or Inf and train.nonfinite=stop "
                "ends the run; the update was not applied and no checkpoint holding this step is "
                "written. Look for bad input data or an unstable learning rate (optim.lr), or "
                "set train.nonfinite=skip to skip such steps",
            )
        if self.in_a_row >= self.max_in_a_row:
            raise NonfiniteStepError(
                step,
                f"step {step}: {self.in_a_row} steps in a row had a NaN or Inf gradient "
                f"(train.max_nonfinite_in_a_row={self.max_in_a_row}); the run is diverging or "
                "its data is broken, so it stops here. The last checkpoint holds finite weights",
            )
