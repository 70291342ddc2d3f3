"""The Trainer's pieces that run without a cluster: log/eval/checkpoint timing, batch sources."""

from __future__ import annotations

import pytest

from pipeline.config import load_config
from pipeline.data import write_shards
from pipeline.train import batches
from pipeline.train.batches import ShardBatches, describe_dataset, make_batches
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
    ((images, labels),) = next(source.steps(0))
    assert images.shape == (4, 3, 32, 32) and labels.shape == (4,)


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
