"""unitwise_norm and adaptive_clip_ against a float64 reference written from the AGC formula."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from timm.utils import adaptive_clip_grad

from pipeline.models import create_model
from pipeline.optim import adaptive_clip_, unitwise_norm

CLIPPING, EPS = 0.01, 1e-3


def reference_unitwise_norm(x: np.ndarray) -> np.ndarray:
    """Brock et al. 2021 §4 / DM optim.py in PyTorch layout: one norm per output row (dim 0)."""
    if np.squeeze(x).ndim <= 1:
        return np.sqrt(np.sum(x**2))
    return np.sqrt(np.sum(x**2, axis=tuple(range(1, x.ndim)), keepdims=True))


def reference_clip(w: np.ndarray, g: np.ndarray, clipping: float, eps: float) -> np.ndarray:
    """G_i * max_norm / max(||G_i||, 1e-6) where ||G_i|| > clipping * max(||W_i||, eps)."""
    max_norm = clipping * np.maximum(reference_unitwise_norm(w), eps)
    g_norm = reference_unitwise_norm(g)
    return np.where(g_norm > max_norm, g * max_norm / np.maximum(g_norm, 1e-6), g)


def nfnet_f0_shapes() -> list[tuple[int, ...]]:
    """Every distinct parameter shape of nfnet_f0 (built on the meta device: no memory), plus a
    0-d scalar (a skip gain stored as shape ())."""
    with torch.device("meta"):
        model = create_model("nfnet_f0")
    return sorted({tuple(p.shape) for p in model.parameters()} | {()})


def planted_tensors(shape: tuple[int, ...], rng: np.random.Generator):
    """Weight and gradient whose units clip (odd rows), don't (even rows), or have zero weight.

    Returns (weight, grad, number of units that must clip).
    """
    w = rng.standard_normal(shape).astype(np.float32)
    g = rng.standard_normal(shape).astype(np.float32)
    if np.squeeze(w).ndim <= 1:
        # One unit: clip it when the tensor has an odd number of elements, else leave it.
        factor = 3.0 if w.size % 2 else 0.5
        target = factor * CLIPPING * max(np.sqrt(np.sum(w.astype(np.float64) ** 2)), EPS)
        g *= np.float32(target / max(np.sqrt(np.sum(g.astype(np.float64) ** 2)), 1e-30))
        return w, g, int(factor > 1)
    rows = shape[0]
    w[rows // 4 : rows // 2] = 0.0  # zero-weight units: max_norm is clipping * eps
    w_norm = np.maximum(reference_unitwise_norm(w.astype(np.float64)), EPS)
    factor = np.where(np.arange(rows) % 2 == 1, 4.0, 0.25).reshape((rows,) + (1,) * (w.ndim - 1))
    g_norm = reference_unitwise_norm(g.astype(np.float64))
    g = (g * (factor * CLIPPING * w_norm / g_norm)).astype(np.float32)
    return w, g, rows // 2


def relative_error(actual: torch.Tensor, expected: np.ndarray) -> float:
    """Largest elementwise |actual - expected| / |expected| (expected has no zeros here)."""
    diff = np.abs(actual.double().numpy() - expected)
    return float(np.max(diff / np.maximum(np.abs(expected), 1e-300)))


@pytest.fixture(scope="module")
def f0_shapes() -> list[tuple[int, ...]]:
    return nfnet_f0_shapes()


def test_f0_has_every_parameter_rank(f0_shapes):
    # Scalars (skip gains), vectors (gains, biases), Linear (SE, head) and conv weights.
    assert {len(shape) for shape in f0_shapes} == {0, 1, 2, 4}
    assert len(f0_shapes) >= 36


def test_unitwise_norm_matches_float64_reference_on_every_f0_shape(f0_shapes):
    rng = np.random.default_rng(0)
    for shape in f0_shapes + [(2, 3, 4, 5, 6), (7, 1, 1, 1), (1, 9)]:
        x = rng.standard_normal(shape).astype(np.float32)
        expected = reference_unitwise_norm(x.astype(np.float64))
        actual = unitwise_norm(torch.from_numpy(x))
        assert actual.dtype == torch.float32
        assert tuple(actual.shape) == np.shape(expected), shape
        assert relative_error(actual, np.asarray(expected)) <= 1e-6, shape


def test_unitwise_norm_treats_timm_style_gains_as_one_vector():
    gain = torch.arange(1.0, 5.0).reshape(4, 1, 1, 1)
    # DM optim.py: squeeze(x) is a vector, so one norm: sqrt(1 + 4 + 9 + 16) = sqrt(30).
    assert unitwise_norm(gain).item() == pytest.approx(30**0.5, rel=1e-7)


def test_adaptive_clip_matches_float64_reference_on_every_f0_shape(f0_shapes):
    rng = np.random.default_rng(1)
    params, expected, must_clip, units = [], [], 0, 0
    for shape in f0_shapes:
        w, g, clipped = planted_tensors(shape, rng)
        param = torch.nn.Parameter(torch.from_numpy(w))
        param.grad = torch.from_numpy(g.copy())
        params.append(param)
        expected.append(reference_clip(w.astype(np.float64), g.astype(np.float64), CLIPPING, EPS))
        must_clip += clipped
        units += 1 if np.squeeze(w).ndim <= 1 else shape[0]
    raw_norm = np.sqrt(sum(np.sum(p.grad.double().numpy() ** 2) for p in params))

    stats = adaptive_clip_(params, CLIPPING, EPS)

    for param, reference in zip(params, expected, strict=True):
        assert relative_error(param.grad, reference) <= 1e-6, tuple(param.shape)
    assert must_clip > 1000  # the planted rows really exercise both branches
    assert stats["clip_fraction"].item() == pytest.approx(must_clip / units, rel=1e-6)
    assert stats["grad_norm"].item() == pytest.approx(raw_norm, rel=1e-6)


def test_zero_weight_units_are_clipped_to_clipping_times_eps():
    weight = torch.zeros(3, 5, requires_grad=True)
    weight.grad = torch.full((3, 5), 2.0)
    adaptive_clip_([weight], clipping=0.01, eps=1e-3)
    row_norms = weight.grad.norm(dim=1)
    torch.testing.assert_close(row_norms, torch.full((3,), 1e-5), rtol=1e-6, atol=0)


def test_parameters_without_gradient_are_skipped():
    with_grad = torch.nn.Parameter(torch.ones(4, 4))
    with_grad.grad = torch.full((4, 4), 10.0)
    without_grad = torch.nn.Parameter(torch.ones(4, 4))
    stats = adaptive_clip_([without_grad, with_grad], clipping=0.01)
    assert without_grad.grad is None
    # Each row of ones has norm 2; its gradient row (norm 20) is scaled to 0.01 * 2 = 0.02.
    torch.testing.assert_close(with_grad.grad, torch.full((4, 4), 0.01), rtol=1e-6, atol=0)
    assert stats["clip_fraction"].item() == 1.0


def test_equals_timm_on_an_nfnet_whose_gains_are_vectors():
    # timm differs from DM only on (O, 1, 1, 1) gains; ours are (O,) vectors, so every parameter
    # but the head must match timm's per-parameter loop exactly.
    torch.manual_seed(0)
    model = create_model("nfnet_nano", num_classes=10)
    model.eval()
    model(torch.randn(8, 3, 32, 32)).square().mean().mul(1e3).backward()
    params = [p for name, p in model.named_parameters() if not name.startswith("head.fc")]
    theirs = [p.detach().clone().requires_grad_() for p in params]
    for mine, other in zip(params, theirs, strict=True):
        other.grad = mine.grad.clone()
    stats = adaptive_clip_(params, CLIPPING)
    adaptive_clip_grad(theirs, clip_factor=CLIPPING)
    assert stats["clip_fraction"].item() > 0.2
    for mine, other in zip(params, theirs, strict=True):
        torch.testing.assert_close(mine.grad, other.grad, rtol=1e-6, atol=0)


def test_rejects_non_positive_clipping():
    param = torch.nn.Parameter(torch.ones(2))
    param.grad = torch.ones(2)
    with pytest.raises(ValueError, match="clipping must be > 0"):
        adaptive_clip_([param], clipping=0.0)


def test_low_precision_and_mixed_dtype_tensors_are_normed_in_fp32():
    # A bf16 vector next to an fp32 one takes the per-tensor path; the norm is accumulated in
    # fp32, so only the final bf16 rounding of the clipped gradient (2^-8 relative) remains.
    rng = np.random.default_rng(2)
    shapes_dtypes = [((64,), torch.bfloat16), ((32,), torch.float32), ((16, 8), torch.bfloat16)]
    params, expected = [], []
    for shape, dtype in shapes_dtypes:
        w = torch.from_numpy(rng.standard_normal(shape).astype(np.float32)).to(dtype)
        g = torch.from_numpy(rng.standard_normal(shape).astype(np.float32)).to(dtype)
        param = torch.nn.Parameter(w)
        param.grad = g.clone()
        params.append(param)
        expected.append(reference_clip(w.double().numpy(), g.double().numpy(), CLIPPING, EPS))
    stats = adaptive_clip_(params, CLIPPING, EPS)
    assert stats["clip_fraction"].item() == 1.0  # N(0, 1) grads are far above 0.01 * ||W_i||
    for param, reference in zip(params, expected, strict=True):
        assert param.grad.dtype == param.dtype
        limit = 1e-6 if param.dtype == torch.float32 else 2**-8
        assert relative_error(param.grad, reference) <= limit, param.dtype


def test_channels_last_gradients_are_clipped_like_contiguous_ones():
    rng = np.random.default_rng(3)
    w = rng.standard_normal((8, 4, 3, 3)).astype(np.float32)
    g = rng.standard_normal((8, 4, 3, 3)).astype(np.float32) * 0.01
    expected = reference_clip(w.astype(np.float64), g.astype(np.float64), CLIPPING, EPS)
    param = torch.nn.Parameter(torch.from_numpy(w).contiguous(memory_format=torch.channels_last))
    param.grad = torch.from_numpy(g).contiguous(memory_format=torch.channels_last)
    stats = adaptive_clip_([param], CLIPPING, EPS)
    assert param.grad.is_contiguous(memory_format=torch.channels_last)
    assert 0 < stats["clip_fraction"].item() < 1
    assert relative_error(param.grad, expected) <= 1e-6
