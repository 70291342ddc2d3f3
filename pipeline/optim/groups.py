"""Optimizer parameter groups chosen by parameter name, as DM experiment_nfnets.py ``_make_opt``."""

from __future__ import annotations

import torch

# DM experiment_nfnets.py pred_gb: Haiku names 'scale', 'offset', 'b', or containing 'gain' or
# 'bias' (which covers skip_gain) get no weight decay. 'b' is Haiku's bias; PyTorch says 'bias'.
_NO_DECAY_NAMES = ("scale", "offset")
_NO_DECAY_SUBSTRINGS = ("gain", "bias")


def _is_gain_or_bias(name: str, param: torch.Tensor) -> bool:
    leaf = name.rsplit(".", 1)[-1]
    if leaf in _NO_DECAY_NAMES or any(part in leaf for part in _NO_DECAY_SUBSTRINGS):
        return True
    # Any other scalar or vector is a gain/bias-like parameter too (DM clips and never decays
    # them); only weights with one row per output unit take weight decay.
    return param.ndim <= 1


def param_groups(
    model: torch.nn.Module,
    weight_decay: float,
    clipping: float | None,
    classifier_name: str = "head.fc",
) -> list[dict]:
    """SGD_AGC groups by name: gains/biases/skip gains (no decay, clipped), the classifier weight
    ``{classifier_name}.weight`` (decay, never clipped), everything else (decay, clipped).

    ``clipping=None`` turns AGC off in every group. Raises ValueError if no parameter is called
    ``{classifier_name}.weight``: clipping the classifier would silently change the recipe (DM
    experiment_nfnets.py never clips it).
    """
    classifier_weight = f"{classifier_name}.weight"
    settings = {
        "gains_biases": (0.0, clipping),
        "classifier": (weight_decay, None),
        "weights": (weight_decay, clipping),
    }
    groups = {
        key: {"params": [], "param_names": [], "weight_decay": decay, "clipping": clip}
        for key, (decay, clip) in settings.items()
    }
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name == classifier_weight:
            key = "classifier"
        elif _is_gain_or_bias(name, param):
            key = "gains_biases"
        else:
            key = "weights"
        groups[key]["params"].append(param)
        groups[key]["param_names"].append(name)
    if not groups["classifier"]["params"]:
        names = [name for name, _ in model.named_parameters()]
        raise ValueError(
            f"param_groups: no trainable parameter named {classifier_weight!r} (classifier_name="
            f"{classifier_name!r}); the last parameters are {names[-4:]}. Pass the classifier "
            "module's name as classifier_name so that AGC leaves the final layer unclipped."
        )
    return [dict(group, name=key) for key, group in groups.items() if group["params"]]
