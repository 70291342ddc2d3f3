"""Elastic determinism of the data: global micro-batch g of step s is the same tensors however
many workers and loader processes serve the run, straight through or resumed at s."""

from __future__ import annotations

import itertools
import json
import re

import pytest
import torch

from pipeline.config import ConfigError, load_config
from pipeline.data.streams import Layout
from pipeline.data.writer import write_shards
from pipeline.run.preflight import check_resume
from pipeline.train.batches import ShardBatches, describe_dataset, make_batches
from pipeline.train.plan import check_resumed_plan, make_plan, on_workers
from tests.helpers.images import IndexedSource


@pytest.mark.parametrize(("micro_batches", "streams"), [(4, None), (4, 8), (6, 12), (1, 3)])
def test_every_micro_batch_has_one_stream_owned_by_one_process_of_one_rank(micro_batches, streams):
    num_streams = streams or micro_batches
    made = {}  # (step, global micro-batch) -> (stream, its batch number), whatever the split
    for world_size in (w for w in range(1, micro_batches + 1) if micro_batches % w == 0):
        accumulation = micro_batches // world_size
        for rank in range(world_size):
            layout = Layout(rank, world_size, accumulation, streams)
            own = num_streams // world_size
            assert layout.loader_processes(0) == 0 and layout.loader_processes(99) == own
            processes = layout.loader_processes(3)
            assert own % processes == 0 and processes <= 3
            owner = {}
            for batch in range(5, 5 + 6 * accumulation * num_streams):
                step, slot = divmod(batch, accumulation)
                stream, number = layout.locate(batch)
                assert stream % world_size == rank  # a stream belongs to one rank
                assert owner.setdefault(stream, (batch - 5) % processes) == (batch - 5) % processes
                key = step, slot * world_size + rank
                assert made.setdefault(key, (stream, number)) == (stream, number)
    # every stream makes consecutive batches, one micro-batch each
    numbers = sorted(made.values())
    for stream, group in itertools.groupby(numbers, key=lambda pair: pair[0]):
        found = [number for _, number in group]
        assert found == list(range(found[0], found[0] + len(found))), stream


def test_streams_must_be_a_multiple_of_the_micro_batches_of_a_step():
    with pytest.raises(ValueError, match="streams=3 must be a multiple .* = 2"):
        Layout(0, 2, 1, streams=3)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    """60 samples labelled by index: train 48 in 6 shards, validation 12."""
    url = f"file://{tmp_path_factory.mktemp('elastic')}"
    write_shards(IndexedSource(60, 24), url, samples_per_shard=8, val_samples=12, progress=False)
    return url


def run_config(url: str, *overrides: str):
    config = load_config(
        None,
        [
            "model.name=nfnet_nano",
            "train.global_batch=8",
            "train.micro_batch=4",
            "train.seed=3",
            "data.train_resolution=16",
            "data.shuffle_buffer=6",
            "data.mixup_alpha=0.2",  # DM's order: MixUp/CutMix pairs, then RandAugment
            "data.cutmix=true",
            "data.randaugment_layers=2",
            "data.randaugment_magnitude=9",
            f"data.train_url={url}",
            *overrides,
        ],
    )
    shape = describe_dataset(url)
    return config, make_plan(config, shape.num_classes, shape.train_samples, shape.val_samples)


def micro_batches(url: str, workers: int, loaders: int, start: int, steps: int) -> dict:
    """``{(step, global micro-batch): (images, MixTargets)}`` of ``steps`` steps from ``start``."""
    config, plan = run_config(
        url, f"scaling.num_workers={workers}", f"data.loader_workers={loaders}"
    )
    assert plan.accumulation_steps * workers == 2 and plan.steps_per_epoch == 6
    found = {}
    for rank in range(workers):
        source = make_batches(config, plan, rank)
        assert isinstance(source, ShardBatches)
        for step, micro in zip(range(start, start + steps), source.steps(start), strict=False):
            for slot, batch in enumerate(micro):
                found[step, slot * workers + rank] = batch
    return found


def same(a, b) -> bool:
    return torch.equal(a[0], b[0]) and all(
        torch.equal(x, y) for x, y in zip(a[1], b[1], strict=True)
    )


def test_micro_batches_of_a_step_are_the_same_for_any_workers_and_loaders(shards):
    # Steps 4-7 cross the epoch boundary (6 steps per epoch); resumed at step 5 mid-epoch.
    reference = micro_batches(shards, workers=1, loaders=1, start=4, steps=4)
    assert len(reference) == 8
    labels = [int(x) for batch in reference.values() for x in batch[1].labels]
    assert len(labels) == 32 and set(labels) <= set(range(60))
    first = reference[4, 0][1]
    assert (first.labels != first.mix_labels).any() and (first.ratio < 1).any()
    for workers, loaders, start in ((2, 1, 4), (1, 2, 4), (2, 2, 5), (1, 2, 5), (1, 0, 6)):
        other = micro_batches(shards, workers, loaders, start, steps=8 - start)
        assert other.keys() <= reference.keys() and len(other) == 2 * (8 - start)
        for key, batch in other.items():
            assert same(batch, reference[key]), (workers, loaders, start, key)


