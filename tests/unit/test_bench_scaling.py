"""The scaling benchmark's own arithmetic and argument checks (its runs take minutes: see
``python -m pipeline.bench scaling``)."""

from __future__ import annotations

import pytest

from pipeline.bench import scaling


def test_repeated_runs_are_averaged_metric_by_metric():
    runs = [
        {
            "train/images_per_s": 300.0,
            "train/data_wait_fraction": 0.10,
            "train/allreduce_fraction": 0.06,
            "cpu_share": {"training workers": 0.88, "Ray Train actors": 0.02},
            "training_thread": [{"on_core": 0.86, "waiting": 0.08, "blocked": 0.06}],
            "cores": 2,
        },
        {
            "train/images_per_s": 340.0,
            "train/data_wait_fraction": 0.12,
            "train/allreduce_fraction": 0.08,
            "cpu_share": {"training workers": 0.90},  # a role seen in one run only
            "training_thread": [{"on_core": 0.90, "waiting": 0.06, "blocked": 0.04}],
            "cores": 2,
        },
    ]
    mean = scaling.mean_figures(runs)
    assert mean["train/images_per_s"] == pytest.approx(320.0)
    assert mean["train/allreduce_fraction"] == pytest.approx(0.07)
    assert mean["cpu_share"] == pytest.approx({"training workers": 0.89, "Ray Train actors": 0.01})
    assert mean["training_thread"] == pytest.approx(
        {"on_core": 0.88, "waiting": 0.07, "blocked": 0.05}
    )
    assert mean["cores"] == 2


def test_the_pair_ratios_mean_comes_with_its_standard_error():
    # The nine pair ratios of this project's three 3-pair runs (README, Measured figures).
    ratios = [1.61, 1.82, 1.39, 1.47, 1.47, 1.80, 1.65, 1.74, 1.55]
    mean, error = scaling.mean_and_standard_error(ratios)
    assert mean == pytest.approx(1.6111, abs=1e-4)
    # Squared deviations sum to 0.18989; / 8, square root: 0.15407; / sqrt(9): 0.05136.
    assert error == pytest.approx(0.05136, abs=1e-5)
    assert scaling.mean_and_standard_error([1.7]) == (1.7, 0.0)


def test_fewer_than_one_pair_is_refused_with_exit_code_2(capsys):
    with pytest.raises(SystemExit) as exit_:
        scaling.main(["--pairs", "0"])
    assert exit_.value.code == 2
    assert "--pairs must be at least 1, not 0" in capsys.readouterr().err
