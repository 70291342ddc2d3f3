"""NFNet model family: registry, layers, weight conversion and diagnostics."""

from pipeline.models.convert import (
    load_haiku_weights,
    load_safetensors,
    load_timm_weights,
    save_safetensors,
)
from pipeline.models.diagnostics import count_flops, count_params, signal_propagation
from pipeline.models.nfnet import NFBlock, NFNet
from pipeline.models.registry import create_model, list_models
from pipeline.models.variants import Variant, get_variant

__all__ = [
    "NFBlock",
    "NFNet",
    "Variant",
    "count_flops",
    "count_params",
    "create_model",
    "get_variant",
    "list_models",
    "load_haiku_weights",
    "load_safetensors",
    "load_timm_weights",
    "save_safetensors",
    "signal_propagation",
]
