"""Model registry: ``create_model`` and ``list_models`` over the variant table."""

from __future__ import annotations

import dataclasses

from pipeline.models.nfnet import NFNet
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


def create_model(name: str, num_classes: int = 1000, **overrides: object) -> NFNet:
    """Build the registered NFNet ``name``; overrides: drop_rate, stochdepth_rate, padding,
    numerics, activation, alpha, se_ratio, channels_last."""
    variant = get_variant(name)
    numerics = str(overrides.pop("numerics", "official"))
    channels_last = bool(overrides.pop("channels_last", True))
    unknown = sorted(set(overrides) - _VARIANT_OVERRIDES)
    if unknown:
        raise ValueError(
            f"create_model({name!r}): unknown override(s) {unknown}; "
            f"allowed: {sorted(_VARIANT_OVERRIDES | {'numerics', 'channels_last'})}"
        )
    variant = dataclasses.replace(variant, **overrides)
    return NFNet(variant, num_classes, numerics, channels_last)
