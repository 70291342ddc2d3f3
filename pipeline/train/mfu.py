"""Model FLOP utilisation (MFU): the model's training FLOP/s on one worker over its device's peak.

Training FLOPs of one image = 6 × the multiply-adds of one forward pass at the training
resolution (``pipeline.models.count_flops``, counted as DM nfnet.py's count_flops does):

- × 2: a multiply-add is two floating-point operations, and the vendors' peaks count a fused
  multiply-add as two;
- × 3: forward and backward. The backward pass of a convolution or matmul computes two products
  of the forward's size, the gradient of its input and the gradient of its weight, so one
  training step costs three forwards (the convention of Kaplan et al. 2020's 6·N FLOPs per
  token, which PaLM's MFU uses).

Only convolutions and linear layers are counted: the elementwise work (weight standardisation,
activations, SE gates, the optimizer) runs on units no peak figure counts, so MFU reads how much
of the matmul units' peak the whole step achieves. The peak: ``scaling.peak_tflops`` when set;
on a GPU, the vendor's dense (no sparsity) figure by device name for the run's precision; on the
CPU, which has no datasheet figure to look up, a matmul of the run's dtype measured at start-up.
"""

from __future__ import annotations

import logging
import math
import re
import time
from dataclasses import dataclass

import torch

from pipeline.models import count_flops

log = logging.getLogger(__name__)

FLOPS_PER_MULTIPLY_ADD = 2
FORWARD_AND_BACKWARD = 3  # backward = input gradient + weight gradient, each one forward's work
PROBE_SIZE = 1024  # a square matmul large enough for a BLAS's peak, ~2 GFLOP per product
PROBE_REPEATS = 5


@dataclass(frozen=True)
class DevicePeak:
    """Dense peaks of one GPU model in TFLOP/s (None: the device has no such unit)."""

    pattern: str  # a regular expression matched against torch.cuda.get_device_name()
    bf16: float | None  # tensor cores, bf16 inputs, fp32 accumulation
    tf32: float | None  # tensor cores, tf32 (what cuDNN convolves fp32 tensors with by default)
    fp32: float  # CUDA cores
    source: str


_H100 = "NVIDIA H100 Tensor Core GPU datasheet"
_H200 = "NVIDIA H200 Tensor Core GPU datasheet"
_SPARSE = "(the datasheet's with-sparsity tensor figures halved)"
# Ordered: the first pattern that matches the device name wins (H100 NVL before H100).
GPU_PEAKS: tuple[DevicePeak, ...] = (
    DevicePeak(r"\bH200 NVL\b", 835.5, 417.5, 60.0, f"{_H200}, H200 NVL {_SPARSE}"),
    DevicePeak(r"\bH200\b", 989.5, 494.5, 67.0, f"{_H200}, H200 SXM {_SPARSE}"),
    DevicePeak(r"\bH100 NVL\b", 835.5, 417.5, 60.0, f"{_H100}, H100 NVL {_SPARSE}"),
    DevicePeak(r"\bH100\b.*\bPCIe\b", 756.5, 378.0, 51.0, f"{_H100}, H100 PCIe {_SPARSE}"),
    DevicePeak(r"\bH100\b", 989.5, 494.5, 67.0, f"{_H100}, H100 SXM {_SPARSE}"),
    DevicePeak(r"\bA100\b", 312.0, 156.0, 19.5, "NVIDIA A100 Tensor Core GPU datasheet"),
    DevicePeak(r"\bL40S\b", 362.05, 183.0, 91.6, "NVIDIA L40S GPU datasheet"),
    DevicePeak(r"\bL40\b", 181.05, 90.5, 90.5, "NVIDIA L40 GPU datasheet"),
    DevicePeak(r"\bL4\b", 121.0, 60.0, 30.3, f"NVIDIA L4 Tensor Core GPU datasheet {_SPARSE}"),
    # \b after A10 keeps out the A100 and AWS's A10G, for which NVIDIA publishes no datasheet.
    DevicePeak(r"\bA10\b", 125.0, 62.5, 31.2, "NVIDIA A10 Tensor Core GPU datasheet"),
    # Volta's tensor cores take fp16 only: no bf16 or tf32 peak.
    DevicePeak(r"\bV100S\b", None, None, 16.4, "NVIDIA V100 Tensor Core GPU datasheet, V100S"),
    DevicePeak(r"\bV100\b.*\bSXM", None, None, 15.7, "NVIDIA V100 datasheet, V100 SXM2"),
    DevicePeak(r"\bV100\b", None, None, 14.0, "NVIDIA V100 Tensor Core GPU datasheet, PCIe"),
    DevicePeak(
        r"\bRTX 4090\b", 165.2, 82.6, 82.6, "NVIDIA Ada GPU architecture whitepaper, RTX 4090"
    ),
    DevicePeak(
        r"\bRTX 3090\b", 71.0, 35.6, 35.6, "NVIDIA Ampere GA102 GPU architecture whitepaper"
    ),
)


