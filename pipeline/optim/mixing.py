"""The loss side of MixUp/CutMix: mixed soft targets, label smoothing, soft-target cross-entropy.

The images are mixed in the loader (``pipeline.data.mixing``, as DM's dataset.py mixes them);
the labels are mixed here, in the loss, as DM's experiment.py ``_loss_fn`` does, from each
output's own label, its partner's label and the own label's share.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# DM experiment_nfnets.py: label_smoothing=0.1.
DEFAULT_LABEL_SMOOTHING = 0.1


def smooth_labels(targets: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """DM experiment.py: ``y * (1 - ls) + ls / num_classes`` on (B, num_classes) targets."""
    return targets * (1.0 - label_smoothing) + label_smoothing / targets.shape[-1]


def mixed_targets(
    labels: torch.Tensor,
    mix_labels: torch.Tensor,
    ratio: torch.Tensor,
    num_classes: int,
    label_smoothing: float = DEFAULT_LABEL_SMOOTHING,
) -> torch.Tensor:
    """float32 soft targets (B, num_classes): DM experiment.py ``_loss_fn``, ``ratio * one_hot(
    labels) + (1 - ratio) * one_hot(mix_labels)``, then label-smoothed. An unmixed output has
    ratio 1 (and ``mix_labels == labels``): its smoothed one-hot label."""
    if labels.shape != mix_labels.shape or labels.shape != ratio.shape or labels.ndim != 1:
        raise ValueError(
            f"mixed_targets: need labels, mix_labels and ratio of one shape (B,), got "
            f"{tuple(labels.shape)}, {tuple(mix_labels.shape)} and {tuple(ratio.shape)}"
        )
    share = ratio.to(torch.float32)[:, None]
    own = F.one_hot(labels, num_classes).to(torch.float32)
    other = F.one_hot(mix_labels, num_classes).to(torch.float32)
    return smooth_labels(share * own + (1.0 - share) * other, label_smoothing)


def soft_target_cross_entropy(logits: torch.Tensor, soft_targets: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of ``-sum(targets * log_softmax(logits))``, computed in float32."""
    log_probs = F.log_softmax(logits.float(), dim=-1)
    return -(soft_targets.float() * log_probs).sum(-1).mean()
