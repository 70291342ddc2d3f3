"""Model diagnostics: parameter and FLOP counts, signal propagation at initialisation."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from pipeline.models.layers import WSConv2d
from pipeline.models.nfnet import NFBlock, NFNet
from pipeline.models.registry import create_model


def _meta_model(name: str, num_classes: int = 1000) -> NFNet:
    # The meta device allocates no memory, so even F7 (0.5 G parameters) builds instantly.
    with torch.device("meta"):
        return create_model(name, num_classes=num_classes)


def count_params(name: str, num_classes: int = 1000) -> int:
    """Number of trainable parameters of the registered model ``name`` (built on ``meta``)."""
    return sum(p.numel() for p in _meta_model(name, num_classes).parameters())


def _conv_flops(conv: WSConv2d, height: float, width: float) -> float:
    # DM base.py count_conv_flops: out_ch * (h * w) / prod(stride) * (in_ch / groups) * kh * kw.
    outputs = conv.out_channels * height * width / conv.stride**2
    return outputs * conv.in_channels / conv.groups * conv.kernel_size**2


def _block_flops(block: NFBlock, height: float, width: float) -> float:
    # DM nfnet.py NFBlock.count_flops: conv0 and conv1 at the input size, the rest after stride.
    flops = _conv_flops(block.conv0, height, width) + _conv_flops(block.conv1, height, width)
    height, width = height / block.stride, width / block.stride
    flops += _conv_flops(block.conv1b, height, width) + _conv_flops(block.conv2, height, width)
    if block.use_projection:
        flops += _conv_flops(block.conv_shortcut, height, width)
    # SE linears act on pooled features: hidden * C for each of the two.
    return flops + 2 * block.se.fc1.out_features * block.out_channels


def count_flops(name_or_model: str | NFNet, resolution: int) -> int:
    """Multiply-adds of one image at ``resolution``, counted as DM nfnet.py count_flops does."""
    model = _meta_model(name_or_model) if isinstance(name_or_model, str) else name_or_model
    if not isinstance(model, NFNet):
        return _traced_flops(model, resolution)
    height = width = float(resolution)
    total = 0.0
    for conv in (model.stem.conv0, model.stem.conv1, model.stem.conv2, model.stem.conv3):
        total += _conv_flops(conv, height, width)
        height, width = height / conv.stride, width / conv.stride
    for block in model.blocks:
        total += _block_flops(block, height, width)
        height, width = height / block.stride, width / block.stride
    total += _conv_flops(model.final_conv, height, width)
    total += model.head.fc.in_features * model.head.fc.out_features
    return round(total)


def _traced_flops(model: torch.nn.Module, resolution: int) -> int:
    """Conv and linear multiply-adds of any model, from output shapes seen in a meta forward."""
    total = 0

    def count(module: torch.nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
        nonlocal total
        if isinstance(module, torch.nn.Conv2d):
            kernel = module.kernel_size[0] * module.kernel_size[1]
            total += output[0].numel() * module.in_channels // module.groups * kernel
        elif isinstance(module, torch.nn.Linear):
            total += module.in_features * module.out_features

    traced = copy.deepcopy(model).to("meta").eval()  # the caller's model keeps its weights
    layers = (torch.nn.Conv2d, torch.nn.Linear)
    for module in traced.modules():
        if isinstance(module, layers):
            module.register_forward_hook(count)
    with torch.no_grad():
        traced(torch.empty(1, 3, resolution, resolution, device="meta"))
    return total


@dataclass(frozen=True)
class BlockSignal:
    """Statistics of the residual stream after one block (index 0 is the stem output)."""

    index: int
    avg_squared_mean: float
    avg_variance: float
    expected_variance: float


def expected_variances(model: NFNet) -> list[float]:
    """Expected residual-stream variance after the stem and each block (DM beta bookkeeping)."""
    alpha = model.variant.alpha
    expected = [1.0]
    for depth in model.variant.depths:
        for i in range(depth):
            # A stage's first block resets to a unit-variance shortcut; each block adds alpha^2.
            previous = 1.0 if i == 0 else expected[-1]
            expected.append(previous + alpha**2)
    return expected


def blockwise_noise(
    model: NFNet, batch: int, size: int, cell: int = 0, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Unit Gaussian body input (the stem's output shape), constant on aligned square cells.

    DM's bookkeeping assumes the 2x2 average-pool shortcut keeps the variance; that holds for
    signals smooth at the pooling scale, not for white noise (a mean of 4 independent values has
    1/4 of the variance). Cells of 2**num_stages pixels or more keep every pooling window inside
    one cell; the default (2**(num_stages + 1)) also leaves the 3x3 convs' smearing at cell
    borders a small share, so the measured stream can be compared with the bookkeeping.
    """
    cell = cell or 2 ** (len(model.variant.depths) + 1)
    if size % cell:
        raise ValueError(f"size {size} must be a multiple of the cell size {cell}")
    channels = model.variant.stem_widths[-1]
    noise = torch.randn(batch, channels, size // cell, size // cell, generator=generator)
    return noise.repeat_interleave(cell, dim=2).repeat_interleave(cell, dim=3)


@torch.no_grad()
def signal_propagation(
    model: NFNet, inputs: torch.Tensor, skip_gain: float = 1.0
) -> list[BlockSignal]:
    """Per-block average channel squared mean and variance of the residual stream.

    ``inputs`` are images (3 channels; entry 0 is then the stem output) or a body input with the
    stem's output channels (entry 0 is that input). The skip gains are set to ``skip_gain`` while
    measuring: their init value 0 would hide every residual branch, and the NF-ResNet paper's
    plots have no SkipInit gain (i.e. a gain of 1).
    """
    streams: list[torch.Tensor] = []
    hooks = [b.register_forward_hook(lambda _m, _i, out: streams.append(out)) for b in model.blocks]
    saved = [block.skip_gain.detach().clone() for block in model.blocks]
    was_training = model.training
    try:
        for block in model.blocks:
            block.skip_gain.fill_(skip_gain)
        model.eval()
        body_input = model.stem(inputs) if inputs.shape[1] == 3 else inputs
        streams.append(body_input)
        model.blocks(body_input)
    finally:
        for hook in hooks:
            hook.remove()
        for block, gain in zip(model.blocks, saved, strict=True):
            block.skip_gain.copy_(gain)
        model.train(was_training)
    signals = []
    for i, (out, expected) in enumerate(zip(streams, expected_variances(model), strict=True)):
        # Statistics per channel over (batch, height, width), then averaged over channels.
        var, mean = torch.var_mean(out.double(), dim=(0, 2, 3), correction=0)
        signals.append(BlockSignal(i, mean.square().mean().item(), var.mean().item(), expected))
    return signals