@dataclass(frozen=True)
class Peak:
    """A device's peak for MFU, and where the figure comes from (logged with the run)."""

    tflops: float | None
    source: str


def gpu_peak(name: str, precision: str, tf32: bool = True) -> Peak:
    """The datasheet peak of the GPU called ``name`` for ``precision`` ("bf16" or "fp32").

    fp32 tensors are convolved in tf32 when ``tf32`` (``torch.backends.cudnn.allow_tf32``, on by
    default), so the tf32 tensor-core peak is the one they can reach there.
    """
    row = next((row for row in GPU_PEAKS if re.search(row.pattern, name, re.IGNORECASE)), None)
    if row is None:
        return Peak(None, f"no datasheet peak for {name!r}: set scaling.peak_tflops")
    if precision == "bf16":
        figure, unit = row.bf16, "bf16 tensor cores"
    elif tf32 and row.tf32 is not None:
        figure, unit = row.tf32, "tf32 tensor cores (fp32 convolved as tf32)"
    else:
        figure, unit = row.fp32, "fp32"
    if figure is None:
        return Peak(
            None, f"{name!r} has no {precision} peak ({row.source}): set scaling.peak_tflops"
        )
    return Peak(figure, f"{row.source}: {unit}, dense")


def matmul_tflops(dtype: torch.dtype = torch.float32, size: int = PROBE_SIZE) -> float:
    """The best of a few ``size``² matmuls on the CPU at torch's thread count, in TFLOP/s.

    Five products of 2·size³ FLOPs after one warm-up: about a quarter of a second on one core.
    """
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=generator).to(dtype)
    b = torch.randn(size, size, generator=generator).to(dtype)
    out = torch.mm(a, b)  # warm-up: the BLAS's threads and buffers
    best = math.inf
    for _ in range(PROBE_REPEATS):
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e12


def device_peak(device: torch.device, precision: str, override: float | None = None) -> Peak:
    """The peak MFU divides by: the override, the GPU's datasheet figure, or the CPU probe."""
    if override is not None:
        return Peak(override, "scaling.peak_tflops")
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return gpu_peak(name, precision, torch.backends.cudnn.allow_tf32)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    dtype_name = str(dtype).removeprefix("torch.")
    tflops = matmul_tflops(dtype)
    threads = torch.get_num_threads()
    return Peak(
        tflops,
        f"measured at start-up: {PROBE_SIZE}x{PROBE_SIZE} {dtype_name} matmul, {threads} "
        "thread(s), best of 5 (a CPU has no datasheet peak)",
    )


def train_flops_per_image(model: torch.nn.Module, resolution: int) -> float:
    """FLOPs of one image's forward and backward pass at ``resolution`` (see the module doc)."""
    multiply_adds = count_flops(model, resolution)
    return float(FLOPS_PER_MULTIPLY_ADD * FORWARD_AND_BACKWARD * multiply_adds)


@dataclass(frozen=True)
class Utilisation:
    """Turns a worker's images/s into its TFLOP/s and MFU."""

    flops_per_image: float
    peak: Peak

    def metrics(self, images_per_s_per_worker: float) -> dict[str, float]:
        """``train/tflops_per_worker`` and, where the peak is known, ``train/mfu``."""
        tflops = images_per_s_per_worker * self.flops_per_image / 1e12
        metrics = {"train/tflops_per_worker": tflops}
        if self.peak.tflops:
            metrics["train/mfu"] = tflops / self.peak.tflops
        return metrics

    def params(self) -> dict[str, str]:
        """What the MFU is computed from, as MLflow params."""
        return {
            "mfu.peak_tflops": "none" if self.peak.tflops is None else f"{self.peak.tflops:.4g}",
            "mfu.peak_source": self.peak.source,
            "mfu.train_gflops_per_image": f"{self.flops_per_image / 1e9:.4g}",
        }


def utilisation(
    model: torch.nn.Module,
    resolution: int,
    device: torch.device,
    precision: str,
    override: float | None = None,
) -> Utilisation:
    """The run's FLOPs per training image and its device's peak (the CPU probe runs here)."""
    return Utilisation(
        train_flops_per_image(model, resolution), device_peak(device, precision, override)
    )
