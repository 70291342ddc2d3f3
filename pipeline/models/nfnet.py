"""The NFNet model (Brock et al. 2021): stem, NF bottleneck blocks, head."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.models.layers import (
    ACTIVATION_GAMMAS,
    NUMERICS,
    SqueezeExcite,
    WSConv2d,
    activation_fn,
    stochastic_depth_mask,
)
from pipeline.models.variants import Variant


class NFBlock(nn.Module):
    """NF bottleneck block: 1x1, grouped 3x3, grouped 3x3, 1x1, SE, skip gain, alpha, shortcut."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int,
        beta: float,
        stochdepth_rate: float,
        variant: Variant,
        numerics: str,
    ) -> None:
        super().__init__()
        self.in_channels, self.out_channels, self.stride = in_channels, out_channels, stride
        self.alpha, self.beta = variant.alpha, beta
        self.stochdepth_rate = stochdepth_rate
        self.act = activation_fn(variant.activation, numerics)
        gamma = ACTIVATION_GAMMAS[variant.activation]
        # DM nfnet.py NFBlock: width = int(out_ch * expansion), rounded down to whole groups.
        groups = int(out_channels * variant.bottleneck_ratio) // variant.group_width
        if groups < 1:
            raise ValueError(
                f"block width {out_channels} x {variant.bottleneck_ratio} is below one group of "
                f"{variant.group_width} channels"
            )
        mid = groups * variant.group_width
        self.groups, self.mid_channels = groups, mid

        def conv(cin: int, cout: int, k: int, s: int = 1, g: int = 1, scale: float = gamma):
            return WSConv2d(cin, cout, k, s, g, variant.padding, numerics, input_scale=scale)

        # The block input is act(x) * beta; gamma * beta is folded into the two convs that read it.
        self.conv0 = conv(in_channels, mid, 1, scale=gamma * beta)
        self.conv1 = conv(mid, mid, 3, stride, groups)
        self.conv1b = conv(mid, mid, 3, 1, groups)
        self.conv2 = conv(mid, out_channels, 1)
        # DM nfnet.py: a projection shortcut on downsampling or on a change of width.
        self.use_projection = stride > 1 or in_channels != out_channels
        if self.use_projection:
            self.conv_shortcut = conv(in_channels, out_channels, 1, scale=gamma * beta)
        self.se = SqueezeExcite(out_channels, variant.se_ratio)
        # DM nfnet.py: SkipInit gain 'skip_gain', a scalar initialised to 0. Stored with shape
        # (1,), not (): DeepSpeed's start-up broadcast views every parameter as bytes, which
        # fails for 0-dim tensors. Loaders reshape timm's and Haiku's () gains to it.
        self.skip_gain = nn.Parameter(torch.zeros(1))

    def residual(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The activated input (without gamma * beta) and the residual branch before the SE gate."""
        act_in = self.act(x)
        out = self.conv0(act_in)
        out = self.conv1(self.act(out))
        out = self.conv1b(self.act(out))
        return act_in, self.conv2(self.act(out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x + alpha * skip_gain * [stochdepth] * 2 * SE(r) * r, with r the residual branch."""
        act_in, out = self.residual(x)
        if self.stride > 1:
            # Haiku avg_pool 2x2/2 SAME divides by the count of valid inputs at the border.
            pooled = F.avg_pool2d(act_in, 2, 2, ceil_mode=True, count_include_pad=False)
            shortcut = self.conv_shortcut(pooled)
        elif self.use_projection:
            shortcut = self.conv_shortcut(act_in)
        else:
            shortcut = x
        # DM nfnet.py: out = 2 * SE(out) * out. All per-channel and per-example factors are folded
        # into one (B, C, 1, 1) scale so the full-size tensor is touched once (by addcmul).
        scale = self.se(out) * (self.skip_gain * (2.0 * self.alpha))
        # DM nfnet.py: stochastic depth only when 0 < rate < 1, and only in training.
        if self.training and 0.0 < self.stochdepth_rate < 1.0:
            scale = scale * stochastic_depth_mask(x.shape[0], self.stochdepth_rate, out)
        return torch.addcmul(shortcut, out, scale)


class Stem(nn.Module):
    """Four 3x3 WS convs (strides 2, 1, 1, 2) with activations between; none after the last."""

    def __init__(self, variant: Variant, numerics: str) -> None:
        super().__init__()
        self.act = activation_fn(variant.activation, numerics)
        gamma = ACTIVATION_GAMMAS[variant.activation]
        widths = (3, *variant.stem_widths)
        strides = (2, 1, 1, 2)  # DM nfnet.py stem_conv0..3
        for i, stride in enumerate(strides):
            # Every conv after the first reads act(.) * gamma; gamma is folded into its weight.
            scale = 1.0 if i == 0 else gamma
            conv = WSConv2d(
                widths[i], widths[i + 1], 3, stride, 1, variant.padding, numerics, scale
            )
            self.add_module(f"conv{i}", conv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Stem output (stride 4)."""
        x = self.conv0(x)
        x = self.conv1(self.act(x))
        x = self.conv2(self.act(x))
        return self.conv3(self.act(x))


class ClassifierHead(nn.Module):
    """Global mean pool, dropout, Linear initialised N(0, 0.01)."""

    def __init__(self, in_features: int, num_classes: int, drop_rate: float) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be at least 1, got {num_classes}")
        self.dropout = nn.Dropout(drop_rate)
        self.fc = nn.Linear(in_features, num_classes)
        # DM nfnet.py: fc_init = RandomNormal(mean=0, stddev=0.01); Haiku bias init 0.
        nn.init.normal_(self.fc.weight, 0.0, 0.01)
        nn.init.zeros_(self.fc.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Logits from a (B, C, H, W) feature map."""
        return self.fc(self.dropout(features.mean(dim=(2, 3))))


class NFNet(nn.Module):
    """Normalizer-Free Network built from a ``Variant`` table row."""

    def __init__(
        self,
        variant: Variant,
        num_classes: int = 1000,
        numerics: str = "official",
        channels_last: bool = True,
    ) -> None:
        super().__init__()
        if numerics not in NUMERICS:
            raise ValueError(f"numerics must be one of {NUMERICS}, got {numerics!r}")
        if variant.activation not in ACTIVATION_GAMMAS:
            raise ValueError(
                f"unknown activation {variant.activation!r}; "
                f"choose one of {sorted(ACTIVATION_GAMMAS)}"
            )
        self.variant, self.numerics, self.num_classes = variant, numerics, num_classes
        # NHWC activations let oneDNN (CPU) and cuDNN skip layout reorders around every conv:
        # ~15 % faster convolutions on CPU. Parameters keep their usual (OIHW) layout.
        self.channels_last = channels_last
        self.stem = Stem(variant, numerics)
        self.blocks = nn.Sequential(*self._make_blocks(variant, numerics))
        self.final_conv = WSConv2d(
            variant.widths[-1], variant.final_conv_width, 1, 1, 1, variant.padding, numerics
        )
        self.act = activation_fn(variant.activation, numerics)
        self.gamma = ACTIVATION_GAMMAS[variant.activation]
        self.head = ClassifierHead(variant.final_conv_width, num_classes, variant.drop_rate)

    @staticmethod
    def _make_blocks(variant: Variant, numerics: str) -> list[NFBlock]:
        blocks = []
        total = sum(variant.depths)
        channels = variant.stem_widths[-1]
        expected_std = 1.0
        stages = zip(variant.widths, variant.depths, variant.stage_strides, strict=True)
        for width, depth, stride in stages:
            for i in range(depth):
                # DM nfnet.py: stochdepth rate * index / num_blocks, index counted over all blocks.
                rate = variant.stochdepth_rate * len(blocks) / total
                beta = 1.0 / expected_std
                block = NFBlock(
                    channels, width, stride if i == 0 else 1, beta, rate, variant, numerics
                )
                blocks.append(block)
                channels = width
                # DM nfnet.py: a stage's first block resets the expected std, then every block adds
                # alpha^2 of variance.
                if i == 0:
                    expected_std = 1.0
                expected_std = (expected_std**2 + variant.alpha**2) ** 0.5
        return blocks

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Activated final-conv feature map (B, final_conv_width, H/32, W/32) before pooling."""
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x = self.blocks(self.stem(x))
        return self.act(self.final_conv(x)) * self.gamma

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, num_classes)."""
        return self.head(self.forward_features(x))
