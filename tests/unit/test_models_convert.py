"""Weights: timm parity, DeepMind Haiku files, safetensors round trip."""

import pickle

import numpy as np
import pytest
import timm
import torch

from pipeline.models import (
    create_model,
    load_haiku_weights,
    load_safetensors,
    load_timm_weights,
    save_safetensors,
)


def _perturbed_timm(name):
    """timm's random init with every gain, bias and skip gain moved off its constant init value,
    so that a wrong mapping of any of them changes the logits."""
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    with torch.no_grad():
        for key, param in model.named_parameters():
            if key.endswith("skipinit_gain"):
                param.uniform_(0.5, 1.5)
            elif key.endswith("gain"):
                param.uniform_(0.8, 1.2)
            elif key.endswith("bias"):
                param.normal_(0.0, 0.05)
    return model


@pytest.fixture(scope="module")
def timm_f0():
    return _perturbed_timm("dm_nfnet_f0")


@pytest.mark.parametrize(("variant", "param_count"), [("f0", 71_489_284), ("f1", 132_634_256)])
def test_timm_numerics_reproduce_timm_logits(variant, param_count, timm_f0):
    reference = timm_f0 if variant == "f0" else _perturbed_timm(f"dm_nfnet_{variant}")
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(x)
        ours = create_model(f"nfnet_{variant}", numerics="timm").eval()
        assert sum(p.numel() for p in ours.parameters()) == param_count
        load_timm_weights(ours, reference.state_dict())
        timm_logits = ours(x)
    scale = expected.abs().max().item()
    assert (timm_logits - expected).abs().max().item() <= 1e-4 * scale


def test_official_numerics_are_close_to_timm_but_not_equal(timm_f0):
    reference = timm_f0
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(x)
        official = create_model("nfnet_f0").eval()
        load_timm_weights(official, reference.state_dict())
        official_logits = official(x)
    scale = expected.abs().max().item()
    # Official numerics (tanh GELU, max(fan_in*var, 1e-4)) differ from timm's: measured 2.7 % of
    # the largest logit here; small but not zero.
    relative = (official_logits - expected).abs().max().item() / scale
    print(f"F0 official vs timm logits: max abs diff / max abs logit = {relative:.4f}")
    assert 1e-3 < relative < 0.1


def test_timm_state_dict_with_a_missing_key_is_refused():
    reference = timm.create_model("dm_nfnet_f0", pretrained=False)
    state = reference.state_dict()
    del state["stages.2.3.conv2b.gain"]
    with torch.device("meta"):
        ours = create_model("nfnet_f0")
    with pytest.raises(ValueError, match=r"blocks\.6\.conv1b\.gain"):
        load_timm_weights(ours, state)


def _haiku_tree(model):
    """The Haiku parameter tree of DM nfnet.py for ``model``, written from the official names:
    NFNet/~/stem_convN, NFNet/~/nf_block[_N]/~/{conv0,conv1,conv1b,conv2,conv_shortcut},
    .../~/squeeze_excite/~/linear[_1], NFNet/~/final_conv, NFNet/~/linear; HWIO convs, (in, out)
    linears, params w/gain/bias, b, skip_gain."""

    def conv(module):
        w = module.weight.detach().numpy()
        return {"w": w.transpose(2, 3, 1, 0), "gain": module.gain.detach().numpy(),
                "bias": module.bias.detach().numpy()}  # fmt: skip

    def linear(module):
        return {"w": module.weight.detach().numpy().T, "b": module.bias.detach().numpy()}

    tree = {f"NFNet/~/stem_conv{i}": conv(getattr(model.stem, f"conv{i}")) for i in range(4)}
    for i, block in enumerate(model.blocks):
        prefix = "NFNet/~/nf_block" + (f"_{i}" if i else "")
        tree[prefix] = {"skip_gain": block.skip_gain.detach().numpy().reshape(())}
        for name in ["conv0", "conv1", "conv1b", "conv2", "conv_shortcut"]:
            if hasattr(block, name):
                tree[f"{prefix}/~/{name}"] = conv(getattr(block, name))
        tree[f"{prefix}/~/squeeze_excite/~/linear"] = linear(block.se.fc1)
        tree[f"{prefix}/~/squeeze_excite/~/linear_1"] = linear(block.se.fc2)
    tree["NFNet/~/final_conv"] = conv(model.final_conv)
    tree["NFNet/~/linear"] = linear(model.head.fc)
    return tree


