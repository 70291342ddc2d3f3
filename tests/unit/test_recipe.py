"""The training recipe: lr scaling, warm-up + cosine, λ by batch, EMA, MixUp/CutMix, smoothing."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.optim import (
    ModelEma,
    base_learning_rate,
    default_clipping,
    ema_decay_at,
    lr_at,
    mixup_cutmix,
    soft_target_cross_entropy,
)

# DM experiment_nfnets.py: 1,281,167 images, 360 epochs at batch 4096, 5 warm-up epochs.
PAPER_STEPS = 1281167 * 360 // 4096
PAPER_WARMUP = 5 * 1281167 / 4096


def dm_warmup_cosine(itr: float, num_steps: float, warmup_steps: float, max_val: float) -> float:
    """DM optim.py WarmupCosineDecay with start_val = min_val = 0, from its formula."""
    if itr <= warmup_steps:
        return max_val * itr / warmup_steps
    return (
        0.5 * max_val * (1 + math.cos(math.pi * (itr - warmup_steps) / (num_steps - warmup_steps)))
    )


def test_paper_learning_rate_and_steps():
    assert base_learning_rate(4096) == pytest.approx(1.6, rel=1e-12)
    assert base_learning_rate(256) == pytest.approx(0.1, rel=1e-12)
    assert base_learning_rate(512, lr_per_256=0.2) == pytest.approx(0.4, rel=1e-12)
    assert PAPER_STEPS == 112602


def test_lr_at_equals_dm_schedule():
    steps = [0, 1, 781, 1563, 1564, 1565, 50000, PAPER_STEPS - 1, PAPER_STEPS]
    for step in steps:
        expected = dm_warmup_cosine(step, PAPER_STEPS, PAPER_WARMUP, 1.6)
        assert lr_at(step, PAPER_STEPS, PAPER_WARMUP, 1.6) == pytest.approx(expected, abs=1e-15)
    assert lr_at(0, 100, 10, 1.0) == 0.0
    assert lr_at(5, 100, 10, 1.0) == pytest.approx(0.5)
    assert lr_at(10, 100, 10, 1.0) == pytest.approx(1.0)
    assert lr_at(55, 100, 10, 1.0) == pytest.approx(0.5)
    assert lr_at(100, 100, 10, 1.0) == pytest.approx(0.0, abs=1e-15)
    assert lr_at(3, 10, 0, 2.0) == pytest.approx(1.0 + math.cos(math.pi * 0.3))


def test_lr_at_with_warmup_longer_than_the_run_and_bad_arguments():
    assert lr_at(5, total_steps=10, warmup_steps=20, peak_lr=1.0) == pytest.approx(0.25)
    assert lr_at(12, total_steps=10, warmup_steps=10, peak_lr=1.0) == 0.0
    with pytest.raises(ValueError, match="total_steps > 0"):
        lr_at(0, total_steps=0, warmup_steps=0, peak_lr=1.0)
    with pytest.raises(ValueError, match="warmup_steps >= 0"):
        lr_at(0, total_steps=10, warmup_steps=-1, peak_lr=1.0)


def test_default_clipping_by_batch():
    expected = {8: 0.16, 64: 0.16, 128: 0.08, 256: 0.04, 512: 0.02, 1024: 0.01, 4096: 0.01}
    for batch, clipping in expected.items():
        assert default_clipping(batch) == pytest.approx(clipping, rel=1e-12), batch
    values = [default_clipping(b) for b in range(1, 9000)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))  # monotone
    with pytest.raises(ValueError, match="global_batch"):
        default_clipping(0)


def test_ema_follows_tf1_warmup_in_float64():
    assert ema_decay_at(0.99999, 0) == pytest.approx(0.1)
    assert ema_decay_at(0.99999, 90) == pytest.approx(0.91)
    assert ema_decay_at(0.99999, 10**7) == 0.99999
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    ema = ModelEma(model, decay=0.9)
    reference = {k: v.double().clone() for k, v in model.state_dict().items()}
    for step in range(40):
        with torch.no_grad():
            for param in model.parameters():
                param.add_(torch.randn_like(param))
        ema.update(model, step)
        decay = min(0.9, (1 + step) / (10 + step))
        for key, value in model.state_dict().items():
            reference[key] = decay * reference[key] + (1 - decay) * value.double()
    for key, value in ema.module.state_dict().items():
        torch.testing.assert_close(value.double(), reference[key], rtol=1e-6, atol=1e-6)
    assert not any(p.requires_grad for p in ema.module.parameters())


def mixed(seed: int, batch: int = 16, **kwargs):
    generator = torch.Generator().manual_seed(100)
    images = torch.rand(batch, 3, 8, 8, generator=generator) + 1.0  # no pixel is 0
    labels = torch.arange(batch) % 10
    out, targets = mixup_cutmix(
        images, labels, 10, generator=torch.Generator().manual_seed(seed), **kwargs
    )
    return images, labels, out, targets


def test_mixup_cutmix_is_deterministic_given_the_generator():
    _, _, first, first_targets = mixed(seed=7)
    _, _, again, again_targets = mixed(seed=7)
    _, _, other, _ = mixed(seed=8)
    assert torch.equal(first, again) and torch.equal(first_targets, again_targets)
    assert not torch.equal(first, other)


def test_mixup_half_and_cutmix_half_with_smoothed_soft_targets():
    images, labels, out, targets = mixed(seed=3, label_smoothing=0.1)
    assert out.shape == images.shape and targets.shape == (16, 10)
    torch.testing.assert_close(targets.sum(1), torch.ones(16), rtol=0, atol=1e-6)
    assert targets.min().item() == pytest.approx(0.01, abs=1e-7)  # ls / num_classes
    unsmoothed = (targets.double() - 0.01) / 0.9
    partner = torch.tensor([1, 2, 3, 4, 5, 6, 7, 0, 9, 10, 11, 12, 13, 14, 15, 8])
    own = unsmoothed[torch.arange(16), labels]
    assert torch.allclose(
        own + unsmoothed[torch.arange(16), labels[partner]], torch.ones(16).double()
    )
    # MixUp half: every pixel is own * r + partner * (1 - r), with r the label weight.
    ratio = own[:8, None, None, None].float()
    expected = ratio * images[:8] + (1 - ratio) * images[partner[:8]]
    torch.testing.assert_close(out[:8], expected, rtol=1e-5, atol=1e-5)
    # CutMix half: every pixel is its own or its partner's, and the own share is the label weight.
    from_own = out[8:] == images[8:]
    from_partner = out[8:] == images[partner[8:]]
    assert bool((from_own | from_partner).all())
    own_share = from_own[:, 0].flatten(1).double().mean(1)
    torch.testing.assert_close(own_share, own[8:], rtol=0, atol=1e-6)


def test_mixup_ratios_follow_beta_point_two():
    count = 20000
    images = (torch.arange(count) % 2).float().reshape(count, 1, 1, 1)
    labels = torch.zeros(count, dtype=torch.long)
    generator = torch.Generator().manual_seed(0)
    out, _ = mixup_cutmix(images, labels, 2, generator=generator, cutmix=False)
    # Each example's partner is the next one, whose pixel is 1 - its own: out = r or 1 - r.
    own_pixel, pixel = images[:, 0, 0, 0], out[:, 0, 0, 0].double()
    ratio = torch.where(own_pixel == 1, pixel, 1 - pixel)
    # Beta(0.2, 0.2): mean 0.5, variance 0.2^2 / (0.4^2 * 1.4) = 0.17857, and 58.2 % of the
    # mass below 0.05 or above 0.95 (scipy.stats.beta.cdf(0.05, 0.2, 0.2) = 0.2910).
    assert ratio.mean().item() == pytest.approx(0.5, abs=0.01)
    assert ratio.var().item() == pytest.approx(0.17857, abs=0.006)
    tails = ((ratio < 0.05) | (ratio > 0.95)).double().mean().item()
    assert tails == pytest.approx(0.58205, abs=0.015)


def test_soft_target_cross_entropy_equals_float64_reference_and_torch_smoothing():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 5, generator=generator) * 3
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    soft = F.one_hot(labels, 5).float() * 0.9 + 0.1 / 5
    expected = -(soft.double() * torch.log_softmax(logits.double(), 1)).sum(1).mean()
    loss = soft_target_cross_entropy(logits, soft)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    torch_loss = F.cross_entropy(logits, labels, label_smoothing=0.1)
    assert loss.item() == pytest.approx(torch_loss.item(), rel=1e-6)


def test_mixup_cutmix_rejects_integer_images():
    with pytest.raises(ValueError, match="floating point"):
        mixup_cutmix(
            torch.zeros(2, 3, 4, 4, dtype=torch.uint8),
            torch.zeros(2, dtype=torch.long),
            10,
            generator=torch.Generator(),
        )


def test_mixing_off_returns_the_batch_and_one_hot_targets():
    images, labels, out, targets = mixed(seed=1, batch=5, mixup_alpha=0.0, cutmix=False)
    assert torch.equal(out, images)
    smoothed = F.one_hot(labels, 10).float() * 0.9 + 0.01
    torch.testing.assert_close(targets, smoothed, rtol=0, atol=1e-7)


def test_odd_batch_mixes_three_with_mixup_and_two_with_cutmix():
    images, labels, out, targets = mixed(seed=2, batch=5, label_smoothing=0.0)
    # CutMix rows (3, 4) hold only their own and their partner's pixels.
    pixels = (out[3:] == images[3:]) | (out[3:] == images[[4, 3]])
    assert bool(pixels.all())
    torch.testing.assert_close(targets.sum(1), torch.ones(5), rtol=0, atol=1e-6)
