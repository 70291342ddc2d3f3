"""Registry, variant table, exact parameter counts and FLOPs of the NFNet family."""

import dataclasses

import pytest
import torch

from pipeline.models import count_flops, count_params, create_model, get_variant, list_models

# Exact counts for 1000 classes (derived from DM nfnet.py; they round to the DM README's
# 71.5M ... 438.4M and include one skip_gain scalar per block).
PARAMS = {
    "nfnet_f0": 71_489_284,
    "nfnet_f1": 132_634_256,
    "nfnet_f2": 193_779_228,
    "nfnet_f3": 254_924_200,
    "nfnet_f4": 316_069_172,
    "nfnet_f5": 377_214_144,
    "nfnet_f6": 438_359_116,
    "nfnet_f7": 499_504_088,
}
# DM nfnets README: #FLOPs at the test resolution (F7 is not in the README).
README_GFLOPS = {
    "nfnet_f0": (256, 12.38),
    "nfnet_f1": (320, 35.54),
    "nfnet_f2": (352, 62.59),
    "nfnet_f3": (416, 114.76),
    "nfnet_f4": (512, 215.24),
    "nfnet_f5": (544, 289.76),
    "nfnet_f6": (576, 377.28),
}


def test_list_models_has_the_paper_variants_the_small_ones_and_the_bn_baseline():
    assert list_models() == [f"nfnet_f{i}" for i in range(8)] + [
        "nfnet_micro",
        "nfnet_nano",
        "resnet_bn_nano",
    ]


def test_bn_resnet_baseline_is_sized_like_nfnet_nano():
    # The NF vs. BN experiment (configs/experiments/nf_vs_bn.yaml) compares these two at 10
    # classes: 40,250 against 40,244 parameters (0.015 % apart), and similar FLOPs at 32 px.
    assert count_params("resnet_bn_nano", num_classes=10) == 40_250
    assert count_params("nfnet_nano", num_classes=10) == 40_244
    assert count_flops("resnet_bn_nano", 32) == 1_671_392
    assert count_flops("nfnet_nano", 32) == 1_564_672


def test_bn_resnet_baseline_is_torchvision_basic_blocks_with_batch_norm():
    from torchvision.models.resnet import BasicBlock

    torch.manual_seed(0)
    model = create_model("resnet_bn_nano", num_classes=10, drop_rate=0.3, stochdepth_rate=0.0)
    assert [type(block) for block in model.blocks] == [BasicBlock, BasicBlock]
    # stem 1, each block 2 + 1 in its projection (16->24 and 24->44 change the width)
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) == 7
    assert model.head.dropout.p == 0.3
    logits = model.train()(torch.randn(4, 3, 32, 32))
    assert logits.shape == (4, 10)
    logits.logsumexp(dim=1).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    with pytest.raises(ValueError, match="stochastic depth"):
        create_model("resnet_bn_nano", stochdepth_rate=0.1)


# The meta-device count is checked against real instantiations of F0 and F1 in
# test_models_convert.py (the timm parity tests build both).
@pytest.mark.parametrize("name", sorted(PARAMS))
def test_parameter_count_is_exact(name):
    assert count_params(name) == PARAMS[name]


@pytest.mark.parametrize("name", sorted(README_GFLOPS))
def test_flops_reproduce_the_official_readme(name):
    resolution, gflops = README_GFLOPS[name]
    assert resolution == get_variant(name).test_resolution
    assert round(count_flops(name, resolution) / 1e9, 2) == gflops


