"""Layers: scaled WS conv, SAME padding, activation gammas, squeeze-excite, stochastic depth."""

import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.models import create_model
from pipeline.models.layers import (
    ACTIVATION_GAMMAS,
    SqueezeExcite,
    WSConv2d,
    _OfficialStandardize,
    activation_fn,
    same_padding,
)


def _reference_ws(weight, gain, official):
    """Float64 scaled WS, written from DM base.py (official) and timm std_conv.py (timm)."""
    w = weight.double()
    fan_in = w[0].numel()
    mean = w.mean(dim=(1, 2, 3), keepdim=True)
    var = ((w - mean) ** 2).mean(dim=(1, 2, 3), keepdim=True)
    if official:
        denominator = torch.sqrt(torch.clamp(fan_in * var, min=1e-4))
    else:
        denominator = torch.sqrt(fan_in * (var + 1e-5))
    return gain.double().view(-1, 1, 1, 1) * (w - mean) / denominator


@pytest.mark.parametrize("numerics", ["official", "timm"])
def test_ws_weight_equals_the_float64_formula(numerics):
    torch.manual_seed(0)
    conv = WSConv2d(12, 8, 3, groups=2, numerics=numerics)
    with torch.no_grad():
        conv.gain.uniform_(0.5, 1.5)
        conv.weight[3] = 0.01 * torch.randn_like(conv.weight[3]) + 0.3
    expected = _reference_ws(conv.weight, conv.gain, numerics == "official")
    error = (conv.standardized_weight().double() - expected).abs().max().item()
    assert error < 1e-6 * expected.abs().max().item()
    # Scaled WS gives every output channel unit norm times its gain (official, unclamped).
    norms = torch.linalg.vector_norm(expected.flatten(1), dim=1)
    if numerics == "official":
        torch.testing.assert_close(norms, conv.gain.double().detach(), rtol=1e-9, atol=0)


def test_official_ws_clamps_tiny_variance_like_dm():
    # All-equal rows have var 0: DM uses max(fan_in * var, 1e-4), so the output is 0, not NaN.
    weight = torch.full((2, 3, 3, 3), 0.5, dtype=torch.float64, requires_grad=True)
    gain = torch.ones(2, dtype=torch.float64, requires_grad=True)
    out = _OfficialStandardize.apply(weight, gain)
    assert torch.count_nonzero(out).item() == 0
    out.sum().backward()
    assert torch.isfinite(weight.grad).all() and torch.isfinite(gain.grad).all()


def test_official_ws_backward_passes_gradcheck_in_float64():
    torch.manual_seed(0)
    weight = 0.1 * torch.randn(5, 4, 3, 3, dtype=torch.float64)
    weight[1] = 0.2 + 1e-4 * torch.randn(4, 3, 3, dtype=torch.float64)  # clamped row
    gain = torch.rand(5, dtype=torch.float64) + 0.5
    weight.requires_grad_()
    gain.requires_grad_()
    assert (weight[1].var(correction=0) * 36 < 1e-4).item()
    assert torch.autograd.gradcheck(_OfficialStandardize.apply, (weight, gain))


def test_ws_init_is_fan_in_normal():
    torch.manual_seed(0)
    conv = WSConv2d(256, 512, 3)
    # DM: VarianceScaling(1, fan_in, normal) -> std 1/sqrt(2304); 1.2M samples: ~0.1 % error.
    assert abs(conv.weight.std().item() * math.sqrt(256 * 9) - 1) < 5e-3
    assert conv.gain.shape == (512,) and conv.bias.shape == (512,)


@pytest.mark.parametrize("size", [15, 16])
def test_same_padding_is_tensorflow_same(size):
    # TF SAME, stride 2, kernel 3: output ceil(n / 2); even n pads (0, 1), odd n pads (1, 1).
    assert same_padding(size, 3, 2) == ((0, 1) if size % 2 == 0 else (1, 1))
    assert same_padding(size, 3, 1) == (1, 1)
    torch.manual_seed(0)
    conv = WSConv2d(3, 4, 3, stride=2, padding="same")
    x = torch.randn(2, 3, size, size + 1)
    top, bottom = same_padding(size, 3, 2)
    left, right = same_padding(size + 1, 3, 2)
    padded = F.pad(x, (left, right, top, bottom))
    expected = F.conv2d(padded, conv.standardized_weight(), conv.bias, stride=2)
    out = conv(x)
    assert out.shape[-2:] == (math.ceil(size / 2), math.ceil((size + 1) / 2))
    assert torch.equal(out, expected)