def _randomised(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=10).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.1 * torch.randn_like(param))
    return model


def test_haiku_file_in_the_official_layout_loads_exactly(tmp_path):
    source = _randomised("nfnet_micro")
    path = tmp_path / "F0_haiku.npz"
    # DM utils.load_haiku_file reads these files with dill; a plain pickle of the same dict is
    # what dill writes for a tree of numpy arrays.
    path.write_bytes(pickle.dumps(_haiku_tree(source)))
    target = create_model("nfnet_micro", num_classes=10).eval()
    load_haiku_weights(target, path)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(target(x), source(x))
    npz = tmp_path / "flat.npz"
    flat = {f"{m}/{p}": v for m, params in _haiku_tree(source).items() for p, v in params.items()}
    np.savez(npz, **flat)
    again = load_haiku_weights(create_model("nfnet_micro", num_classes=10).eval(), npz)
    with torch.no_grad():
        assert torch.equal(again(x), source(x))


def test_haiku_tree_of_f0_has_the_official_94_modules():
    with torch.device("meta"):
        model = create_model("nfnet_f0")
    # Spec B: F0 has 94 Haiku modules (F1 178). Zero-stride arrays keep this test free of memory.
    tree = {
        module: {p: np.broadcast_to(np.float32(0), v.shape) for p, v in params.items()}
        for module, params in _haiku_tree_shapes(model).items()
    }
    assert len(tree) == 94
    load_haiku_weights(model, tree)  # strict: every parameter named, every shape right


def _haiku_tree_shapes(model):
    class Shape:
        def __init__(self, shape):
            self.shape = shape

    def conv(m):
        o, i, h, w = m.weight.shape
        return {"w": Shape((h, w, i, o)), "gain": Shape((o,)), "bias": Shape((o,))}

    def linear(m):
        return {"w": Shape(tuple(m.weight.shape[::-1])), "b": Shape(tuple(m.bias.shape))}

    tree = {f"NFNet/~/stem_conv{i}": conv(getattr(model.stem, f"conv{i}")) for i in range(4)}
    for i, block in enumerate(model.blocks):
        prefix = "NFNet/~/nf_block" + (f"_{i}" if i else "")
        tree[prefix] = {"skip_gain": Shape(())}
        for name in ["conv0", "conv1", "conv1b", "conv2", "conv_shortcut"]:
            if hasattr(block, name):
                tree[f"{prefix}/~/{name}"] = conv(getattr(block, name))
        tree[f"{prefix}/~/squeeze_excite/~/linear"] = linear(block.se.fc1)
        tree[f"{prefix}/~/squeeze_excite/~/linear_1"] = linear(block.se.fc2)
    tree["NFNet/~/final_conv"] = conv(model.final_conv)
    tree["NFNet/~/linear"] = linear(model.head.fc)
    return tree


def test_haiku_loader_refuses_code_and_junk(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("this must not run",))

    evil = tmp_path / "evil.npz"
    evil.write_bytes(pickle.dumps({"NFNet/~/linear": {"w": Evil()}}))
    model = create_model("nfnet_nano", num_classes=10)
    with pytest.raises(ValueError, match="evil.npz"):
        load_haiku_weights(model, evil)
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.npz"):
        load_haiku_weights(model, junk)


def test_safetensors_round_trip_is_exact_and_atomic(tmp_path):
    source = _randomised("nfnet_nano")
    path = tmp_path / "nano.safetensors"
    save_safetensors(source, path)
    assert [p.name for p in tmp_path.iterdir()] == ["nano.safetensors"]
    target = load_safetensors(create_model("nfnet_nano", num_classes=10), path)
    for (name, a), (_, b) in zip(
        source.state_dict().items(), target.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        load_safetensors(target, tmp_path / "missing.safetensors")
