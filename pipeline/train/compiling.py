"""``train.compile``: the model compiled with ``torch.compile`` before DeepSpeed wraps it.

NFNets are full of small elementwise ops (weight standardisation, scaled activations, SE gates,
skip gains) that Inductor fuses into the kernels around the convolutions. The model is compiled
in place (``nn.Module.compile``), so its parameter names, its state dict, the EMA copy and the
checkpoints are those of the eager model; a deep copy (the EMA) is not compiled.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)


def use_compile(setting: bool | None, device: torch.device) -> bool:
    """``train.compile``; None: on for a GPU, off for the CPU.

    On the CPU, compiled ``nfnet_f0`` trains 1.02x faster than eager on one core (``python -m
    pipeline.bench models``), within the run-to-run spread, and Inductor's first C++ builds take
    minutes on 2 cores (about one for ``nfnet_micro``; seconds once they are cached).
    """
    return device.type == "cuda" if setting is None else setting


def compile_model(model: torch.nn.Module) -> torch.nn.Module:
    """Compile ``model``'s forward (and, through AOTAutograd, its backward) in place.

    Random ops (stochastic depth, dropout) keep drawing from torch's generator as in eager mode
    (Inductor's ``fallback_random``), so under the Trainer's seeding a compiled step draws the
    numbers the eager step draws and trains alike, to float rounding (tests/unit/test_compile.py).
    """
    import torch._inductor.config as inductor_config  # Inductor loads only when compiling

    inductor_config.fallback_random = True
    model.compile()
    log.info("model compiled with torch.compile (Inductor); the first step pays for the build")
    return model
