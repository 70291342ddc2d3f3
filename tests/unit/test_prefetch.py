"""The device data path: the prefetcher (a pass-through on the CPU, a side stream on a GPU),
the non-blocking copies, and the generator a micro-batch's forward draws from."""

from __future__ import annotations

import threading

import pytest
import torch

from pipeline.data.mixing import MixTargets
from pipeline.train.prefetch import DevicePrefetcher, device_generator, prefetcher, to_device

CPU = torch.device("cpu")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def micro_batches(steps: int) -> list[list[tuple[torch.Tensor, MixTargets]]]:
    """``steps`` steps of two micro-batches each, every tensor filled with its own position."""
    made = []
    for step in range(steps):
        made.append(
            [
                (
                    torch.full((2, 3, 4, 4), float(10 * step + slot)),
                    MixTargets(
                        torch.tensor([step, slot]), torch.tensor([slot, step]), torch.ones(2)
                    ),
                )
                for slot in range(2)
            ]
        )
    return made


def test_on_the_cpu_the_prefetcher_passes_the_same_objects_through_in_order():
    items = micro_batches(3)
    threads = threading.active_count()
    fed = DevicePrefetcher(iter(items), CPU)
    assert list(fed) == items
    for got, sent in zip(DevicePrefetcher(iter(items), CPU), items, strict=True):
        assert got is sent  # no copy, no re-wrapping
    assert threading.active_count() == threads  # no loader thread of its own


def test_on_the_cpu_the_source_is_read_only_when_an_item_is_asked_for():
    taken = []

    def source():
        for index in range(3):
            taken.append(index)
            yield index

    fed = DevicePrefetcher(source(), CPU)
    assert taken == []
    assert next(fed) == 0 and taken == [0]  # nothing read ahead: the CPU step gains nothing


def test_the_limit_stops_before_the_source_is_read_again():
    items = iter(range(10))
    assert list(DevicePrefetcher(items, CPU, limit=3)) == [0, 1, 2]
    assert next(items) == 3  # a run's last step leaves the next epoch's loader unopened


def test_to_device_keeps_structure_and_leaves_tensors_already_there_alone():
    ((images, mix), _) = micro_batches(1)[0]
    moved_images, moved_mix = to_device((images, mix), CPU)
    assert moved_images is images and isinstance(moved_mix, MixTargets)
    assert all(a is b for a, b in zip(moved_mix, mix, strict=True))


def test_the_trainer_keeps_one_prefetcher_per_source():
    first, second = iter(micro_batches(2)), iter(micro_batches(2))
    fed = prefetcher(first, CPU, None)
    assert prefetcher(first, CPU, fed) is fed
    other = prefetcher(second, CPU, fed)
    assert other is not fed and other.source is second


def test_the_device_generator_draws_what_a_global_seed_draws():
    dropout = torch.nn.Dropout(0.5)
    torch.manual_seed(1234)
    expected = dropout(torch.ones(64))
    torch.manual_seed(99)  # something else in between
    device_generator(CPU).manual_seed(1234)
    assert torch.equal(dropout(torch.ones(64)), expected)
    assert device_generator(CPU) is torch.default_generator


@needs_cuda
def test_on_a_gpu_every_step_arrives_on_the_device_in_order_with_its_values():
    device = torch.device("cuda", torch.cuda.current_device())
    items, source = micro_batches(4), iter(micro_batches(4))
    fed = list(DevicePrefetcher(source, device, limit=3))
    assert len(fed) == 3 and next(source)[0][0][0, 0, 0, 0] == 30.0  # the 4th is left unread
    for got, sent in zip(fed, items[:3], strict=True):
        for (images, mix), (sent_images, sent_mix) in zip(got, sent, strict=True):
            assert images.device == device and all(t.device == device for t in mix)
            assert torch.equal(images.cpu(), sent_images)
            assert all(torch.equal(a.cpu(), b) for a, b in zip(mix, sent_mix, strict=True))


@needs_cuda
def test_on_a_gpu_an_error_fetching_ahead_comes_after_the_items_before_it():
    device = torch.device("cuda", torch.cuda.current_device())

    def source():
        yield torch.ones(3)
        raise OSError("shard gone")

    fed = DevicePrefetcher(source(), device)
    assert torch.equal(next(fed).cpu(), torch.ones(3))
    with pytest.raises(OSError, match="shard gone"):
        next(fed)
