"""SGD_AGC on a small NFNet: equal to a float64 re-implementation of DM optim.py's update,
invariant to gradient accumulation (fp32 and bf16 autocast), and what keeps training stable."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.models import create_model
from pipeline.optim import SGD_AGC, param_groups

CLIPPING, EPS, MOMENTUM = 0.01, 1e-3, 0.9


def small_nfnet(seed: int = 0, skip_gain: float | None = None) -> torch.nn.Module:
    """nfnet_nano without dropout or stochastic depth, so every forward is deterministic.

    ``skip_gain`` overrides the blocks' zero init so that every parameter gets a gradient.
    """
    torch.manual_seed(seed)
    model = create_model("nfnet_nano", num_classes=10, drop_rate=0.0, stochdepth_rate=0.0)
    if skip_gain is not None:
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("skip_gain"):
                    param.fill_(skip_gain)
    return model


def batch(size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(size, 3, 32, 32, generator=generator)
    return images, torch.randint(0, 10, (size,), generator=generator)


def reference_unitwise_norm(x: np.ndarray) -> np.ndarray:
    if np.squeeze(x).ndim <= 1:
        return np.sqrt(np.sum(x**2))
    return np.sqrt(np.sum(x**2, axis=tuple(range(1, x.ndim)), keepdims=True))


def reference_group(name: str) -> tuple[bool, bool]:
    """(decayed, clipped) by name, as DM experiment_nfnets.py _make_opt groups parameters."""
    if name == "head.fc.weight":
        return True, False
    leaf = name.rsplit(".", 1)[-1]
    if leaf in ("gain", "bias", "skip_gain"):
        return False, True
    return True, True


def reference_step(weights, grads, buffers, lr, weight_decay):
    """DM optim.py SGD_AGC in float64: clip raw grad, add decay, momentum, Nesterov step."""
    clipped_units = {}
    for name, w in weights.items():
        decayed, clipped = reference_group(name)
        g = grads[name]
        if clipped:
            max_norm = CLIPPING * np.maximum(reference_unitwise_norm(w), EPS)
            g_norm = reference_unitwise_norm(g)
            clipped_units[name] = int(np.sum(g_norm > max_norm))
            g = np.where(g_norm > max_norm, g * max_norm / np.maximum(g_norm, 1e-6), g)
        if decayed:
            g = g + weight_decay * w
        buffers[name] = MOMENTUM * buffers[name] + g
        weights[name] = w - lr * (g + MOMENTUM * buffers[name])
    return clipped_units


def test_two_steps_equal_float64_reference_for_all_three_groups():
    model = small_nfnet(skip_gain=0.5)
    lr, weight_decay = 1.0, 0.05  # large enough that decay and clip both move every tensor
    optimizer = SGD_AGC(param_groups(model, weight_decay, CLIPPING), lr=lr, eps=EPS)
    weights = {n: p.detach().double().numpy().copy() for n, p in model.named_parameters()}
    buffers = {n: np.zeros_like(w) for n, w in weights.items()}
    for step in range(2):
        images, labels = batch(16, seed=step)
        optimizer.zero_grad()
        (F.cross_entropy(model(images), labels) * 100).backward()
        grads = {n: p.grad.double().numpy().copy() for n, p in model.named_parameters()}
        before = {n: p.detach().double().numpy().copy() for n, p in model.named_parameters()}
        weights = dict(before)  # the reference steps from our fp32 weights
        clipped_units = reference_step(weights, grads, buffers, lr, weight_decay)
        optimizer.step()

        head_w, head_g = before["head.fc.weight"], grads["head.fc.weight"]
        head_max = CLIPPING * np.maximum(reference_unitwise_norm(head_w), EPS)
        # Clipping the head would change the result: the test sees the exclusion.
        assert np.sum(reference_unitwise_norm(head_g) > head_max) >= 5
        assert sum(clipped_units[n] for n in clipped_units if n.endswith("gain")) >= 5
        assert sum(clipped_units[n] for n in clipped_units if n.endswith("weight")) >= 50
        for name, param in model.named_parameters():
            ours = param.detach().double().numpy()
            delta_error = np.max(np.abs((ours - before[name]) - (weights[name] - before[name])))
            scale = np.max(np.abs(weights[name] - before[name]))
            assert delta_error <= 1e-4 * scale, (step, name)
            assert np.max(np.abs(ours - weights[name])) <= 1e-6 * np.max(np.abs(weights[name]))


def test_last_stats_report_raw_grad_norm_and_clip_fraction():
    model = small_nfnet()
    optimizer = SGD_AGC(param_groups(model, 0.0, CLIPPING), lr=0.0)
    images, labels = batch(8, seed=0)
    F.cross_entropy(model(images), labels).backward()
    raw = torch.stack([p.grad.double().norm() for p in model.parameters()]).norm()
    optimizer.step()
    assert optimizer.last_stats["grad_norm"].item() == pytest.approx(raw.item(), rel=1e-6)
    assert 0.0 < optimizer.last_stats["clip_fraction"].item() < 1.0


def accumulated_against_whole(autocast: bool, micro_batches: int = 4):
    """Grads and weights after one step on 16 images, whole vs. 4 accumulated micro-batches."""
    models = [small_nfnet(skip_gain=0.5), small_nfnet(skip_gain=0.5)]
    optimizers = [SGD_AGC(param_groups(m, 2e-5, CLIPPING), lr=0.5) for m in models]
    images, labels = batch(16, seed=3)
    seen_dtypes = set()
    for model, optimizer, chunks in zip(models, optimizers, (1, micro_batches), strict=True):
        parts = zip(images.chunk(chunks), labels.chunk(chunks), strict=True)
        for part_images, part_labels in parts:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                logits = model(part_images)
            # Mean over the micro-batch / number of micro-batches = mean over the whole batch.
            (F.cross_entropy(logits.float(), part_labels) * 100 / chunks).backward()
        seen_dtypes |= {p.grad.dtype for p in model.parameters()}
        optimizer.step()
    return models, optimizers, seen_dtypes


def assert_models_close(first, second, rtol: float) -> None:
    """Gradients and weight updates of ``first`` within ``rtol`` (relative L2) of ``second``'s."""
    initial = small_nfnet(skip_gain=0.5).parameters()
    pairs = zip(first.named_parameters(), second.parameters(), initial, strict=True)
    for (name, a), b, start in pairs:
        assert b.grad.norm() > 0, name
        grad_error = (a.grad - b.grad).norm() / b.grad.norm()
        update_error = (a - b).norm() / (b - start).norm()
        assert grad_error <= rtol and update_error <= rtol, (name, grad_error, update_error)


