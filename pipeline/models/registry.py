"""Model registry: ``create_model`` and ``list_models`` over the variant table."""

from __future__ import annotations

import dataclasses

from torch import nn

from pipeline.models.nfnet import NFNet
from pipeline.models.resnet_bn import BNResNet
from pipeline.models.variants import VARIANTS, get_variant

# Variant fields a caller may override per model (the rest define the architecture's identity).
_VARIANT_OVERRIDES = {
    "drop_rate",
    "stochdepth_rate",
    "padding",
    "activation",
    "alpha",
    "se_ratio",
}


def list_models() -> list[str]:
    """Names accepted by ``create_model``, sorted."""
    return sorted(VARIANTS)


def create_model(name: str, num_classes: int = 1000, **overrides: object) -> nn.Module:
    """Build the registered model ``name``; overrides: drop_rate, stochdepth_rate, padding,
    numerics, activation, alpha, se_ratio, channels_last.

    The batch-normalised baselines (family ``resnet_bn``) take drop_rate; they have no stochastic
    depth (a rate above 0 is an error) and ignore the NF-only settings the trainer always passes
    (padding, numerics, channels_last: their convolutions are PyTorch's own).
    """
    variant = get_variant(name)
    numerics = str(overrides.pop("numerics", "official"))
    channels_last = bool(overrides.pop("channels_last", True))
    unknown = sorted(set(overrides) - _VARIANT_OVERRIDES)
    if unknown:
        raise ValueError(
            f"create_model({name!r}): unknown override(s) {unknown}; "
            f"allowed: {sorted(_VARIANT_OVERRIDES | {'numerics', 'channels_last'})}"
        )
    if variant.family == "resnet_bn":
        if overrides.get("stochdepth_rate"):
            raise ValueError(f"create_model({name!r}): a BN ResNet has no stochastic depth")
        drop_rate = overrides.get("drop_rate", variant.drop_rate)
        return BNResNet(dataclasses.replace(variant, drop_rate=drop_rate), num_classes)
    variant = dataclasses.replace(variant, **overrides)
    return NFNet(variant, num_classes, numerics, channels_last)
