"""Shards written by others: ``index`` counts them and writes the ``_info.json`` readers need;
a brace pattern names a shard set; bad patterns and shards are refused naming the URL."""

from __future__ import annotations

import json

import pytest
import webdataset as wds

from pipeline import shards
from pipeline.data.index import count_shard, index_shards
from pipeline.data.info import expand_pattern, read_info
from pipeline.data.reader import make_eval_loader
from pipeline.data.storage import StorageError
from pipeline.train.batches import describe_dataset
from tests.helpers.images import jpeg_bytes


def _img2dataset(folder, count: int, per_shard: int, label: str = "cls", start: int = 0) -> str:
    """Shards in img2dataset's layout (``00000.tar``, keys ``000000000``, jpg + json + txt),
    written by webdataset's ShardWriter; the class in a ``cls`` member or in the json."""
    folder.mkdir(parents=True, exist_ok=True)
    with wds.ShardWriter(
        str(folder / "%05d.tar"), maxcount=per_shard, start_shard=start, verbose=0
    ) as sink:
        for i in range(count):
            meta = {"key": f"{i:09d}", "caption": "a photo", "status": "success"}
            sample = {"__key__": f"{i:09d}", "jpg": jpeg_bytes(i, 16), "txt": "a photo"}
            if label == "cls":
                sample["cls"] = str(i % 4).encode()
            elif label == "json":
                meta["label"] = i % 4
            sample["json"] = json.dumps(meta).encode()
            sink.write(sample)
    return str(folder / f"{{{start:05d}..{start + (count - 1) // per_shard:05d}}}.tar")


def test_index_writes_the_info_next_to_the_shards_and_loaders_read_them(tmp_path):
    train = _img2dataset(tmp_path, 10, 4)
    validation = _img2dataset(tmp_path, 6, 4, start=10)
    assert shards.main(["--quiet", "index", train, "--validation", validation]) == 0
    info = read_info(str(tmp_path))
    assert info.split("train").shard_lengths == (4, 4, 2) and info.num_classes == 4
    assert info.split("validation").shard_urls[0] == str(tmp_path / "00010.tar")
    assert info.name == tmp_path.name and info.writer["indexed"]["train"] == train
    loader = make_eval_loader(
        str(tmp_path), batch_size=4, rank=0, world_size=1, num_workers=0, resolution=16
    )
    assert sum(len(labels) for _, labels in loader) == 6 and loader.skipped() == 0
    assert index_shards(train, validation) == info  # the same index again: accepted


def test_an_index_of_a_read_only_folder_goes_elsewhere_with_a_base_url(tmp_path):
    train = _img2dataset(tmp_path / "theirs", 5, 2, label="json")
    index_shards(train, info_url=f"file://{tmp_path}/mine", name="laion")
    document = json.loads((tmp_path / "mine" / "_info.json").read_text())
    assert document["splits"]["train"]["base_url"] == str(tmp_path / "theirs")
    info = read_info(f"file://{tmp_path}/mine")
    assert info.split("train").shard_urls == tuple(expand_pattern(train))
    assert info.split("train").num_samples == 5 and info.name == "laion"
    assert not (tmp_path / "theirs" / "_info.json").exists()


def test_counts_take_the_class_from_cls_or_json_and_count_the_rest_apart(tmp_path):
    _img2dataset(tmp_path / "json", 3, 3, label="json")
    counted = count_shard(str(tmp_path / "json" / "00000.tar"))
    assert (counted.samples, counted.unusable, counted.max_label) == (3, 0, 2)
    _img2dataset(tmp_path / "none", 3, 3, label="none")
    counted = count_shard(str(tmp_path / "none" / "00000.tar"))
    assert (counted.samples, counted.unusable) == (0, 3)


def test_bad_patterns_and_shards_exit_2_naming_the_url(tmp_path, capsys):
    good = _img2dataset(tmp_path / "good", 4, 2)
    unlabelled = _img2dataset(tmp_path / "unlabelled", 4, 2, label="none")
    cases = {
        str(tmp_path / "good" / "{00005..00009}.tar"): "the pattern matches no shard",
        str(tmp_path / "good" / "{00000..00002}.tar"): f"{tmp_path}/good/00002.tar: does not",
        unlabelled: f"{tmp_path}/unlabelled/00000.tar: no sample has a class",
    }
    for pattern, message in cases.items():
        assert shards.main(["index", pattern]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "unlabelled" / "_info.json").exists()
    index_shards(good)
    other = _img2dataset(tmp_path / "good", 2, 2, start=7)
    assert shards.main(["index", other]) == 2
    assert "_info.json already describes another shard set" in capsys.readouterr().err


def test_a_pattern_names_the_indexed_set_or_needs_the_epoch_size_and_classes(tmp_path):
    pattern = _img2dataset(tmp_path, 6, 3)
    with pytest.raises(StorageError, match="data.train_samples, model.num_classes") as caught:
        describe_dataset(pattern)
    assert caught.value.url == pattern
    shape = describe_dataset(pattern, train_samples=1000, num_classes=4)
    assert (shape.num_classes, shape.train_samples, shape.val_samples) == (4, 1000, 0)
    assert read_info(pattern, num_samples=7, num_classes=4).split("train").shard_lengths == (3, 4)
    index_shards(pattern)
    shape = describe_dataset(pattern)
    assert (shape.num_classes, shape.train_samples) == (4, 6)
