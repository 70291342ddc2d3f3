"""``python -m pipeline.bench gpu --smoke``: the GPU suite's own code, at tiny sizes on the CPU."""

from __future__ import annotations

import math

import pytest

from pipeline.bench import gpu

ROWS = [
    f"{side} {mode} {layout}"
    for mode in ("eager", "compiled")
    for layout in ("NCHW", "NHWC")
    for side in ("timm", "pipeline")
]


def test_the_smoke_mode_measures_every_row_of_the_table(capsys):
    figures = gpu.main(["--smoke"])
    rows = figures["rows"]
    assert [row["row"] for row in rows] == ROWS
    for timm_row, ours in zip(rows[::2], rows[1::2], strict=True):
        assert timm_row["vs_timm"] == 1.0
        assert ours["vs_timm"] == pytest.approx(ours["images_per_s"] / timm_row["images_per_s"])
    for row in rows:
        assert math.isfinite(row["images_per_s"]) and row["images_per_s"] > 0, row
        # The CPU's peak is the start-up matmul probe: the step's convolutions reach a share of it.
        assert 0 < row["mfu"] < 1, row
        assert math.isnan(row["peak_memory_gib"])  # a GPU's allocator figure only
    assert "measured at start-up" in figures["peak_source"] and figures["peak_tflops"] > 0
    table = capsys.readouterr().out
    assert "nfnet_nano vs timm, batch 4, 32 px, fp32" in table
    for name in ROWS:
        assert f"  {name} " in table


def test_without_a_gpu_the_full_mode_exits_2_and_says_so(capsys, monkeypatch):
    monkeypatch.setattr(gpu.torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exit_info:
        gpu.main([])
    assert exit_info.value.code == 2
    assert "no CUDA GPU" in capsys.readouterr().err


def test_the_format_shows_a_missing_figure_as_a_dash():
    row = {"row": "timm eager NCHW", "images_per_s": 10.0, "vs_timm": 1.0}
    text = gpu.format_table([row | {"mfu": math.nan, "peak_memory_gib": math.nan}])
    assert text.splitlines()[1].split() == ["timm", "eager", "NCHW", "10.00", "1.000", "-", "-"]
    text = gpu.format_table([row | {"mfu": 0.4123, "peak_memory_gib": 12.5}])
    assert text.splitlines()[1].split()[-3:] == ["41.23", "%", "12.50"]
