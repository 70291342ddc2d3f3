"""``python -m pipeline.models {list,info,spp}``: inspect the registered NFNets."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch

from pipeline.models.diagnostics import (
    blockwise_noise,
    count_flops,
    count_params,
    signal_propagation,
)
from pipeline.models.registry import create_model, list_models
from pipeline.models.variants import get_variant


def _info(name: str, resolution: int | None) -> None:
    variant = get_variant(name)
    resolution = resolution or variant.test_resolution
    print(f"model            {name}")
    print(f"depths           {list(variant.depths)}")
    print(f"widths           {list(variant.widths)}")
    print(f"resolution       train {variant.train_resolution}, test {variant.test_resolution}")
    print(f"parameters       {count_params(name):,}")
    flops = count_flops(name, resolution)
    print(f"FLOPs @{resolution:<9} {flops:,} multiply-adds ({flops / 1e9:.2f} G)")


def _plot_spp(name: str, out: Path, batch: int, size: int, seed: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    torch.manual_seed(seed)
    model = create_model(name)
    noise = blockwise_noise(model, batch, size, generator=torch.Generator().manual_seed(seed))
    signals = signal_propagation(model, noise)
    index = [s.index for s in signals]
    fig, (ax_var, ax_mean) = plt.subplots(1, 2, figsize=(11, 4))
    ax_var.plot(index, [s.avg_variance for s in signals], "o-", label="measured")
    ax_var.plot(index, [s.expected_variance for s in signals], "k--", label="expected (beta)")
    ax_var.set(xlabel="residual block", ylabel="average channel variance", title=name)
    ax_var.legend()
    ax_mean.plot(index, [s.avg_squared_mean for s in signals], "o-")
    ax_mean.set(xlabel="residual block", ylabel="average channel squared mean")
    fig.tight_layout()
    # Write next to the target, then rename: no half-written PNG if anything fails.
    handle, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".png")
    os.close(handle)
    try:
        fig.savefig(tmp, dpi=100)
        os.replace(tmp, out)
    finally:
        Path(tmp).unlink(missing_ok=True)
        plt.close(fig)
    for s in signals:
        print(f"block {s.index:3d}  var {s.avg_variance:.4f}  expected {s.expected_variance:.4f}")
    print(f"wrote {out}")


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code (2 for bad input)."""
    parser = argparse.ArgumentParser(prog="python -m pipeline.models", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="list the registered models")
    info = sub.add_parser("info", help="parameters and FLOPs (DM count_flops convention)")
    info.add_argument("name")
    info.add_argument("--resolution", type=int, help="image size (default: test resolution)")
    spp = sub.add_parser("spp", help="signal propagation plot at initialisation")
    spp.add_argument("name")
    spp.add_argument("--out", type=Path, required=True, help="PNG file to write")
    spp.add_argument("--batch", type=int, default=8)
    spp.add_argument("--size", type=int, default=64, help="spatial size of the body input")
    spp.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        if args.command == "list":
            print("\n".join(list_models()))
        elif args.command == "info":
            if args.resolution is not None and args.resolution < 1:
                raise ValueError(f"--resolution must be positive, got {args.resolution}")
            _info(args.name, args.resolution)
        else:
            if not args.out.parent.is_dir():
                raise ValueError(f"--out {args.out}: directory {args.out.parent} does not exist")
            _plot_spp(args.name, args.out, args.batch, args.size, args.seed)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