def test_accumulated_micro_batches_step_equals_whole_batch_step():
    models, optimizers, _ = accumulated_against_whole(autocast=False)
    whole, accumulated = (o.last_stats for o in optimizers)
    assert whole["clip_fraction"].item() > 0.3  # AGC is active in this step
    assert accumulated["clip_fraction"].item() == whole["clip_fraction"].item()
    assert_models_close(models[1], models[0], rtol=1e-5)


def test_bf16_autocast_clip_sees_fp32_grads_and_accumulation_matches():
    models, optimizers, seen_dtypes = accumulated_against_whole(autocast=True)
    assert seen_dtypes == {torch.float32}
    whole, accumulated = (o.last_stats for o in optimizers)
    assert whole["clip_fraction"].item() > 0.3
    # bf16 forwards of a 4-image and a 16-image batch round differently (8-bit mantissa), so the
    # accumulated gradient matches to bf16 precision, not fp32.
    assert abs(accumulated["clip_fraction"].item() - whole["clip_fraction"].item()) <= 0.02
    assert_models_close(models[1], models[0], rtol=2e-2)


def train_losses(clipping: float | None, steps: int, lr: float) -> list[float]:
    """Full-batch training of nfnet_nano on 10 noisy class prototypes, until it diverges."""
    model = small_nfnet()
    generator = torch.Generator().manual_seed(1)
    prototypes = torch.randn(10, 3, 32, 32, generator=generator)
    labels = torch.arange(32) % 10
    images = prototypes[labels] + 0.5 * torch.randn(32, 3, 32, 32, generator=generator)
    optimizer = SGD_AGC(param_groups(model, 2e-5, clipping), lr=lr)
    losses = []
    for _ in range(steps):
        loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if not math.isfinite(losses[-1]) or losses[-1] > 1000 * losses[0]:
            break  # diverged; NaN arithmetic is slow on CPU, so stop here
    return losses


