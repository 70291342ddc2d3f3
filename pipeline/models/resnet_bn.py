"""The batch-normalised ResNet baseline for NF-vs-BN comparisons, from torchvision's ResNet parts.

torchvision's ``ResNet`` class fixes its widths at 64-512, far larger than the small NFNets a
CPU can train, so this model assembles the same pieces at a chosen width: torchvision's stem
(7×7 conv, stride 2, BN, ReLU, 3×3 max-pool, stride 2), stages of torchvision ``BasicBlock``
(two 3×3 convs with BN, a 1×1 conv + BN projection when the shape changes), global average
pooling and the shared classifier head (``head.fc``, so parameter groups and finetuning find it).
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, conv1x1

from pipeline.models.nfnet import ClassifierHead
from pipeline.models.variants import Variant


class BNResNet(nn.Module):
    """A ResNet with batch normalisation built from a ``Variant`` row (family ``resnet_bn``)."""

    def __init__(
        self, variant: Variant, num_classes: int = 1000, channels_last: bool = False
    ) -> None:
        super().__init__()
        self.variant, self.channels_last = variant, channels_last
        stem_width = variant.stem_widths[0]
        self.stem = nn.Sequential(
            nn.Conv2d(3, stem_width, kernel_size=7, stride=2, padding=3, bias=False),
            nn.BatchNorm2d(stem_width),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
        )
        blocks, in_channels = [], stem_width
        for depth, width, stride in zip(
            variant.depths, variant.widths, variant.stage_strides, strict=True
        ):
            for index in range(depth):
                block_stride = stride if index == 0 else 1
                downsample = None
                if block_stride != 1 or in_channels != width:
                    downsample = nn.Sequential(
                        conv1x1(in_channels, width, block_stride), nn.BatchNorm2d(width)
                    )
                blocks.append(BasicBlock(in_channels, width, block_stride, downsample))
                in_channels = width
        self.blocks = nn.Sequential(*blocks)
        self.head = ClassifierHead(in_channels, num_classes, variant.drop_rate)
        self._init_weights()

    def _init_weights(self) -> None:
        # torchvision ResNet.__init__: He-normal convs (fan_out, ReLU), BN scale 1 and shift 0.
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """The feature map before pooling (NHWC activations with ``channels_last``)."""
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return self.blocks(self.stem(images))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits for a (B, 3, H, W) batch."""
        return self.head(self.forward_features(images))
