"""MixUp on half of each batch, CutMix on the other, label smoothing (DM dataset.py, experiment.py).

DM draws twice the batch and mixes disjoint pairs (dataset.py my_mixup_cutmix); here each example
is mixed with the next example of its own half (a cyclic shift), so a loader's batch keeps its
size. Everything random comes from the caller's ``torch.Generator``: the same generator state
gives the same mix on any device.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# DM dataset.py: mixup_alpha defaults to 0.2, i.e. ratios ~ Beta(0.2, 0.2).
DEFAULT_MIXUP_ALPHA = 0.2
# DM dataset.py cutmix_padding: the kept area is uniform ("they used Beta(1,1)").
DEFAULT_CUTMIX_ALPHA = 1.0
# DM experiment_nfnets.py: label_smoothing=0.1.
DEFAULT_LABEL_SMOOTHING = 0.1


def _beta(count: int, alpha: float, generator: torch.Generator) -> torch.Tensor:
    """``count`` samples of Beta(alpha, alpha) from two gammas, in fp64 so they never underflow."""
    if alpha == 0:
        return torch.ones(count, dtype=torch.float64)
    concentration = torch.full((2, count), float(alpha), dtype=torch.float64)
    gammas = torch._standard_gamma(concentration, generator=generator)
    total = gammas.sum(0)
    return torch.where(total > 0, gammas[0] / total, torch.full_like(total, 0.5))


def _cutmix_masks(
    count: int, height: int, width: int, alpha: float, generator: torch.Generator
) -> torch.Tensor:
    """(count, 1, H, W) masks, 1 inside a box kept from the example itself (DM cutmix_padding)."""
    # DM: the box side is sqrt(1 - u) of the image side with u the other image's share of the
    # area, centred on a uniform pixel, truncated to ints and clipped to the image.
    other_share = (
        _beta(count, alpha, generator)
        if alpha != 1
        else torch.rand(count, dtype=torch.float64, generator=generator)
    )
    side = torch.sqrt(1.0 - other_share)
    half_w = (side * width).long() // 2
    half_h = (side * height).long() // 2
    centre_x = torch.randint(0, width, (count,), generator=generator)
    centre_y = torch.randint(0, height, (count,), generator=generator)
    x1, x2 = (centre_x - half_w).clamp(0, width), (centre_x + half_w).clamp(0, width)
    y1, y2 = (centre_y - half_h).clamp(0, height), (centre_y + half_h).clamp(0, height)
    xs, ys = torch.arange(width), torch.arange(height)
    inside_x = (xs >= x1[:, None]) & (xs < x2[:, None])
    inside_y = (ys >= y1[:, None]) & (ys < y2[:, None])
    return (inside_y[:, :, None] & inside_x[:, None, :])[:, None]


def _shifted(start: int, count: int) -> torch.Tensor:
    return start + (torch.arange(count) + 1) % max(count, 1)


def smooth_labels(targets: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """DM experiment.py: ``y * (1 - ls) + ls / num_classes`` on (B, num_classes) targets."""
    return targets * (1.0 - label_smoothing) + label_smoothing / targets.shape[-1]


def mixup_cutmix(
    images: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    *,
    generator: torch.Generator,
    mixup_alpha: float = DEFAULT_MIXUP_ALPHA,
    cutmix: bool = True,
    cutmix_alpha: float = DEFAULT_CUTMIX_ALPHA,
    label_smoothing: float = DEFAULT_LABEL_SMOOTHING,
) -> tuple[torch.Tensor, torch.Tensor]:
    """MixUp (Beta(a, a) per example) on the first half of the batch, CutMix on the second half.

    Returns the mixed images and float32 soft targets ``(B, num_classes)``, label-smoothed after
    mixing as DM does. ``cutmix=False`` mixes the whole batch with MixUp; ``mixup_alpha=0``
    leaves the MixUp half unmixed.
    """
    if not images.is_floating_point():
        raise ValueError(f"mixup_cutmix: images must be floating point, got {images.dtype}")
    if images.ndim != 4 or labels.shape != images.shape[:1]:
        raise ValueError(
            f"mixup_cutmix: need images (B, C, H, W) and labels (B,), got {tuple(images.shape)} "
            f"and {tuple(labels.shape)}"
        )
    batch, _, height, width = images.shape
    num_cutmix = batch // 2 if cutmix else 0
    num_mixup = batch - num_cutmix
    partner = torch.cat([_shifted(0, num_mixup), _shifted(num_mixup, num_cutmix)])
    mixup_ratio = _beta(num_mixup, mixup_alpha, generator)
    masks = _cutmix_masks(num_cutmix, height, width, cutmix_alpha, generator)
    # The share of each example's own label: its MixUp ratio, or the area its CutMix box keeps.
    ratio = torch.cat([mixup_ratio, masks.flatten(1).double().mean(1)])

    device = images.device
    partner, ratio, masks = partner.to(device), ratio.to(device), masks.to(device)
    others = images[partner]
    mixup_weight = ratio[:num_mixup, None, None, None].to(images.dtype)
    mixed_mixup = torch.lerp(others[:num_mixup], images[:num_mixup], mixup_weight)
    mixed_cutmix = torch.where(masks, images[num_mixup:], others[num_mixup:])
    mixed = torch.cat([mixed_mixup, mixed_cutmix])

    own = F.one_hot(labels, num_classes).double()
    targets = ratio[:, None] * own + (1.0 - ratio[:, None]) * own[partner]
    return mixed, smooth_labels(targets, label_smoothing).float()


def soft_target_cross_entropy(logits: torch.Tensor, soft_targets: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of ``-sum(targets * log_softmax(logits))``, computed in float32."""
    log_probs = F.log_softmax(logits.float(), dim=-1)
    return -(soft_targets.float() * log_probs).sum(-1).mean()