def test_symmetric_padding_differs_from_same_on_even_inputs():
    torch.manual_seed(0)
    same = WSConv2d(3, 4, 3, stride=2, padding="same")
    symmetric = WSConv2d(3, 4, 3, stride=2, padding="symmetric")
    symmetric.load_state_dict(same.state_dict())
    x = torch.randn(1, 3, 16, 16)
    assert torch.equal(symmetric(x), F.conv2d(x, same.standardized_weight(), same.bias, 2, 1))
    assert not torch.allclose(symmetric(x), same(x))
    odd = torch.randn(1, 3, 15, 15)
    assert torch.equal(symmetric(odd), same(odd))


@pytest.mark.parametrize("name", ["gelu", "relu", "silu", "tanh", "elu"])
def test_activation_gamma_normalises_unit_gaussian_input(name):
    # Float64 quadrature of std(act(z)), z ~ N(0, 1); DM's digits sit ~0.06 % above it.
    z = torch.linspace(-12, 12, 400_001, dtype=torch.float64)
    density = torch.exp(-0.5 * z**2) / math.sqrt(2 * math.pi)
    values = activation_fn(name, "official")(z)
    mean = torch.trapezoid(values * density, z)
    std = torch.sqrt(torch.trapezoid((values - mean) ** 2 * density, z)).item()
    assert abs(ACTIVATION_GAMMAS[name] * std - 1) < 2e-3
    assert ACTIVATION_GAMMAS[name] * std != 1.0


def test_gelu_is_tanh_for_official_and_erf_for_timm():
    x = torch.linspace(-4, 4, 101, dtype=torch.float64)
    official, timm = activation_fn("gelu", "official")(x), activation_fn("gelu", "timm")(x)
    tanh_form = 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
    torch.testing.assert_close(official, tanh_form, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(timm, 0.5 * x * (1 + torch.erf(x / math.sqrt(2))))
    assert 1e-5 < (official - timm).abs().max().item() < 1e-3


def test_squeeze_excite_sizes_and_init():
    with torch.device("meta"):
        block = create_model("nfnet_f0").blocks[5]
    se = block.se
    assert (se.fc1.in_features, se.fc1.out_features, se.fc2.out_features) == (1536, 768, 1536)
    # One scalar per block (stored as shape (1,) for DeepSpeed's parameter broadcast).
    assert block.skip_gain.numel() == 1
    torch.manual_seed(0)
    se = SqueezeExcite(1536, 0.5)
    # Haiku Linear default: normal truncated at 2 std, std 1/sqrt(fan_in); bias 0. The
    # truncated distribution's std is 0.8796 of the parent's.
    std = 1 / math.sqrt(1536)
    assert se.fc1.weight.abs().max().item() <= 2 * std
    assert abs(se.fc1.weight.std().item() / (0.8796 * std) - 1) < 0.01
    assert torch.count_nonzero(se.fc1.bias).item() == 0
    assert create_model("nfnet_nano").blocks[0].skip_gain.item() == 0.0


def _block_with_unit_skip_gain(rate):
    model = create_model("nfnet_nano", stochdepth_rate=rate)
    block = model.blocks[1]  # rate * 1 / 2
    with torch.no_grad():
        block.skip_gain.fill_(1.0)
    return block


def test_stochastic_depth_is_per_example_without_rescaling():
    torch.manual_seed(0)
    block = _block_with_unit_skip_gain(1.0)  # block 1 of 2 -> drop rate 0.5
    assert block.stochdepth_rate == 0.5
    x = torch.randn(256, 32, 8, 8)
    with torch.no_grad():
        full = block.eval()(x)
        shortcut = block.eval().conv_shortcut(
            F.avg_pool2d(block.act(x), 2, 2, ceil_mode=True, count_include_pad=False)
        )
        dropped = block.train()(x)
    kept = [torch.allclose(d, f, atol=1e-6) for d, f in zip(dropped, full, strict=True)]
    skipped = [torch.allclose(d, s, atol=1e-6) for d, s in zip(dropped, shortcut, strict=True)]
    # Each example is either the full block (no 1/keep rescale) or the bare shortcut.
    assert all(k != s for k, s in zip(kept, skipped, strict=True))
    assert 96 <= sum(kept) <= 160  # Binomial(256, 0.5): 8 standard deviations wide


def test_stochastic_depth_and_dropout_are_off_in_eval():
    torch.manual_seed(0)
    model = create_model("nfnet_nano", num_classes=10, drop_rate=0.5, stochdepth_rate=0.9).eval()
    with torch.no_grad():
        for block in model.blocks:
            block.skip_gain.fill_(1.0)
        x = torch.randn(4, 3, 32, 32)
        assert torch.equal(model(x), model(x))
        model.train()
        assert not torch.equal(model(x), model(x))
