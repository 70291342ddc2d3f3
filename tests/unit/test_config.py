"""The run config: every shipped file validates; bad keys, types and values exit 2 naming them."""

import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import ConfigError, RunConfig, load_config

ROOT = Path(__file__).resolve().parents[2]
# Run configs; experiment files (configs/experiments/) are checked by test_experiments.py.
CONFIG_FILES = sorted(
    path for path in (ROOT / "configs").rglob("*.yaml") if "experiments" not in path.parts
)


def test_configs_directory_is_not_empty():
    assert len(CONFIG_FILES) >= 9  # eight paper variants and the demo


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_shipped_config_validates(path):
    config = load_config(path)
    assert isinstance(config, RunConfig)
    first_line = path.read_text().splitlines()[0]
    assert first_line.startswith("#"), "each config starts with a comment saying how to run it"
    assert "python -m pipeline." in path.read_text()


def test_paper_configs_have_the_paper_batch_and_length():
    for index in range(8):
        config = load_config(ROOT / f"configs/pretrain/nfnet_f{index}.yaml")
        assert config.model.name == f"nfnet_f{index}"
        assert config.train.global_batch == 4096
        assert config.train.epochs == 360
        assert config.optim.clipping == 0.01
        assert (
            config.accumulation_steps * config.train.micro_batch * config.scaling.num_workers
            == 4096
        )


def test_dotted_overrides_are_typed(tmp_path):
    config = load_config(None, ["optim.lr=0.4", "train.global_batch=64", "train.micro_batch=8"])
    assert config.optim.lr == 0.4
    assert config.accumulation_steps == 8
    config = load_config(None, ["data.storage_options={anon: true}", "model.padding=symmetric"])
    assert config.data.storage_options == {"anon": True}
    assert config.model.padding == "symmetric"


@pytest.mark.parametrize(
    ("text", "override", "named"),
    [
        ("optim:\n  lrr: 0.1\n", [], "optim.lrr"),
        ("optim:\n  lr: fast\n", [], "optim.lr"),
        ("optim:\n  lr: -1\n", [], "optim.lr"),
        ("", ["train.micro_batch=0"], "train.micro_batch"),
        ("", ["train.global_batch=100", "train.micro_batch=32"], "train.global_batch"),
        ("", ["modle.name=x"], "modle"),
        ("", ["model.padding=valid"], "model.padding"),
    ],
)
def test_bad_config_names_key_and_file(tmp_path, text, override, named):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as error:
        load_config(path, override)
    assert named in str(error.value)
    assert str(path) in str(error.value)


def test_bad_config_exits_2_from_the_command_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  global_batchh: 64\n")
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.pretrain", "--config", str(path), "--dry-run"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert result.returncode == 2
    assert "train.global_batchh" in result.stderr and str(path) in result.stderr


def test_missing_file_and_malformed_override():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("/nonexistent/run.yaml")
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(None, ["optim.lr"])


def test_flat_params_are_dotted():
    flat = load_config(None).flat()
    assert flat["optim.weight_decay"] == 2e-5
    assert flat["model.name"] == "nfnet_f0"
    assert all(key.count(".") == 1 for key in flat)


def test_relative_paths_become_absolute_for_workers_in_other_directories(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = load_config(
        None,
        [
            "data.train_url=file://shards/shapes",
            "checkpoint.storage_url=runs",
            "tracking.uri=sqlite:///mlflow.db",
        ],
    ).with_absolute_paths()
    assert config.data.train_url == f"file://{tmp_path}/shards/shapes"
    assert config.checkpoint.storage_url == f"file://{tmp_path}/runs"
    assert config.tracking.uri == f"sqlite:///{tmp_path}/mlflow.db"
    remote = load_config(None, ["data.train_url=s3://bucket/shards"]).with_absolute_paths()
    assert remote.data.train_url == "s3://bucket/shards"