def test_more_streams_let_more_loader_processes_work_and_change_the_data(shards):
    config, plan = run_config(shards, "data.streams=4", "data.loader_workers=2")
    assert plan.train_streams == 4
    source = make_batches(config, plan, 0)
    loader = source._epoch_loader(0, 0)
    assert loader._loader.num_workers == 2  # the rank's 4 streams: 2 per process
    with_four = [batch for _, batch in zip(range(4), loader, strict=False)]
    default = micro_batches(shards, workers=1, loaders=0, start=0, steps=2)
    assert not all(same(a, b) for a, b in zip(with_four, default.values(), strict=True))


def test_a_stream_count_that_is_no_multiple_of_the_micro_batches_is_refused(shards):
    with pytest.raises(ConfigError, match="data.streams: 3 is not a multiple of"):
        run_config(shards, "data.streams=3")


def test_a_resume_may_change_the_worker_count_only(shards, tmp_path):
    config, plan = run_config(
        shards, "tracking.run_name=named", f"checkpoint.storage_url=file://{tmp_path}"
    )
    check_resume(config, plan)  # nothing written yet: a new run
    _, on_two = run_config(shards, "scaling.num_workers=2")
    assert (on_two.global_batch, on_two.accumulation_steps, on_two.num_workers) == (8, 1, 2)
    for step, saved in ((5, on_two), (10, on_two), (3, plan)):  # the newest is step 10
        folder = tmp_path / "named" / f"step_{step:09d}"
        folder.mkdir(parents=True)
        (folder / "state.json").write_text(json.dumps({"step": step, "plan": saved.as_dict()}))
    check_resume(config, plan)
    assert check_resumed_plan(on_two.as_dict(), plan) == (
        " on 1 workers x 2 micro-batches each (written on 2 x 1)"
    )
    assert check_resumed_plan(plan.as_dict(), plan) == ""
    for override, named in (
        ("train.global_batch=16", "train.global_batch=8 (this run: 16)"),
        ("train.micro_batch=2", "train.micro_batch=4 (this run: 2)"),
        ("data.streams=4", "data.streams=2 (this run: 4)"),
        ("optim.lr=0.3", "optim.lr=0.003125 (this run: 0.3)"),
        ("optim.clipping=0.02", "optim.clipping=0.16 (this run: 0.02)"),
    ):
        changed, other = run_config(
            shards, override, "tracking.run_name=named", f"checkpoint.storage_url=file://{tmp_path}"
        )
        with pytest.raises(ConfigError, match=re.escape(named)) as raised:
            check_resume(changed, other)
        assert "named/step_000000010/state.json" in str(raised.value)
        assert "only scaling.num_workers may change" in str(raised.value)
        with pytest.raises(ConfigError, match=re.escape(named)):
            check_resumed_plan(on_two.as_dict(), other)


def test_an_elastic_range_is_planned_for_its_largest_count_and_replanned_per_start(shards):
    config, plan = run_config(shards, "scaling.num_workers=[1,2]", "scaling.max_failures=-1")
    assert config.scaling.worker_range == (1, 2)
    assert (plan.num_workers, plan.accumulation_steps) == (2, 1)
    on_one = on_workers(plan, 1)  # what a worker of a start on 1 worker runs
    assert (on_one.num_workers, on_one.accumulation_steps) == (1, 2)
    assert {
        k: v for k, v in on_one.as_dict().items() if k not in ("num_workers", "accumulation_steps")
    } == {k: v for k, v in plan.as_dict().items() if k not in ("num_workers", "accumulation_steps")}
    assert on_workers(plan, 2) is plan
    with pytest.raises(ConfigError, match="scaling.num_workers: 3 workers cannot share"):
        on_workers(plan, 3)


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        (["scaling.num_workers=[1,3]", "scaling.max_failures=-1"], "× 3 = 12"),
        (["scaling.num_workers=[2,1]"], "scaling.num_workers: (2, 1) is not a worker count"),
        (["scaling.num_workers=[0,2]"], "scaling.num_workers: (0, 2) is not a worker count"),
        (["scaling.num_workers=0"], "scaling.num_workers: 0 is not a worker count"),
        (["scaling.num_workers=[1,2]"], "scaling.max_failures: 0 ends an elastic run"),
    ],
)
def test_a_bad_elastic_range_is_refused_naming_the_key(shards, overrides, named):
    with pytest.raises(ConfigError, match=re.escape(named)):
        run_config(shards, *overrides)
