"""Every registered variant runs forward and backward; every parameter gets a gradient."""

import pytest
import torch

from pipeline.models import create_model, list_models

# Real float32 runs (the small nets at their training size, F0 at 32 px) check values: no NaN and
# a non-zero gradient for every parameter. F1-F7 repeat F0's blocks with more depth; a real
# backward of each (0.13-0.5 G parameters) would overrun the test budget on a 2-core CPU, so they
# run forward and backward on the meta device: shapes and gradient coverage, no values. (F1's
# real forward is checked against timm in test_models_convert.)
REAL = {"nfnet_nano": 32, "nfnet_micro": 64, "nfnet_f0": 32}
META = [name for name in list_models() if name not in REAL]


def _unit_skip_gains(model):
    # skip_gain starts at 0, which zeroes every residual-branch gradient; 1 exercises them all.
    with torch.no_grad():
        for block in model.blocks:
            block.skip_gain.fill_(1.0)


@pytest.mark.parametrize("name", sorted(REAL))
def test_forward_backward_real(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=10).train()
    _unit_skip_gains(model)
    x = torch.randn(2, 3, REAL[name], REAL[name])
    logits = model(x)
    assert logits.shape == (2, 10)
    assert torch.isfinite(logits).all()
    logits.logsumexp(dim=1).sum().backward()
    for param_name, param in model.named_parameters():
        assert param.grad is not None, param_name
        assert torch.isfinite(param.grad).all(), param_name
        assert param.grad.abs().sum().item() > 0, param_name


def test_forward_features_shape_and_default_init_gradients():
    torch.manual_seed(0)
    model = create_model("nfnet_nano", num_classes=10)
    features = model.forward_features(torch.randn(2, 3, 32, 32))
    assert features.shape == (2, 128, 4, 4)  # stride 4 x 1 x 2, final conv 2 x 64
    model.head(features).sum().backward()
    # At init (skip_gain = 0) the skip gains themselves still learn.
    assert all(block.skip_gain.grad.abs().item() > 0 for block in model.blocks)


@pytest.mark.parametrize("name", META)
def test_forward_backward_meta(name):
    with torch.device("meta"):
        model = create_model(name, num_classes=1000).train()
        logits = model(torch.randn(1, 3, 64, 64))
    assert logits.shape == (1, 1000)
    logits.sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert missing == []
    assert all(p.grad.shape == p.shape for p in model.parameters())


def test_channels_last_is_a_layout_choice_only():
    torch.manual_seed(0)
    nhwc = create_model("nfnet_micro", num_classes=10).eval()
    nchw = create_model("nfnet_micro", num_classes=10, channels_last=False).eval()
    nchw.load_state_dict(nhwc.state_dict())
    _unit_skip_gains(nhwc)
    _unit_skip_gains(nchw)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        features = nhwc.forward_features(x)
        assert features.is_contiguous(memory_format=torch.channels_last)
        assert nchw.forward_features(x).is_contiguous()
        expected = nchw(x)
        assert (nhwc(x) - expected).abs().max().item() < 1e-5 * expected.abs().max().item()
