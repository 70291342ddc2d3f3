"""param_groups picks the official groups by parameter name, never by position."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pipeline.models import create_model
from pipeline.optim import param_groups


@pytest.fixture(scope="module")
def model() -> nn.Module:
    torch.manual_seed(0)
    return create_model("nfnet_nano", num_classes=10)


def by_name(groups: list[dict]) -> dict[str, dict]:
    return {group["name"]: group for group in groups}


def test_groups_follow_the_official_split(model):
    groups = by_name(param_groups(model, weight_decay=2e-5, clipping=0.01))
    names = {key: set(group["param_names"]) for key, group in groups.items()}
    all_names = [name for name, _ in model.named_parameters()]
    expected_no_decay = {
        n for n in all_names if n.rsplit(".", 1)[-1] in ("gain", "bias", "skip_gain")
    }
    assert names["classifier"] == {"head.fc.weight"}
    assert names["gains_biases"] == expected_no_decay
    assert "head.fc.bias" in names["gains_biases"]  # DM: the classifier bias is still clipped
    assert names["weights"] == set(all_names) - expected_no_decay - {"head.fc.weight"}
    # nfnet_nano: 18 WS convs (weight, gain, bias) in a stem of 4, 2 blocks of 5 and a final
    # conv; 2 SE blocks of 2 Linears; 2 skip gains; the classifier.
    assert (len(names["gains_biases"]), len(names["weights"]), len(names["classifier"])) == (
        37,
        19,
        1,
    )
    assert (groups["gains_biases"]["weight_decay"], groups["gains_biases"]["clipping"]) == (0, 0.01)
    assert (groups["classifier"]["weight_decay"], groups["classifier"]["clipping"]) == (2e-5, None)
    assert (groups["weights"]["weight_decay"], groups["weights"]["clipping"]) == (2e-5, 0.01)
    parameters = dict(model.named_parameters())
    for group in groups.values():
        for name, param in zip(group["param_names"], group["params"], strict=True):
            assert param is parameters[name]


class HeadFirst(nn.Module):
    """The same modules registered in another order: the head's parameters come first."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.head = model.head
        self.final_conv = model.final_conv
        self.blocks = model.blocks
        self.stem = model.stem


def test_head_is_excluded_by_name_when_the_parameter_order_changes(model):
    reordered = HeadFirst(model)
    parameters = list(reordered.parameters())
    # Position-based exclusion (timm's parameters()[:-2]) would now skip the stem's last conv.
    assert parameters[0] is model.head.fc.weight
    assert parameters[-1] is model.stem.conv3.bias
    groups = by_name(param_groups(reordered, weight_decay=2e-5, clipping=0.01))
    assert groups["classifier"]["params"] == [model.head.fc.weight]
    assert groups["classifier"]["clipping"] is None
    clipped = [p for g in groups.values() if g["clipping"] is not None for p in g["params"]]
    assert len(clipped) == len(parameters) - 1
    assert all(p is not model.head.fc.weight for p in clipped)


def test_missing_classifier_fails_loudly(model):
    with pytest.raises(ValueError, match=r"no trainable parameter named 'classifier\.weight'"):
        param_groups(model, weight_decay=2e-5, clipping=0.01, classifier_name="classifier")


def test_custom_classifier_name():
    net = nn.Sequential()
    net.add_module("features", nn.Linear(4, 8))
    net.add_module("logits", nn.Linear(8, 3))
    groups = by_name(param_groups(net, 1e-4, 0.02, classifier_name="logits"))
    assert groups["classifier"]["param_names"] == ["logits.weight"]
    assert groups["weights"]["param_names"] == ["features.weight"]
    assert groups["gains_biases"]["param_names"] == ["features.bias", "logits.bias"]


def test_clipping_none_turns_agc_off_everywhere(model):
    groups = param_groups(model, weight_decay=2e-5, clipping=None)
    assert [group["clipping"] for group in groups] == [None, None, None]


def test_frozen_parameters_are_left_out():
    torch.manual_seed(0)
    frozen = create_model("nfnet_nano", num_classes=10)
    frozen.stem.requires_grad_(False)
    groups = param_groups(frozen, weight_decay=2e-5, clipping=0.01)
    names = [name for group in groups for name in group["param_names"]]
    assert len(names) == 57 - 12  # the stem's 4 convs hold 12 parameters
    assert not any(name.startswith("stem.") for name in names)
