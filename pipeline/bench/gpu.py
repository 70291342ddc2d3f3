"""``python -m pipeline.bench gpu``: NFNet-F0 training images/s on one GPU against timm, and MFU.

bf16 autocast, channels_last, the paper's 192 px training resolution, the same batch for both
models (``--batch``, default 128). Model FLOP utilisation = 3 × forward multiply-adds × 2 FLOPs
× images/s ÷ the card's dense bf16 peak (forward + backward ≈ 3 forwards). Needs a CUDA GPU:
without one it says so and exits 2 (nothing is guessed).
"""

from __future__ import annotations

import argparse
import sys
import time

# Dense bf16 tensor-core peaks from the vendors' data sheets (FLOP/s), by device-name fragment.
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}


def images_per_second(model, batch: int, resolution: int, steps: int) -> float:
    """Forward + backward + SGD step of ``model`` on random data; images/s after warm-up."""
    import torch

    images = torch.randn(batch, 3, resolution, resolution, device="cuda")
    images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 1000, (batch,), device="cuda")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    for index in range(steps + 3):
        if index == 3:  # the first steps pay for cuDNN autotuning and allocation
            torch.cuda.synchronize()
            started = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(images).float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - started)


def main(argv: list[str]) -> dict:
    """Measure ours and timm's dm_nfnet_f0 in one run; print images/s, the ratio and MFU."""
    import torch

    parser = argparse.ArgumentParser(prog="python -m pipeline.bench gpu")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    args, _ = parser.parse_known_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA GPU on this machine: the gpu suite measures nothing here", file=sys.stderr)
        raise SystemExit(2)
    import timm

    # deferred: torch and timm load only once a GPU is known to be there
    from pipeline.models import count_flops, create_model

    torch.backends.cudnn.benchmark = True
    resolution = 192  # DM base.py: F0 trains at 192 px
    ours = create_model("nfnet_f0").cuda().to(memory_format=torch.channels_last)
    theirs = timm.create_model("dm_nfnet_f0", pretrained=False).cuda()
    theirs = theirs.to(memory_format=torch.channels_last)
    ours_rate = images_per_second(ours, args.batch, resolution, args.steps)
    timm_rate = images_per_second(theirs, args.batch, resolution, args.steps)
    name = torch.cuda.get_device_name()
    peak = next((flops for key, flops in PEAK_BF16.items() if key in name), None)
    train_flops = 3 * 2 * count_flops("nfnet_f0", resolution)
    mfu = ours_rate * train_flops / peak if peak else float("nan")
    print(f"{name}: batch {args.batch}, {resolution} px, bf16, channels_last")
    print(
        f"ours {ours_rate:.1f} img/s, timm {timm_rate:.1f} img/s, ratio {ours_rate / timm_rate:.2f}"
    )
    print(f"model FLOP utilisation {mfu:.1%}" if peak else "MFU: unknown peak for this device")
    return {"device": name, "ours": ours_rate, "timm": timm_rate, "mfu": mfu}
