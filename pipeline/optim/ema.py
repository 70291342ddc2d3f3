"""Exponential moving average of a model's weights with DM utils.py's TF1-style decay warm-up."""

from __future__ import annotations

import copy

import torch

# DM experiment_nfnets.py: use_ema=True, ema_decay=0.99999.
DEFAULT_EMA_DECAY = 0.99999


def ema_decay_at(decay: float, step: int) -> float:
    """DM utils.py tf1_ema: the decay actually used at ``step``, ``min(decay, (1+t)/(10+t))``."""
    return min(decay, (1.0 + step) / (10.0 + step))


class ModelEma:
    """An EMA copy of a model, kept in ``ema.module`` (evaluate with it directly)."""

    def __init__(self, model: torch.nn.Module, decay: float = DEFAULT_EMA_DECAY) -> None:
        if not 0 < decay < 1:
            raise ValueError(f"ModelEma: decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.module = copy.deepcopy(model).eval()
        self.module.requires_grad_(False)

    @torch.no_grad()
    def update(
        self, model: torch.nn.Module, step: int, skipped: torch.Tensor | None = None
    ) -> None:
        """Move every EMA parameter and float buffer towards ``model``'s, with the warmed decay.

        ``skipped`` (a 0-d bool tensor, the optimizer's NaN/Inf flag) leaves every EMA tensor
        exactly as it was where it is True, decided on the device: the lerp weight is 0 there.
        """
        decay = ema_decay_at(self.decay, step)
        ema_tensors, tensors = self._pairs(model)
        # ema * d + x * (1 - d) == lerp(ema, x, 1 - d), one foreach pass over all tensors.
        if skipped is None:
            torch._foreach_lerp_(ema_tensors, tensors, 1.0 - decay)
            return
        # lerp(ema, x, 0) is ema bit for bit (ema + 0 * (x - ema)) for the finite x a skipped
        # step leaves in the model. One weight tensor per dtype and device, as lerp needs (on
        # CUDA torch runs this form one kernel per tensor: launches, still no host read).
        weight = (~skipped).to(torch.float64) * (1.0 - decay)  # rounded once, per dtype below
        kinds = {(t.dtype, t.device) for t in ema_tensors}
        weights = {(dtype, device): weight.to(device, dtype) for dtype, device in kinds}
        torch._foreach_lerp_(
            ema_tensors, tensors, [weights[t.dtype, t.device] for t in ema_tensors]
        )

    def _pairs(self, model: torch.nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        ema_state = self.module.state_dict(keep_vars=True)
        state = model.state_dict(keep_vars=True)
        if ema_state.keys() != state.keys():
            missing = sorted(set(ema_state) ^ set(state))[:5]
            raise ValueError(f"ModelEma.update: model and EMA tensors differ: {missing}")
        ema_tensors, tensors = [], []
        for name, ema_tensor in ema_state.items():
            if ema_tensor.is_floating_point():
                ema_tensors.append(ema_tensor.detach())
                tensors.append(state[name].detach())
            else:
                ema_tensor.copy_(state[name])
        return ema_tensors, tensors