def test_agc_keeps_training_stable_where_plain_sgd_diverges():
    lr = 0.2
    plain = train_losses(None, steps=24, lr=lr)  # stops where it diverges
    clipped = train_losses(CLIPPING, steps=12, lr=lr)
    initial = plain[0]
    assert initial == pytest.approx(math.log(10), rel=0.05)
    # Without AGC the loss explodes past 1000x its start or turns NaN.
    assert len(plain) < 24, plain
    assert not (math.isfinite(plain[-1]) and plain[-1] < 1000 * initial), plain
    # With AGC at the same lr: finite, never above the start, and down by 10x after 12 steps.
    assert len(clipped) == 12 and all(math.isfinite(v) for v in clipped), clipped
    assert max(clipped) <= initial * 1.01, clipped
    assert clipped[-1] < 0.1 * initial, clipped


def test_optimizer_rejects_bad_groups():
    model = small_nfnet()
    with pytest.raises(ValueError, match="clipping must be > 0"):
        SGD_AGC([{"params": list(model.parameters()), "clipping": -1.0}], lr=0.1)
    with pytest.raises(ValueError, match="momentum"):
        SGD_AGC(model.parameters(), lr=0.1, momentum=1.5)


def test_params_without_grad_are_left_alone():
    model = small_nfnet()
    frozen = copy.deepcopy(model.stem.conv0.weight.detach())
    optimizer = SGD_AGC(param_groups(model, 2e-5, CLIPPING), lr=0.5)
    images, labels = batch(4, seed=0)
    F.cross_entropy(model(images), labels).backward()
    model.stem.conv0.weight.grad = None
    optimizer.step()
    assert torch.equal(model.stem.conv0.weight.detach(), frozen)
    assert model.stem.conv0.weight not in optimizer.state


def test_state_dict_round_trip_resumes_the_same_trajectory():
    models = [small_nfnet(skip_gain=0.5), small_nfnet(skip_gain=0.5)]
    optimizers = [SGD_AGC(param_groups(m, 2e-5, CLIPPING), lr=0.5) for m in models]
    images, labels = batch(8, seed=5)
    for step in range(2):
        for model, optimizer in zip(models, optimizers, strict=True):
            optimizer.zero_grad()
            F.cross_entropy(model(images), labels).backward()
            optimizer.step()
        if step == 0:
            # Resume the second run from the first's weights and optimizer state.
            models[1].load_state_dict(models[0].state_dict())
            state = copy.deepcopy(optimizers[0].state_dict())
            optimizers[1] = SGD_AGC(param_groups(models[1], 2e-5, CLIPPING), lr=0.5)
            optimizers[1].load_state_dict(state)
    assert len(optimizers[1].state) == 57
    for a, b in zip(models[0].parameters(), models[1].parameters(), strict=True):
        assert torch.equal(a, b)


def one_step(model, optimizer, images, labels, poison: float | None = None) -> None:
    """One step on ``images``; ``poison`` (NaN, Inf) is written into one gradient element."""
    optimizer.zero_grad()
    F.cross_entropy(model(images), labels).backward()
    if poison is not None:
        model.head.fc.bias.grad[3] = poison
    optimizer.step()


@pytest.mark.parametrize("poison", [math.nan, math.inf, -math.inf])
def test_a_nonfinite_gradient_leaves_weights_and_momentum_untouched(poison):
    model = small_nfnet(skip_gain=0.5)
    optimizer = SGD_AGC(param_groups(model, 2e-5, CLIPPING), lr=0.5, skip_nonfinite=True)
    images, labels = batch(8, seed=5)
    one_step(model, optimizer, images, labels)  # a momentum buffer to keep
    weights = copy.deepcopy(model.state_dict())
    state = optimizer.state
    buffers = {name: state[p]["momentum_buffer"].clone() for name, p in model.named_parameters()}
    one_step(model, optimizer, images, labels, poison=poison)
    assert optimizer.last_step_skipped
    assert not math.isfinite(optimizer.last_stats["grad_norm"].item())
    for name, param in model.named_parameters():
        assert torch.equal(param.detach(), weights[name]), name
        assert torch.equal(optimizer.state[param]["momentum_buffer"], buffers[name]), name


def test_the_step_after_a_skipped_one_equals_a_run_that_never_saw_it():
    models = [small_nfnet(skip_gain=0.5), small_nfnet(skip_gain=0.5)]
    optimizers = [
        SGD_AGC(param_groups(m, 2e-5, CLIPPING), lr=0.5, skip_nonfinite=True) for m in models
    ]
    first, second = batch(8, seed=1), batch(8, seed=2)
    one_step(models[0], optimizers[0], *first)
    one_step(models[0], optimizers[0], *first, poison=math.nan)
    one_step(models[0], optimizers[0], *second)
    one_step(models[1], optimizers[1], *first)
    one_step(models[1], optimizers[1], *second)
    assert not optimizers[0].last_step_skipped
    for a, b in zip(models[0].parameters(), models[1].parameters(), strict=True):
        assert torch.equal(a, b)


