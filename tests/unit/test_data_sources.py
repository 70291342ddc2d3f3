"""Sources: procedural shapes, sklearn digits, image trees (ImageNet's layout too), Hugging Face
parquet files, tar shards written by others; which source a name means."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

from pipeline.data.catalog import open_source
from pipeline.data.decode import decode_rgb
from pipeline.data.imagefolder import FolderSource, imagefolder
from pipeline.data.parquet import ParquetSource
from pipeline.data.sources import SourceError, as_split_source, digits, shapes
from pipeline.data.tarsource import TarSource
from tests.helpers.images import jpeg_bytes, png_bytes


def test_shapes_are_deterministic_per_seed_and_balanced():
    first, again, other = shapes(30, 40, seed=5), shapes(30, 40, seed=5), shapes(30, 40, seed=6)
    assert [first.sample(i) for i in range(30)] == [again.sample(i) for i in range(30)]
    assert sum(first.sample(i)[0] != other.sample(i)[0] for i in range(30)) == 30
    assert [first.sample(i)[1] for i in range(12)] == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]
    assert tuple(decode_rgb(first.sample(3)[0]).shape) == (3, 40, 40)


def test_shapes_beyond_ten_classes_add_textures():
    source = shapes(50, 16, seed=0, num_classes=25)
    assert source.class_names[:2] == ["circle", "square"]
    assert (
        source.class_names[10] == "circle-stripes" and source.class_names[23] == "diamond-checker"
    )
    with pytest.raises(SourceError, match="num_classes"):
        shapes(10, 16, seed=0, num_classes=41)


def test_digits_are_the_bundled_sklearn_scans_upscaled():
    source = digits(resolution=24)
    assert len(source) == 1797
    assert [source.sample(i)[1] for i in range(5)] == [0, 1, 2, 3, 4]
    image = decode_rgb(source.sample(0)[0])
    assert tuple(image.shape) == (3, 24, 24)
    assert int(image[:, 0, 0].min()) >= 240  # paper-white corner, dark ink in the middle
    assert int(image[:, 10, 7].max()) < 100  # scan row 3, column 2 holds ink level 12 of 16


def test_imagefolder_sorts_classes_and_keeps_the_stored_bytes(tmp_path):
    (tmp_path / "b_cats").mkdir()
    (tmp_path / "a_dogs" / "nested").mkdir(parents=True)
    jpeg, png = jpeg_bytes(1, 16), png_bytes(Image.new("RGBA", (10, 6), (9, 8, 7, 255)))
    (tmp_path / "b_cats" / "x.jpg").write_bytes(jpeg)
    (tmp_path / "b_cats" / "._x.jpg").write_bytes(b"macOS metadata")  # hidden: left out
    (tmp_path / "a_dogs" / "nested" / "y.PNG").write_bytes(png)
    (tmp_path / "a_dogs" / "notes.txt").write_text("not an image")
    source = imagefolder(f"file://{tmp_path}")
    assert source.class_names == ["a_dogs", "b_cats"] and len(source) == 2
    assert source.sample(0) == (png, 0)  # the writer re-encodes, the source reads
    assert source.sample(1) == (jpeg, 1)
    assert list(source.part("train", [1, 0])) == [
        (1, "b_cats/x.jpg", jpeg, 1),
        (0, "a_dogs/nested/y.PNG", png, 0),
    ]


def _imagenet(root, val: str) -> dict[str, bytes]:
    """train/<synset>/ with 2 images each (synsets listed unsorted), val/ flat or by class."""
    images = {}
    for n, synset in enumerate(["n02", "n01", "n03"]):
        for k in range(2):
            path = root / "train" / synset / f"{synset}_{k}.JPEG"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(images.setdefault(str(path), jpeg_bytes(10 * n + k, 16)))
        folder = root / "val" / (synset if val == "classes" else "")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"ILSVRC2012_val_{n:08d}.JPEG").write_bytes(jpeg_bytes(100 + n, 16))
    return images


@pytest.mark.parametrize(
    "labels",
    [
        "ILSVRC2012_val_00000000.JPEG n02\nILSVRC2012_val_00000001.JPEG n01\n"
        "ILSVRC2012_val_00000002.JPEG n03\n",
        "ImageId,PredictionString\nILSVRC2012_val_00000001,n01 1 2 3 4\n"
        "ILSVRC2012_val_00000000,n02 1 2 3 4\nILSVRC2012_val_00000002,n03 5 6 7 8\n",
        "n02\nn01\nn03\n",  # one synset per line, files in sorted order
        "ILSVRC2012_val_00000000.JPEG 1\nILSVRC2012_val_00000001.JPEG 0\n"
        "ILSVRC2012_val_00000002.JPEG 2\n",  # Caffe's val.txt: sorted-synset indices
    ],
)
def test_imagenet_layout_sorted_synsets_and_a_flat_validation_with_its_labels(tmp_path, labels):
    _imagenet(tmp_path, "flat")
    (tmp_path / "val_labels.txt").write_text(labels)
    source = open_source(str(tmp_path), val_labels=str(tmp_path / "val_labels.txt"))
    assert isinstance(source, FolderSource) and source.layout == "imagenet"
    assert source.class_names == ["n01", "n02", "n03"]
    assert source.split_sizes() == {"train": 6, "validation": 3}
    assert source.files["train"][0] == ("train/n01/n01_0.JPEG", 0)
    assert [label for _, label in source.files["validation"]] == [1, 0, 2]


def test_imagenet_validation_in_class_folders_and_labels_that_do_not_fit(tmp_path):
    _imagenet(tmp_path, "classes")
    source = imagefolder(str(tmp_path))
    assert [label for _, label in source.files["validation"]] == [0, 1, 2]
    flat = tmp_path / "flat"
    _imagenet(flat, "flat")
    with pytest.raises(SourceError, match="--val-labels"):
        imagefolder(str(flat))
    cases = {
        "x.JPEG n01\n": "no label for val/ILSVRC2012_val_00000000.JPEG",
        "n01\nn02\n": "2 labels for 3 validation images",
        "n01\nn09\nn02\n": "line 2: 'n09' is not a class",
        "1\n2\n3\n": "bare numbers per line are ambiguous",
    }
    for text, message in cases.items():
        (tmp_path / "labels.txt").write_text(text)
        with pytest.raises(SourceError, match=message) as caught:
            imagefolder(str(flat), val_labels=str(tmp_path / "labels.txt"))
        assert str(tmp_path / "labels.txt") in str(caught.value)


def _hub_parquet(path, labels: list[int], names: list[str] | None, group: int = 2) -> None:
    """A parquet file as ``datasets`` writes one: image struct (bytes, path), label, features."""
    images = [
        {"bytes": jpeg_bytes(abs(label) * 7 + i, 12), "path": f"{i}.jpg"}
        for i, label in enumerate(labels)
    ]
    table = pa.table({"image": images, "label": pa.array(labels, pa.int64())})
    if names is not None:
        features = {"image": {"_type": "Image"}, "label": {"names": names, "_type": "ClassLabel"}}
        table = table.replace_schema_metadata(
            {"huggingface": json.dumps({"info": {"features": features}})}
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=group)


def test_hub_parquet_files_by_split_with_their_class_names(tmp_path):
    names = ["tench", "goldfish", "shark"]
    _hub_parquet(tmp_path / "data" / "train-00000-of-00002.parquet", [0, 1, 2, 0, 1], names)
    _hub_parquet(tmp_path / "data" / "train-00001-of-00002.parquet", [2, 2, 1], names)
    _hub_parquet(tmp_path / "data" / "validation-00000-of-00001.parquet", [1, 0], names)
    _hub_parquet(tmp_path / "data" / "test-00000-of-00001.parquet", [-1, -1], names)
    source = open_source(f"file://{tmp_path}")
    assert isinstance(source, ParquetSource) and source.class_names == names
    assert source.split_sizes() == {"train": 8, "validation": 2}
    order = source.order("train", np.random.default_rng(0))
    groups, taken, rest = [(0, 1), (2, 3), (4,), (5, 6), (7,)], [], order.tolist()
    while rest:  # the order is made of whole row groups, rows in file order inside each
        taken.append(next(g for g in groups if tuple(rest[: len(g)]) == g))
        rest = rest[len(taken[-1]) :]
    assert sorted(taken) == groups and taken != groups
    rows = list(source.part("train", [6, 1, 2]))
    assert [(index, label) for index, _, _, label in rows] == [(6, 2), (1, 1), (2, 2)]
    assert rows[1][2] == jpeg_bytes(1 * 7 + 1, 12) and rows[0][1].startswith("train-00001")


def test_parquet_without_hub_metadata_counts_classes_from_the_labels(tmp_path):
    _hub_parquet(tmp_path / "train.parquet", [0, 4, 1], None)
    source = open_source(str(tmp_path / "train.parquet"))
    assert source.class_names == ["0", "1", "2", "3", "4"] and source.split_sizes() == {"train": 3}
    (tmp_path / "bad").mkdir()
    pq.write_table(pa.table({"pixels": [b"x"]}), tmp_path / "bad" / "train-0.parquet")
    with pytest.raises(SourceError, match="train-0.parquet: needs the columns"):
        open_source(str(tmp_path / "bad"))


def test_tar_shards_by_others_with_labels_in_cls_or_json(tmp_path):
    with wds.ShardWriter(str(tmp_path / "%05d.tar"), maxcount=3) as sink:
        for i in range(7):
            sample = {"__key__": f"{i:09d}", "jpg": jpeg_bytes(i, 12), "txt": "a caption"}
            if i % 2:
                sample["cls"] = str(i % 3).encode()
            else:
                sample["json"] = json.dumps({"key": f"{i:09d}", "label": i % 3}).encode()
            sink.write(sample)
    source = open_source(str(tmp_path / "{00000..00002}.tar"))
    assert isinstance(source, TarSource) and source.class_names == ["0", "1", "2"]
    assert source.split_sizes() == {"train": 7}
    assert source.order("train", np.random.default_rng(0)).tolist() == list(range(7))
    rows = list(source.part("train", [2, 3, 4]))  # runs across the first two shards
    assert [(i, o, label) for i, o, _, label in rows] == [
        (2, "00000.tar#000000002", 2),
        (3, "00001.tar#000000003", 0),
        (4, "00001.tar#000000004", 1),
    ]


def test_a_random_access_source_is_one_split_in_a_seeded_order():
    splits = as_split_source(shapes(6, 16, seed=0))
    assert splits.split_sizes() == {"train": 6} and splits.name == "shapes"
    order = splits.order("train", np.random.default_rng(1))
    assert sorted(order.tolist()) == list(range(6))
    assert [s[0] for s in splits.part("train", order[:2])] == order[:2].tolist()


def test_bad_sources_name_the_path(tmp_path):
    with pytest.raises(SourceError, match="does-not-exist"):
        open_source(str(tmp_path / "does-not-exist"))
    with pytest.raises(SourceError, match="holds no files"):
        open_source(str(tmp_path))
    (tmp_path / "loose.jpg").write_bytes(jpeg_bytes(0))
    with pytest.raises(SourceError, match="no class sub-folders"):
        open_source(str(tmp_path))
    with pytest.raises(SourceError, match="'mnist'"):
        open_source("mnist")
