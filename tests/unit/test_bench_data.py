"""``python -m pipeline.bench data --cores N``: the CPUs a GPU needs, from a measured rate."""

from __future__ import annotations

import math

import pytest

from pipeline.bench import data


def test_cores_mode_measures_the_f0_recipe_and_sizes_a_node_from_the_assumed_gpu_rate(capsys):
    figures = data.main(
        ["--cores", "1", "--batches", "2", "--images", "32", "--batch-size", "4"]
        + ["--resolution", "32", "--gpu-images-per-s", "300"]
    )
    assert figures["cores"] == 1 and figures["assumed_gpu_images_per_s"] == 300
    rate = figures["images_per_cpu_s"]
    assert rate > 0 and figures["images_per_s_per_core"] == figures["images_per_s"] > 0
    assert figures["loader_cores_per_gpu"] == pytest.approx(300 / rate)
    assert figures["loader_cores_per_node"] == pytest.approx(8 * 300 / rate)
    out = capsys.readouterr().out
    assert "RandAugment 4x5" in out  # nfnet_f0's, from the variant table
    assert "an input, not a measurement" in out
    loaders = math.ceil(300 / rate)
    assert f"data.loader_workers={loaders} and scaling.cpus_per_worker={loaders + 1}" in out


def test_cores_below_one_is_refused_with_exit_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        data.main(["--cores", "0"])
    assert exit_info.value.code == 2
    assert "--cores must be >= 1" in capsys.readouterr().err
