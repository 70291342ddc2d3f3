"""The Trainer's pieces that run without a cluster: log/eval/checkpoint timing, batch sources,
evaluation precision, the weights a run publishes and the weights a finetune starts from."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
import yaml
from mlflow import MlflowClient
from torch import nn

from pipeline import finetune
from pipeline.config import ConfigError, load_config
from pipeline.data.mixing import MixTargets
from pipeline.data.writer import write_shards
from pipeline.optim import ModelEma
from pipeline.run.references import resolve_reference
from pipeline.tracking import create_run, register_model
from pipeline.tracking.artifacts import (
    TAG_PRETRAIN_WEIGHTS,
    TAG_WEIGHTS,
    WEIGHTS_ARTIFACTS,
    log_safetensors_weights,
    publish_weights,
)
from pipeline.train import batches
from pipeline.train import checkpoint as ckpt
from pipeline.train.batches import ShardBatches, SyntheticBatches, describe_dataset, make_batches
from pipeline.train.evaluate import evaluate
from pipeline.train.plan import make_plan
from pipeline.train.trainer import due
from tests.helpers.images import IndexedSource


def test_due_every_n_steps_and_always_at_the_last():
    assert [step for step in range(1, 12) if due(step, 4, 11)] == [4, 8, 11]
    assert [step for step in range(1, 4) if due(step, 100, 3)] == [3]
    assert all(due(step, 1, 5) for step in range(1, 6))


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    """30 samples labelled by index: train 20, validation 10."""
    url = f"file://{tmp_path_factory.mktemp('indexed')}"
    write_shards(IndexedSource(30), url, samples_per_shard=8, val_samples=10, progress=False)
    return url


def run_config(url: str, *overrides: str):
    config = load_config(
        None,
        [
            "model.name=nfnet_nano",
            "train.global_batch=4",
            "train.micro_batch=4",
            "data.loader_workers=0",
            f"data.train_url={url}",
            *overrides,
        ],
    )
    shape = describe_dataset(url, allow_pipe=config.data.allow_pipe)
    return config, make_plan(config, shape.num_classes, shape.train_samples, shape.val_samples)


def test_evaluation_reads_a_pipe_url_when_data_allow_pipe_is_set(shards):
    template = f"pipe:cat {shards[len('file://') :]}/{{path}}"
    config, plan = run_config(template, "data.allow_pipe=true")
    source = make_batches(config, plan, rank=0)
    assert isinstance(source, ShardBatches)
    labels = sorted(int(label) for _, batch in source.eval_batches() for label in batch)
    assert len(labels) == 10 and len(set(labels)) == 10
    ((images, mix),) = next(source.steps(0))
    assert images.shape == (4, 3, 32, 32) and isinstance(mix, MixTargets)
    assert mix.labels.shape == mix.mix_labels.shape == mix.ratio.shape == (4,)


def test_evaluation_and_training_loaders_get_the_same_pipe_and_pinning_settings(
    shards, monkeypatch
):
    calls = {}

    def recorder(name):
        def make(url, **kwargs):
            calls[name] = kwargs
            return [("images", "labels")] * 4

        return make

    monkeypatch.setattr(batches, "make_train_loader", recorder("train"))
    monkeypatch.setattr(batches, "make_eval_loader", recorder("eval"))
    config, plan = run_config(shards, "data.allow_pipe=true", "scaling.use_gpu=true")
    source = make_batches(config, plan, rank=0)
    list(source.eval_batches())
    next(source.steps(0))
    for name in ("train", "eval"):
        assert (calls[name]["allow_pipe"], calls[name]["pin_memory"]) == (True, True), name


def test_synthetic_micro_batches_are_mixed_augmented_and_split_independent():
    # 2 workers x 1 slot and 1 worker x 2 slots see the same global micro-batches, mixed and
    # augmented alike: what the data-parallel exactness test relies on.
    url = "synthetic://?samples=64&resolution=16&classes=4"
    mixing = ["data.mixup_alpha=0.2", "data.cutmix=true", "data.randaugment_layers=2"]
    steps = {}
    for workers in (1, 2):
        config, plan = run_config(
            url, "train.global_batch=8", f"scaling.num_workers={workers}", *mixing
        )
        assert plan.micro_batch == 4 and plan.accumulation_steps == 3 - workers
        for rank in range(workers):
            source = make_batches(config, plan, rank)
            assert isinstance(source, SyntheticBatches) and source.recipe.images_per_output == 2
            micro = next(source.steps(3))
            steps[workers, rank] = micro
    for slot in range(2):
        one, two = steps[1, 0][slot], steps[2, slot][0]
        assert torch.equal(one[0], two[0])
        assert all(torch.equal(a, b) for a, b in zip(one[1], two[1], strict=True))
    first = steps[1, 0][0][1]
    assert (first.labels != first.mix_labels).any() and (first.ratio < 1).any()


class RecordsAutocast(nn.Module):
    """Logits from a linear layer; remembers whether autocast (bf16) was on."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 4)
        self.autocast: list[bool] = []

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.autocast.append(torch.is_autocast_enabled("cpu"))
        return self.linear(images.mean((2, 3)))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_evaluation_runs_in_the_chosen_precision(precision):
    model = RecordsAutocast()
    images = torch.randn(6, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    labels = model.linear(images.mean((2, 3))).argmax(1)
    batches = lambda: iter([(images, labels)])  # noqa: E731
    cpu = torch.device("cpu")
    metrics = evaluate({"": model}, batches, device=cpu, precision=precision, limit=None)
    assert model.autocast == [precision == "bf16"]
    if precision == "fp32":  # the same logits as the model outside evaluate: top-1 is 1
        assert metrics == {"val/top1": 1.0, "val/top5": 1.0}


def test_eval_precision_defaults_to_fp32_as_dm():
    assert load_config(None, []).train.eval_precision == "fp32"
    with pytest.raises(ValueError, match="precision"):
        evaluate({}, lambda: iter([]), device=torch.device("cpu"), precision="fp16", limit=None)


@pytest.fixture(scope="module")
def uri(tmp_path_factory) -> str:
    """One SQLite MLflow store for the module (creating its tables takes about a second)."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def _weights(value: float) -> dict[str, torch.Tensor]:
    return {"stem.weight": torch.full((2, 3), value), "head.fc.bias": torch.full((4,), value)}


def _fetch_config(uri: str):
    return load_config(None, [f"tracking.uri={uri}"])


def test_a_run_publishes_raw_and_ema_weights_and_registers_the_ema_ones(uri):
    run_id = create_run(uri, "weights", None, {}, "{}\n")
    version = publish_weights(uri, run_id, {"raw": _weights(1.0), "ema": _weights(2.0)}, "nano")
    client = MlflowClient(uri, registry_uri=uri)
    published = {item.path for item in client.list_artifacts(run_id, "weights")}
    assert published == set(WEIGHTS_ARTIFACTS.values())
    registered = client.get_model_version("nano", str(version))
    assert registered.source == f"runs:/{run_id}/weights/ema.safetensors"
    assert registered.tags[TAG_WEIGHTS] == "ema"
    config = _fetch_config(uri)
    for choice, value in (("ema", 2.0), ("raw", 1.0)):
        origin = resolve_reference(f"models:/nano/{version}", uri, weights=choice)
        assert origin.weights["weights"] == choice and origin.pretrain_run_id == run_id
        assert origin.tags("digits")[TAG_PRETRAIN_WEIGHTS] == choice
        fetched = ckpt.fetch_weights(origin.weights, config)
        assert all(torch.equal(fetched[k], v) for k, v in _weights(value).items())


def test_a_version_holding_only_raw_weights_refuses_ema(uri):
    run_id = create_run(uri, "weights", None, {}, "{}\n")
    log_safetensors_weights(uri, run_id, _weights(3.0))  # weights/model.safetensors, no tag
    version = register_model(uri, run_id, "weights/model.safetensors", "raw-only")
    raw = resolve_reference(f"models:/raw-only/{version}", uri, weights="raw")
    assert raw.weights["url"] == f"runs:/{run_id}/weights/model.safetensors"
    with pytest.raises(ConfigError, match="--weights ema: run .* published no weights/ema"):
        resolve_reference(f"models:/raw-only/{version}", uri, weights="ema")


def test_a_checkpoint_gives_its_ema_weights_by_default_and_raw_on_request(uri, tmp_path):
    model = nn.Linear(3, 2)
    ema = ModelEma(model, decay=0.9)
    with torch.no_grad():
        model.weight.add_(1.0)  # the raw weights move on; the EMA stays behind
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ckpt.save(str(tmp_path), model, optimizer, ema, {"step": 1})
    config = _fetch_config(uri)
    for choice, module in ((None, ema.module), ("raw", model)):
        kwargs = {} if choice is None else {"weights": choice}
        origin = resolve_reference(str(tmp_path), uri, **kwargs)
        fetched = ckpt.fetch_weights(origin.weights, config)
        assert torch.equal(fetched["weight"], module.weight)
    (tmp_path / "ema.safetensors").unlink()
    with pytest.raises(ConfigError, match="ema.safetensors does not exist"):
        resolve_reference(str(tmp_path), uri)
    assert resolve_reference(str(tmp_path), uri, weights="raw").weights["weights"] == "raw"
    with pytest.raises(ConfigError, match="--weights 'best'"):
        resolve_reference(str(tmp_path), uri, weights="best")


def test_finetune_command_takes_weights_ema_or_raw(tmp_path, caplog, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model": {"name": "nfnet_nano"},
                "data": {"train_url": "synthetic://?samples=64&resolution=16&classes=4"},
                "train": {"global_batch": 8, "micro_batch": 8, "steps": 1},
                "checkpoint": {"storage_url": f"file://{tmp_path}/runs"},
                "tracking": {"uri": f"sqlite:///{tmp_path}/mlflow.db"},
                "scaling": {"num_workers": 1},
            }
        )
    )
    folder = Path(tmp_path / "ckpt")
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"")
    argv = ["--config", str(config), "--from", str(folder), "--dry-run"]
    with caplog.at_level(logging.INFO, logger="pipeline.finetune"):
        assert finetune.main([*argv, "--weights", "raw"]) == 0
    assert "'weights': 'raw'" in caplog.text
    assert finetune.main(argv) == 2  # ema by default, and this checkpoint has no ema file
    assert "ema.safetensors does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        finetune.main([*argv, "--weights", "best"])
    assert exit_info.value.code == 2
