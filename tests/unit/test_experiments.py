"""Experiment files: each shipped one validates; bad names and files exit 2 before anything runs."""

from pathlib import Path

import pytest

from pipeline.experiments import main
from pipeline.run.experiments import (
    EXPERIMENTS_DIR,
    available,
    load_experiment,
    run_configs,
    run_name,
    select_runs,
)

SHIPPED = ["agc_batch", "agc_lambda", "nf_vs_bn", "transfer"]


def test_the_four_experiments_of_the_paper_are_shipped():
    assert available() == sorted(SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
def test_every_run_of_every_experiment_resolves_to_a_valid_config(name, tmp_path):
    text = (EXPERIMENTS_DIR / f"{name}.yaml").read_text()
    assert text.startswith("#"), "each experiment starts with a comment saying how to run it"
    assert f"python -m pipeline.experiments run {name}" in text
    assert f"python -m pipeline.compare --experiment {name}" in text
    _, spec = load_experiment(name)
    configs = run_configs(name, spec, tmp_path, "sqlite:///x.db", [])
    assert list(configs) == [run.name for run in spec.runs]
    for config in configs.values():
        assert config.tracking.experiment == name
        assert config.checkpoint.storage_url == f"file://{tmp_path}/runs"
        assert "{out}" not in config.data.train_url
        assert config.scaling.num_workers * config.scaling.cpus_per_worker <= 2  # 2 cores
    assert spec.budget_minutes <= 30


def test_agc_batch_spans_256_1024_4096_for_nf_with_and_without_agc_and_bn_at_the_paper_lr(tmp_path):
    _, spec = load_experiment("agc_batch")
    configs = run_configs("agc_batch", spec, tmp_path, "sqlite:///x.db", [])
    grid = {
        (c.train.global_batch, c.model.name, c.optim.use_agc, c.train.seed)
        for c in configs.values()
    }
    models = {("nfnet_nano", True), ("nfnet_nano", False), ("resnet_bn_nano", False)}
    batches = (256, 1024, 4096)
    expected = {(b, *model, 0) for b in batches for model in models}
    expected |= {(4096, *model, seed) for model in models for seed in (1, 2)}  # 3 seeds at 4096
    assert grid == expected
    assert {c.optim.lr for c in configs.values()} == {None}  # 0.1 * B / 256
    assert {c.optim.lr_per_256 for c in configs.values()} == {0.1}
    assert {c.train.epochs for c in configs.values()} == {20}  # the same epochs at every batch


def test_agc_lambda_sweeps_0_005_to_0_64_at_batch_4096(tmp_path):
    _, spec = load_experiment("agc_lambda")
    configs = run_configs("agc_lambda", spec, tmp_path, "sqlite:///x.db", [])
    assert {c.train.global_batch for c in configs.values()} == {4096}
    points = {
        (c.optim.clipping if c.optim.use_agc else None, c.train.seed) for c in configs.values()
    }
    lambdas = (0.005, 0.01, 0.04, 0.16, 0.64)
    assert points == {(lam, 0) for lam in lambdas} | {(None, 0)}


def test_shrinking_options_apply_to_every_run(tmp_path):
    _, spec = load_experiment("agc_batch")
    configs = run_configs("agc_batch", spec, tmp_path, "sqlite:///x.db", ["train.steps=3"])
    assert {c.train.steps for c in configs.values()} == {3}


def test_run_name_is_stable_and_changes_with_the_config(tmp_path):
    _, spec = load_experiment("agc_batch")
    run = spec.runs[0]
    first = run_configs("agc_batch", spec, tmp_path, "sqlite:///a.db", [])[run.name]
    again = run_configs("agc_batch", spec, tmp_path, "sqlite:///b.db", [])[run.name]
    shrunk = run_configs("agc_batch", spec, tmp_path, "sqlite:///a.db", ["train.steps=3"])
    assert run_name(run, first, None) == run_name(run, again, None)  # the store does not count
    assert run_name(run, first, None).startswith("b256-agc-")
    assert run_name(run, first, None) != run_name(run, shrunk[run.name], None)


def _write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    return str(path)


VALID = """
claim: a claim
figure: batch
base: configs/demo.yaml
budget_minutes: 5
runs:
  - {name: a, overrides: [train.global_batch=64]}
"""


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("claim: [unclosed", "not valid YAML"),
        ("- a list", "top level must be a mapping"),
        (VALID.replace("figure: batch", "figure: pie"), "figure"),
        (VALID + "colour: red\n", "colour"),
        (VALID.replace("runs:", "runz:"), "runs"),
        (VALID + "  - {name: a}\n", "appears twice"),
        (VALID + "  - {name: b, finetune_from: c@5}\n", "names no earlier run"),
        (VALID + "  - {name: b, finetune_from: a}\n", "neither 'scratch' nor RUN@STEP"),
        (VALID.replace("global_batch=64", "global_batch=6x"), "run 'a'"),
        (VALID.replace("global_batch=64", "global_batch=7"), "not divisible"),
        (VALID.replace("configs/demo.yaml", "configs/none.yaml"), "does not exist"),
    ],
)
def test_a_bad_experiment_file_exits_2_naming_the_problem(tmp_path, capsys, text, message):
    assert main(["run", _write(tmp_path, text), "--out", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # nothing was written or started


def test_an_unknown_experiment_or_run_exits_2_listing_the_choices(tmp_path, capsys):
    assert main(["run", "agc_batchh", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "unknown experiment 'agc_batchh'" in err and "agc_lambda" in err
    assert main(["run", "agc_batch", "--only", "b256-agc,b99", "--out", str(tmp_path)]) == 2
    assert "no run(s) ['b99']" in capsys.readouterr().err
    assert main(["run", str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_only_keeps_the_runs_named_and_the_runs_they_finetune_from(tmp_path):
    text = VALID + "  - {name: b, finetune_from: a@5}\n  - {name: c, finetune_from: scratch}\n"
    name, spec = load_experiment(_write(tmp_path, text))
    assert [run.name for run in select_runs(name, spec, None)] == ["a", "b", "c"]
    assert [run.name for run in select_runs(name, spec, ["b"])] == ["a", "b"]
    assert [run.name for run in select_runs(name, spec, ["c"])] == ["c"]
    assert [(run.kind, run.parent) for run in spec.runs] == [
        ("pretrain", None),
        ("finetune", ("a", 5)),
        ("scratch", None),
    ]
