"""The training recipe: lr scaling, warm-up + cosine, λ by batch, EMA, mixed targets, smoothing."""

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
    mixed_targets,
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


def test_mixed_targets_are_dms_label_mixing_then_smoothing():
    # DM experiment.py _loss_fn: y = r * one_hot(labels) + (1 - r) * one_hot(mix_labels), then
    # y * (1 - ls) + ls / num_classes.
    labels, mix_labels = torch.tensor([0, 3, 2, 1]), torch.tensor([1, 3, 0, 1])
    ratio = torch.tensor([0.25, 0.6, 1.0, 0.0])
    targets = mixed_targets(labels, mix_labels, ratio, 4, label_smoothing=0.1)
    expected = torch.zeros(4, 4, dtype=torch.float64)
    for row, (own, other, r) in enumerate(zip(labels, mix_labels, ratio.double(), strict=True)):
        expected[row, own] += r
        expected[row, other] += 1 - r
    expected = expected * 0.9 + 0.1 / 4
    assert targets.dtype == torch.float32
    torch.testing.assert_close(targets.double(), expected, rtol=0, atol=1e-7)
    torch.testing.assert_close(targets.sum(1), torch.ones(4), rtol=0, atol=1e-6)


def test_unmixed_targets_are_the_smoothed_one_hot_labels():
    labels = torch.tensor([4, 0, 9])
    targets = mixed_targets(labels, labels, torch.ones(3), 10)  # DM's default smoothing 0.1
    smoothed = F.one_hot(labels, 10).float() * 0.9 + 0.01
    torch.testing.assert_close(targets, smoothed, rtol=0, atol=1e-7)


def test_mixed_targets_refuse_mismatched_shapes():
    two, three = torch.zeros(2, dtype=torch.long), torch.zeros(3, dtype=torch.long)
    with pytest.raises(ValueError, match="one shape"):
        mixed_targets(two, three, torch.ones(2), 5)


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