def test_without_skip_nonfinite_a_nan_gradient_reaches_the_weights():
    model = small_nfnet(skip_gain=0.5)
    optimizer = SGD_AGC(param_groups(model, 2e-5, CLIPPING), lr=0.5)
    one_step(model, optimizer, *batch(8, seed=1), poison=math.nan)
    assert not optimizer.last_step_skipped
    assert torch.isnan(model.head.fc.bias).sum().item() == 1  # the poisoned unit only


def test_the_skip_flag_is_a_device_tensor_and_grads_keep_only_the_clip():
    model = small_nfnet(skip_gain=0.5)
    optimizer = SGD_AGC(param_groups(model, 0.05, CLIPPING), lr=0.5, skip_nonfinite=True)
    images, labels = batch(8, seed=5)
    one_step(model, optimizer, images, labels)
    flag = optimizer.last_step_skipped
    assert isinstance(flag, torch.Tensor) and flag.shape == () and flag.dtype == torch.bool
    assert flag.device == model.head.fc.bias.grad.device and not flag
    # The decay is added on a copy: .grad holds the clipped gradient, which AGC alone scaled.
    optimizer.zero_grad()
    F.cross_entropy(model(images), labels).backward()
    raw = {name: p.grad.clone() for name, p in model.named_parameters()}
    optimizer.step()
    for name, param in model.named_parameters():
        if name == "head.fc.weight":  # not clipped (DM experiment_nfnets.py): untouched
            assert torch.equal(param.grad, raw[name])
            continue
        # Clipped: each unit is its raw gradient times a scale in (0, 1]; the decay (a multiple
        # of the weight) would have turned it away from the raw direction.
        units = param.shape[0] if param.ndim > 1 else 1
        grad, before = param.grad.reshape(units, -1), raw[name].reshape(units, -1)
        norms = before.square().sum(1, keepdim=True).clamp_min(1e-30)  # some units get no grad
        scale = (grad * before).sum(1, keepdim=True) / norms
        torch.testing.assert_close(grad, before * scale, rtol=1e-5, atol=1e-9)
        assert bool(((scale >= 0) & (scale <= 1 + 1e-6)).all()), name


def test_a_gradient_in_another_memory_layout_takes_the_same_step():
    models = [small_nfnet(skip_gain=0.5), small_nfnet(skip_gain=0.5)]
    optimizers = [SGD_AGC(param_groups(m, 2e-5, CLIPPING), lr=0.5) for m in models]
    images, labels = batch(8, seed=3)
    for _ in range(2):
        for model, optimizer in zip(models, optimizers, strict=True):
            optimizer.zero_grad()
            F.cross_entropy(model(images), labels).backward()
        for param in models[1].parameters():
            if param.ndim == 4:  # the fused update walks memory order: the layouts must agree
                param.grad = param.grad.contiguous(memory_format=torch.channels_last)
        for optimizer in optimizers:
            optimizer.step()
    assert any(
        p.grad.is_contiguous(memory_format=torch.channels_last)
        for p in models[1].parameters()
        if p.ndim == 4
    )
    for a, b in zip(models[0].parameters(), models[1].parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_gpu_the_skip_is_decided_without_a_host_sync():
    model = small_nfnet(skip_gain=0.5).cuda()
    optimizer = SGD_AGC(param_groups(model, 2e-5, CLIPPING), lr=0.5, skip_nonfinite=True)
    images, labels = (tensor.cuda() for tensor in batch(8, seed=5))
    one_step(model, optimizer, images, labels)
    weights = copy.deepcopy(model.state_dict())
    state = optimizer.state
    buffers = {name: state[p]["momentum_buffer"].clone() for name, p in model.named_parameters()}
    optimizer.zero_grad()
    F.cross_entropy(model(images), labels).backward()
    model.head.fc.bias.grad[3] = math.nan
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # a host read or blocking copy in step() raises
    try:
        optimizer.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert optimizer.last_step_skipped.is_cuda and bool(optimizer.last_step_skipped)
    for name, param in model.named_parameters():
        assert torch.equal(param.detach(), weights[name]), name
        assert torch.equal(optimizer.state[param]["momentum_buffer"], buffers[name]), name
