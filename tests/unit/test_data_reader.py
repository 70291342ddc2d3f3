"""Streaming loaders on file:// shards: exact-once eval, equal train batches, seeding, resume."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.data.reader import make_eval_loader, make_train_loader
from pipeline.data.storage import StorageError
from pipeline.data.writer import write_shards
from tests.helpers.images import (
    IndexedSource,
    jpeg_bytes,
    png_bytes,
    tar_bytes,
    without_segment,
    write_info,
)

TRAIN = dict(
    batch_size=4, resolution=24, randaugment_layers=2, randaugment_magnitude=5, shuffle_buffer=16
)
MIXING = dict(mixup_alpha=0.2, cutmix=True)  # DM's order: MixUp and CutMix, then RandAugment


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[str, set[int], set[int]]:
    """90 samples labelled by index: train 70 in 9 shards, validation 20 in 3 shards."""
    url = f"file://{tmp_path_factory.mktemp('indexed')}"
    info = write_shards(
        IndexedSource(90), url, samples_per_shard=8, val_samples=20, seed=0, progress=False
    )
    labels = {}
    for name, split in info.splits.items():
        labels[name] = set()
        for shard in split.shard_urls:
            with tarfile.open(shard[len("file://") :]) as tar:
                labels[name] |= {
                    int(tar.extractfile(m).read()) for m in tar if m.name.endswith("cls")
                }
    return url, labels["train"], labels["validation"]


def _train(url: str, **overrides) -> list[tuple[torch.Tensor, torch.Tensor]]:
    arguments = dict(
        TRAIN, batches_per_epoch=6, rank=0, world_size=1, epoch=0, seed=7, num_workers=0
    )
    arguments.update(overrides)
    return list(make_train_loader(url, **arguments))


def _same(first, second) -> bool:
    """Equal lists of (images, MixTargets) batches."""
    return len(first) == len(second) and all(
        torch.equal(a[0], b[0]) and all(torch.equal(x, y) for x, y in zip(a[1], b[1], strict=True))
        for a, b in zip(first, second, strict=True)
    )


def test_validation_yields_every_sample_once_across_2_ranks_x_2_workers(dataset):
    url, _, validation = dataset
    per_rank = []
    for rank in range(2):
        loader = make_eval_loader(
            url, batch_size=3, rank=rank, world_size=2, num_workers=2, resolution=24
        )
        labels = [int(x) for images, batch in loader for x in batch]
        assert all(images.shape[1:] == (3, 24, 24) for images, _ in loader)
        per_rank.append(labels)
    assert [len(labels) for labels in per_rank] == [10, 10]
    everything = per_rank[0] + per_rank[1]
    assert sorted(everything) == sorted(validation) and len(set(everything)) == 20


def test_training_gives_every_rank_the_same_number_of_batches(dataset):
    url, train, _ = dataset
    for world_size, workers in ((2, 2), (3, 2)):
        for rank in range(world_size):
            batches = _train(
                url, rank=rank, world_size=world_size, num_workers=workers, batches_per_epoch=7
            )
            assert len(batches) == 7
            assert all(images.shape == (4, 3, 24, 24) for images, _ in batches)
            assert {int(x) for _, mix in batches for x in mix.labels} <= train
    loader = make_train_loader(
        url,
        **TRAIN,
        batches_per_epoch=5,
        rank=0,
        world_size=1,
        epoch=0,
        seed=1,
        num_workers=0,
        start_batch=2,
    )
    assert len(loader) == 3


def test_same_seed_same_batches_other_epoch_or_seed_or_rank_differs(dataset):
    url, _, _ = dataset
    reference = _train(url, num_workers=2)
    assert _same(reference, _train(url, num_workers=2))
    labels = [b[1].labels.tolist() for b in reference]
    assert labels != [b[1].labels.tolist() for b in _train(url, num_workers=2, epoch=1)]
    assert labels != [b[1].labels.tolist() for b in _train(url, num_workers=2, seed=8)]
    other_rank = _train(url, num_workers=2, rank=1, world_size=2)
    assert labels != [b[1].labels.tolist() for b in other_rank]


@pytest.mark.filterwarnings("ignore:This DataLoader will create 3 worker processes")
@pytest.mark.parametrize(("workers", "mixing"), [(0, {}), (2, {}), (3, {}), (2, MIXING)])
def test_start_batch_yields_exactly_the_uninterrupted_batches(dataset, workers, mixing):
    url, _, _ = dataset
    uninterrupted = _train(url, num_workers=workers, batches_per_epoch=8, **mixing)
    for start in (1, 5):
        resumed = _train(url, num_workers=workers, batches_per_epoch=8, start_batch=start, **mixing)
        assert _same(resumed, uninterrupted[start:])


def test_each_epoch_covers_the_data_like_a_permutation(dataset):
    url, train, _ = dataset
    # 70 samples, 2 ranks x 1 worker, 35 samples each: disjoint shards within a pass.
    seen = []
    for rank in range(2):
        batches = _train(
            url, rank=rank, world_size=2, batch_size=5, batches_per_epoch=6, shuffle_buffer=0
        )
        seen += [int(x) for _, mix in batches for x in mix.labels]
    assert len(seen) == 60 and len(set(seen)) == 60 and set(seen) <= train


def test_dms_mixing_order_reads_two_images_per_output_in_disjoint_pairs(dataset):
    url, train, _ = dataset
    # 70 samples, 1 rank: 8 batches of 4 outputs read 64 distinct samples (shuffle_buffer 0 and
    # a single pass), each of them the own or the partner image of exactly one output.
    batches = _train(url, **MIXING, batch_size=4, batches_per_epoch=8, shuffle_buffer=0)
    own = [int(x) for _, mix in batches for x in mix.labels]
    partners = [int(x) for _, mix in batches for x in mix.mix_labels]
    assert len(set(own + partners)) == 64 and set(own + partners) <= train
    for _, mix in batches:  # MixUp on outputs 0-1, CutMix on 2-3: a share in [0, 1]
        assert mix.ratio.dtype == torch.float32 and bool(
            ((0 <= mix.ratio) & (mix.ratio <= 1)).all()
        )
    before = _train(url, **MIXING, augment_before_mix=True, batches_per_epoch=8, shuffle_buffer=0)
    own = [int(x) for _, mix in before for x in mix.labels]
    assert len(set(own)) == 32  # one image per output, each also its neighbour's partner
    assert sorted(int(x) for _, mix in before for x in mix.mix_labels) == sorted(own)


def _handmade(directory) -> str:
    """Validation (and train) shards with known defects; labels of good samples are unique."""
    good = lambda key, label: {"__key__": key, "jpg": jpeg_bytes(label), "cls": str(label).encode()}  # noqa: E731
    first = [good(f"a{i}", i) for i in range(8)]
    first[1]["jpg"] = b"garbage, not a JPEG"
    first[3]["jpg"] = first[3]["jpg"][:300]  # truncated image
    del first[5]["cls"]
    first[6]["cls"] = b"abc"
    second = [good(f"b{i}", 10 + i) for i in range(6)]
    second[0] = {"__key__": "b0", "cls": b"10"}  # no image
    second[2]["cls"] = b"999"  # not a class
    second[4]["jpg"] = without_segment(second[4]["jpg"], 0xDB)  # passes the check only
    third = tar_bytes([good(f"c{i}", 20 + i) for i in range(6)])
    with tarfile.open(fileobj=io.BytesIO(third)) as tar:
        cut = tar.getmember("c4.jpg")
    (directory / "a.tar").write_bytes(tar_bytes(first))
    (directory / "b.tar").write_bytes(tar_bytes(second))
    (directory / "c.tar").write_bytes(third[: cut.offset_data + cut.size // 2])
    shards = [("a.tar", 8), ("b.tar", 6), ("c.tar", 6)]
    write_info(directory, {"train": shards, "validation": shards}, num_classes=50)
    return f"file://{directory}"


GOOD_LABELS = [0, 2, 4, 7, 11, 13, 14, 15, 20, 21, 22, 23]
EXPECTED_SKIPS = {
    "corrupt_image": 2,
    "missing_image": 1,
    "missing_label": 3,
    "truncated_shard": 1,
    "blank_substitute": 1,
}


@pytest.mark.parametrize("workers", [0, 2])
def test_bad_samples_are_skipped_and_counted_exactly(tmp_path, workers):
    url = _handmade(tmp_path)
    loader = make_eval_loader(
        url, batch_size=5, rank=0, world_size=1, num_workers=workers, resolution=16
    )
    images = {int(y): x for batch, labels in loader for x, y in zip(batch, labels, strict=True)}
    assert sorted(images) == GOOD_LABELS
    assert images[14].abs().max().item() < 0.01  # the undecodable one: a blank, mean-grey image
    assert loader.counter.by_reason() == EXPECTED_SKIPS
    assert loader.skipped() == 7


def test_resume_skips_the_same_bad_samples(tmp_path):
    url = _handmade(tmp_path)
    arguments = dict(
        TRAIN,
        batch_size=3,
        batches_per_epoch=9,
        rank=0,
        world_size=1,
        epoch=2,
        seed=3,
        num_workers=2,
        shuffle_buffer=4,
    )
    uninterrupted = list(make_train_loader(url, **arguments))
    for start in (2, 7):
        resumed = list(make_train_loader(url, **arguments, start_batch=start))
        assert _same(resumed, uninterrupted[start:])


def test_missing_dataset_names_the_url(tmp_path):
    url = f"file://{tmp_path}/nothing-here"
    with pytest.raises(StorageError, match=f"{url}/_info.json: does not exist"):
        make_eval_loader(url, batch_size=2, rank=0, world_size=1, num_workers=0, resolution=16)


def test_missing_shard_names_the_shard(tmp_path):
    url = _handmade(tmp_path)
    (tmp_path / "b.tar").unlink()
    loader = make_eval_loader(url, batch_size=2, rank=0, world_size=1, num_workers=0, resolution=16)
    with pytest.raises(StorageError, match="b.tar: does not exist"):
        list(loader)


def test_pipe_urls_need_allow_pipe(dataset):
    url, _, validation = dataset
    template = f"pipe:cat {url[len('file://') :]}/{{path}}"
    with pytest.raises(StorageError, match="allow_pipe"):
        make_eval_loader(template, batch_size=4, rank=0, world_size=1, num_workers=0, resolution=16)
    loader = make_eval_loader(
        template, batch_size=4, rank=0, world_size=1, num_workers=0, resolution=16, allow_pipe=True
    )
    assert sorted(int(x) for _, batch in loader for x in batch) == sorted(validation)


def test_in_process_loading_leaves_the_callers_random_stream_alone(dataset):
    url, _, _ = dataset
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    batches = _train(url, num_workers=0, batches_per_epoch=2)
    assert len(batches) == 2
    assert torch.equal(torch.rand(4), expected)


def test_a_split_without_any_usable_sample_is_an_error_not_a_hang(tmp_path):
    bad = [{"__key__": f"k{i}", "jpg": b"not a jpeg", "cls": b"1"} for i in range(4)]
    (tmp_path / "bad.tar").write_bytes(tar_bytes(bad))
    (tmp_path / "empty.tar").write_bytes(tar_bytes([]))
    write_info(tmp_path, {"train": [("bad.tar", 4)]}, num_classes=2)
    with pytest.raises(RuntimeError, match="no usable sample in the last 108 read"):
        _train(f"file://{tmp_path}", shuffle_buffer=0)
    write_info(tmp_path, {"train": [("empty.tar", 0)]}, num_classes=2)
    with pytest.raises(RuntimeError, match="empty.tar: no shard of the split holds a sample"):
        _train(f"file://{tmp_path}")


def test_every_stored_mode_reaches_the_batch_as_rgb(tmp_path):
    palette = Image.new("P", (20, 20), 1)
    palette.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    images = {
        0: Image.new("L", (20, 20), 77),
        1: Image.new("RGBA", (20, 20), (200, 100, 50, 255)),
        2: palette,
        3: Image.fromarray(np.full((20, 20), 257 * 180, dtype=np.uint16)),
    }
    samples = [
        {"__key__": f"m{label}", "png": png_bytes(image), "cls": str(label).encode()}
        for label, image in images.items()
    ]
    (tmp_path / "modes.tar").write_bytes(tar_bytes(samples))
    write_info(tmp_path, {"validation": [("modes.tar", 4)]}, num_classes=4)
    loader = make_eval_loader(
        f"file://{tmp_path}", batch_size=4, rank=0, world_size=1, num_workers=0, resolution=8
    )
    ((batch, labels),) = list(loader)
    mean = torch.tensor([0.485, 0.456, 0.406], dtype=torch.float64)
    std = torch.tensor([0.229, 0.224, 0.225], dtype=torch.float64)
    expected = {0: (77, 77, 77), 1: (200, 100, 50), 2: (10, 20, 30), 3: (180, 180, 180)}
    for image, label in zip(batch, labels.tolist(), strict=True):
        rgb = torch.tensor(expected[label], dtype=torch.float64)
        reference = ((rgb / 255 - mean) / std).view(3, 1, 1).expand(3, 8, 8)
        assert (image.double() - reference).abs().max().item() < 1e-5


def test_prefetching_shards_changes_no_batch(dataset):
    url = dataset[0]
    plain = _train(url, prefetch_shards=0, **MIXING)
    assert _same(plain, _train(url, prefetch_shards=2, **MIXING))
    workers = _train(url, num_workers=2, **MIXING)
    assert _same(workers, _train(url, prefetch_shards=1, num_workers=2, **MIXING))


def test_a_class_given_only_in_the_json_member_is_read(tmp_path):
    """img2dataset's layout: the class in ``json`` (an integer ``label``), no ``cls`` member."""
    samples = [
        {"__key__": f"s{i}", "jpg": jpeg_bytes(i), "json": f'{{"label": {i}}}'.encode()}
        for i in range(6)
    ]
    (tmp_path / "a.tar").write_bytes(tar_bytes(samples))
    write_info(tmp_path, {"train": [("a.tar", 6)], "validation": [("a.tar", 6)]}, num_classes=6)
    loader = make_eval_loader(
        f"file://{tmp_path}", batch_size=4, rank=0, world_size=1, num_workers=0, resolution=16
    )
    assert sorted(int(y) for _, labels in loader for y in labels) == list(range(6))
    assert loader.skipped() == 0
