"""Signal propagation at initialisation and the ``python -m pipeline.models`` command line."""

import subprocess
import sys

import pytest
import torch

from pipeline.models import create_model
from pipeline.models.__main__ import main
from pipeline.models.diagnostics import blockwise_noise, expected_variances, signal_propagation
from pipeline.models.summary import plot_signal_propagation, summarize


def test_expected_variances_follow_the_dm_bookkeeping():
    model = create_model("nfnet_micro")  # depths (1, 2, 2), alpha 0.2
    assert expected_variances(model) == pytest.approx([1.0, 1.04, 1.04, 1.08, 1.04, 1.08])
    betas = [block.beta for block in model.blocks]
    # beta = 1 / expected std of the block's input: a transition uses the previous stage's.
    assert betas == pytest.approx([1.0, 1.04**-0.5, 1.04**-0.5, 1.08**-0.5, 1.04**-0.5])


def test_residual_variance_follows_the_bookkeeping_within_10_percent():
    # The bookkeeping is an expectation over initialisations: one narrow net's random weights move
    # its gain by up to ~12 %, so the variance is averaged over 6 initialisations.
    totals = torch.zeros(6, dtype=torch.float64)
    for seed in range(6):
        torch.manual_seed(seed)
        model = create_model("nfnet_micro")  # depths (1, 2, 2): strides 1, 2, 2
        noise = blockwise_noise(model, 16, 64, generator=torch.Generator().manual_seed(seed))
        signals = signal_propagation(model, noise)
        totals += torch.tensor([s.avg_variance for s in signals], dtype=torch.float64)
        assert all(block.skip_gain.item() == 0.0 for block in model.blocks)  # restored
    measured = totals / 6
    expected = torch.tensor(expected_variances(model), dtype=torch.float64)
    ratios = measured / expected
    print("measured / expected per block:", [round(r, 3) for r in ratios.tolist()])
    assert (ratios - 1).abs().max().item() < 0.10
    # The reset at the stage-2 transition (entry 4) and alpha^2 = 0.04 growth inside a stage.
    assert measured[4] < measured[3]
    assert 0.02 < (measured[3] - measured[2]).item() < 0.06
    assert 0.02 < (measured[5] - measured[4]).item() < 0.06


def test_white_noise_images_lose_variance_at_each_pooled_transition():
    # Why the plot uses blockwise noise: a 2x2 average of nearly independent values keeps ~1/4 of
    # the variance, which DM's bookkeeping does not model.
    torch.manual_seed(0)
    model = create_model("nfnet_micro")
    signals = signal_propagation(model, torch.randn(16, 3, 64, 64))
    ratios = [s.avg_variance / s.expected_variance for s in signals]
    for transition in (2, 4):  # entries after the two stride-2 transition blocks
        assert 0.15 < ratios[transition] / ratios[transition - 1] < 0.4


def test_summary_counts_parameters_and_flops():
    summary = summarize("nfnet_f1")
    assert (summary.params, summary.resolution) == (132_634_256, 320)
    assert summary.flops == 35_538_968_576
    # Convolutions scale with the image area; only the SE and classifier terms do not.
    assert summarize("nfnet_f0", 192).flops == 6_977_003_520


def test_cli_list_and_info(capsys):
    assert main(["list"]) == 0
    assert capsys.readouterr().out.split() == [f"nfnet_f{i}" for i in range(8)] + [
        "nfnet_micro",
        "nfnet_nano",
        "resnet_bn_nano",
    ]
    assert main(["info", "nfnet_f1"]) == 0
    out = capsys.readouterr().out
    assert "132,634,256" in out
    assert "35,538,968,576 multiply-adds (35.54 G)" in out
    assert main(["info", "nfnet_f0", "--resolution", "192"]) == 0
    assert "FLOPs @192       6,977,003,520 multiply-adds (6.98 G)" in capsys.readouterr().out


def test_cli_bad_input_exits_2_with_a_message(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.models", "info", "nfnet_f99"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert "nfnet_f99" in result.stderr
    assert main(["spp", "nfnet_nano", "--out", str(tmp_path / "no" / "dir.png")]) == 2


def test_spp_plot_writes_a_png_of_every_block(tmp_path):
    out = tmp_path / "spp.png"
    signals = plot_signal_propagation("nfnet_nano", out, size=32)
    assert [s.index for s in signals] == [0, 1, 2]
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["spp.png"]


def test_cli_spp_writes_a_png(tmp_path):
    out = tmp_path / "spp.png"
    assert main(["spp", "nfnet_nano", "--out", str(out), "--size", "32"]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