def test_flops_of_a_model_match_a_count_by_hand():
    model = create_model("nfnet_nano", num_classes=10)
    by_model = count_flops(model, 32)
    # nano by hand (DM count_conv_flops): stem 3x8x9x256 + 8x8x9x256 + 8x16x9x256 + 16x16x9x64,
    # block 0 (16->32, mid 16, 1 group) at 8x8, block 1 (32->64, mid 32, 2 groups, stride 2),
    # final conv 64->128 at 4x4, classifier 128x10.
    stem = 3 * 8 * 9 * 256 + 8 * 8 * 9 * 256 + 8 * 16 * 9 * 256 + 16 * 16 * 9 * 64
    block0 = 64 * (16 * 16 + 16 * 16 * 9 * 2 + 16 * 32 + 16 * 32) + 2 * 16 * 32
    block1 = 64 * 32 * 32 + 16 * 32 * 16 * 9 + 16 * (32 * 16 * 9 + 32 * 64 + 32 * 64) + 2 * 32 * 64
    assert by_model == stem + block0 + block1 + 16 * 64 * 128 + 128 * 10
    assert count_flops("nfnet_f0", 256) == 12_384_198_656


def test_small_variants_fit_their_purpose():
    nano = create_model("nfnet_nano", num_classes=10)
    assert sum(p.numel() for p in nano.parameters()) == 40_244
    assert get_variant("nfnet_nano").train_resolution == 32
    assert get_variant("nfnet_micro").train_resolution == 64
    assert len(get_variant("nfnet_micro").depths) == 3


def test_variant_recipe_defaults_match_the_official_table():
    f0, f3 = get_variant("nfnet_f0"), get_variant("nfnet_f3")
    assert (f0.train_resolution, f0.test_resolution, f0.drop_rate) == (192, 256, 0.2)
    assert (f0.randaugment_layers, f0.randaugment_magnitude) == (4, 5)
    assert (f3.depths, f3.randaugment_magnitude, f3.drop_rate) == ((4, 8, 24, 12), 15, 0.4)
    assert (f0.alpha, f0.se_ratio, f0.group_width, f0.stochdepth_rate) == (0.2, 0.5, 128, 0.25)
    with pytest.raises(dataclasses.FrozenInstanceError):
        f0.alpha = 0.1


def test_overrides_reach_the_model():
    model = create_model(
        "nfnet_nano", num_classes=7, drop_rate=0.5, stochdepth_rate=0.4, padding="symmetric"
    )
    assert model.head.dropout.p == 0.5
    assert model.head.fc.out_features == 7
    # DM nfnet.py: block i of N gets rate * i / N.
    assert [b.stochdepth_rate for b in model.blocks] == [0.0, 0.2]
    assert model.stem.conv0.padding == "symmetric"
    assert create_model("nfnet_nano", numerics="timm").final_conv.numerics == "timm"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "nfnet_f9"}, "nfnet_f9"),
        ({"name": "nfnet_nano", "dropout": 0.1}, "dropout"),
        ({"name": "nfnet_nano", "padding": "valid"}, "padding"),
        ({"name": "nfnet_nano", "numerics": "jax"}, "numerics"),
        ({"name": "nfnet_nano", "activation": "swish"}, "swish"),
    ],
)
def test_bad_arguments_name_the_offender(kwargs, message):
    with pytest.raises(ValueError, match=message):
        create_model(**kwargs)


def test_the_classifier_head_starts_as_dm_initialises_it():
    torch.manual_seed(0)
    model = create_model("nfnet_micro", num_classes=1000)
    fc = model.head.fc
    assert (fc.out_features, fc.in_features) == (1000, 512)
    # DM nfnet.py: N(0, 0.01) weight, zero bias; 512k samples give the std to ~0.1 %.
    assert abs(fc.weight.std().item() - 0.01) < 1e-4
    assert torch.count_nonzero(fc.bias).item() == 0
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 1000)


@pytest.mark.parametrize("name", ["nfnet_nano", "resnet_bn_nano"])
def test_channels_last_sets_the_activation_layout_of_every_family(name):
    images = torch.randn(2, 3, 32, 32)
    for channels_last in (True, False):
        model = create_model(name, num_classes=10, channels_last=channels_last).eval()
        with torch.no_grad():
            features = model.forward_features(images)
        layout = torch.channels_last if channels_last else torch.contiguous_format
        assert features.is_contiguous(memory_format=layout)
        assert features.is_contiguous() != channels_last
