"""What ``python -m pipeline.models`` reports: a registered model's shape and cost, and its signal
propagation at initialisation as a PNG plot."""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.models.diagnostics import (
    BlockSignal,
    blockwise_noise,
    count_flops,
    count_params,
    signal_propagation,
)
from pipeline.models.registry import create_model
from pipeline.models.variants import Variant, get_variant

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelSummary:
    """A registered model's variant, parameter count and FLOPs at one resolution."""

    variant: Variant
    params: int
    resolution: int
    flops: int  # multiply-adds (DM count_flops convention)

    def lines(self) -> list[str]:
        """The summary as aligned ``label value`` lines."""
        variant = self.variant
        return [
            f"model            {variant.name}",
            f"depths           {list(variant.depths)}",
            f"widths           {list(variant.widths)}",
            f"resolution       train {variant.train_resolution}, test {variant.test_resolution}",
            f"parameters       {self.params:,}",
            f"FLOPs @{self.resolution:<9} {self.flops:,} multiply-adds ({self.flops / 1e9:.2f} G)",
        ]


def summarize(name: str, resolution: int | None = None) -> ModelSummary:
    """The summary of the registered model ``name``, FLOPs at ``resolution`` (default: its test
    resolution)."""
    variant = get_variant(name)
    resolution = resolution or variant.test_resolution
    return ModelSummary(variant, count_params(name), resolution, count_flops(name, resolution))


def plot_signal_propagation(
    name: str, out: Path, batch: int = 8, size: int = 64, seed: int = 0
) -> list[BlockSignal]:
    """Measure the residual stream of a freshly initialised ``name`` on blockwise noise and write
    the plot (variance against the expected one, squared mean) to ``out``; returns the signals."""
    from matplotlib.figure import Figure  # matplotlib takes ~0.5 s to import

    torch.manual_seed(seed)
    model = create_model(name)
    noise = blockwise_noise(model, batch, size, generator=torch.Generator().manual_seed(seed))
    signals = signal_propagation(model, noise)
    index = [s.index for s in signals]
    figure = Figure(figsize=(11, 4))
    ax_var, ax_mean = figure.subplots(1, 2)
    ax_var.plot(index, [s.avg_variance for s in signals], "o-", label="measured")
    ax_var.plot(index, [s.expected_variance for s in signals], "k--", label="expected (beta)")
    ax_var.set(xlabel="residual block", ylabel="average channel variance", title=name)
    ax_var.legend()
    ax_mean.plot(index, [s.avg_squared_mean for s in signals], "o-")
    ax_mean.set(xlabel="residual block", ylabel="average channel squared mean")
    figure.tight_layout()
    # Written next to the target, then renamed: no half-written PNG under the final name.
    handle, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".png")
    os.close(handle)
    try:
        figure.savefig(tmp, dpi=100)
        os.replace(tmp, out)
    finally:
        Path(tmp).unlink(missing_ok=True)
    for s in signals:
        log.info(
            f"block {s.index:3d}  var {s.avg_variance:.4f}  expected {s.expected_variance:.4f}"
        )
    log.info(f"wrote {out}")
    return signals
