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


def create_model(
    name: str,
    num_classes: int = 1000,
    *,
    channels_last: bool = True,
    numerics: str = "official",
    **overrides: object,
) -> nn.Module:
    """Build the registered model ``name``.

    ``channels_last`` makes the model compute its activations in NHWC (the layout oneDNN and
    cuDNN convolve fastest; the trainer passes ``plan.channels_last``). ``numerics`` picks DM's
    or timm's arithmetic (NFNets only). Variant overrides: drop_rate, stochdepth_rate, padding,
    activation, alpha, se_ratio. The batch-normalised baselines (family ``resnet_bn``) take
    drop_rate and channels_last; they have no stochastic depth (a rate above 0 is an error) and
    ignore the NF-only padding and numerics the trainer always passes.
    """
    variant = get_variant(name)
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
        baseline = dataclasses.replace(variant, drop_rate=drop_rate)
        return BNResNet(baseline, num_classes, channels_last)
    variant = dataclasses.replace(variant, **overrides)
    return NFNet(variant, num_classes, str(numerics), channels_last)
