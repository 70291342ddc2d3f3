"""Shard writer and CLI: layout, timm compatibility, byte-identical output, resume, kept and
resized images, corrupt ones left out, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline import shards
from pipeline.data.catalog import open_source
from pipeline.data.decode import CorruptImage, _jpeg_layout, check_image, decode_rgb
from pipeline.data.info import read_info
from pipeline.data.inspect import THUMBNAIL, inspect_shards
from pipeline.data.sources import encode_jpeg, shapes
from pipeline.data.writer import WriteConflict, write_shards
from tests.helpers.images import IndexedSource, jpeg_bytes, png_bytes

REPO = Path(__file__).resolve().parents[2]


def _files(directory: Path) -> dict[str, bytes]:
    """Every file below ``directory`` (the shard records in _parts/ too), by relative path."""
    return {
        str(p.relative_to(directory)): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def test_layout_counts_and_info(tmp_path):
    info = write_shards(
        IndexedSource(50),
        f"file://{tmp_path}",
        samples_per_shard=16,
        val_samples=10,
        seed=3,
        progress=False,
    )
    assert sorted(os.listdir(tmp_path)) == [
        "_info.json",
        "_parts",
        "_write_plan.json",
        "indexed-train-000000.tar",
        "indexed-train-000001.tar",
        "indexed-train-000002.tar",
        "indexed-validation-000000.tar",
    ]
    assert info.split("train").shard_lengths == (16, 16, 8)
    assert info.split("validation").shard_lengths == (10,)
    document = json.loads((tmp_path / "_info.json").read_text())
    assert document["splits"]["train"]["filenames"][0] == "indexed-train-000000.tar"
    assert document["splits"]["train"]["num_samples"] == 40 and document["num_classes"] == 50
    assert document["corrupt"] == []
    assert len(os.listdir(tmp_path / "_parts")) == 4  # one record per shard
    with tarfile.open(tmp_path / "indexed-validation-000000.tar") as tar:
        names = tar.getnames()
        labels = {int(tar.extractfile(n).read()) for n in names if n.endswith(".cls")}
    assert len(names) == 20 and all(n.endswith((".cls", ".jpg")) for n in names)
    train_labels = set()
    for shard in tmp_path.glob("indexed-train-*.tar"):
        with tarfile.open(shard) as tar:
            train_labels |= {
                int(tar.extractfile(n).read()) for n in tar.getnames() if n.endswith(".cls")
            }
    assert labels.isdisjoint(train_labels) and labels | train_labels == set(range(50))


def test_timm_webdataset_reader_reads_the_shards(tmp_path):
    from timm.data.readers.reader_wds import ReaderWds

    write_shards(
        IndexedSource(30), str(tmp_path), samples_per_shard=8, val_samples=12, progress=False
    )
    reader = ReaderWds(str(tmp_path), split="validation", is_training=False)
    labels = sorted(int(target) for _, target in reader)
    info = read_info(str(tmp_path))
    assert len(labels) == 12 == info.split("validation").num_samples
    assert len(set(labels)) == 12


def test_same_source_and_seed_give_byte_identical_shards(tmp_path):
    for name in ("a", "b"):
        write_shards(
            shapes(40, 24, seed=1),
            str(tmp_path / name),
            samples_per_shard=7,
            val_samples=5,
            seed=9,
            progress=False,
        )
    first, second = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert len(first) == 14 and first == second  # 5 + 1 shards and their records, 2 json files
    write_shards(
        shapes(40, 24, seed=1),
        str(tmp_path / "c"),
        samples_per_shard=7,
        val_samples=5,
        seed=10,
        progress=False,
    )
    assert _files(tmp_path / "c")["shapes-train-000000.tar"] != first["shapes-train-000000.tar"]


def test_rerun_rewrites_only_missing_shards(tmp_path):
    arguments = dict(samples_per_shard=10, val_samples=6, seed=2, progress=False)
    write_shards(IndexedSource(46), str(tmp_path), **arguments)
    reference = _files(tmp_path)
    stamps = {str(p.relative_to(tmp_path)): p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    (tmp_path / "indexed-train-000002.tar").unlink()
    (tmp_path / "_info.json").unlink()
    (tmp_path / ".indexed-train-000003.tar.tmp-1-abc").write_bytes(b"half a shard")
    time.sleep(0.01)
    write_shards(IndexedSource(46), str(tmp_path), **arguments)
    assert _files(tmp_path) == reference  # the leftover temporary is gone too
    rewritten = {
        name
        for name, stamp in stamps.items()
        if (tmp_path / name).is_file() and (tmp_path / name).stat().st_mtime_ns != stamp
    }
    assert rewritten == {
        "indexed-train-000002.tar",
        "_parts/indexed-train-000002.tar.json",
        "_info.json",
    }


def test_rerun_with_other_parameters_is_refused(tmp_path):
    write_shards(
        IndexedSource(20), str(tmp_path), samples_per_shard=10, val_samples=4, progress=False
    )
    with pytest.raises(WriteConflict, match=str(tmp_path)):
        write_shards(
            IndexedSource(20), str(tmp_path), samples_per_shard=5, val_samples=4, progress=False
        )


def _cli(*args: str, cwd: Path | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline.shards", *args],
        cwd=cwd or REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_killed_write_resumes_to_the_same_shards(tmp_path):
    args = [
        "shapes",
        "--num-samples",
        "600",
        "--resolution",
        "96",
        "--samples-per-shard",
        "20",
        "--val-samples",
        "40",
        "--seed",
        "4",
        "--quiet",
    ]
    killed = tmp_path / "killed"
    process = _cli("write", args[0], str(killed), *args[1:])
    deadline = time.monotonic() + 60
    while len(list(killed.glob("*.tar"))) < 3 and time.monotonic() < deadline:
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (killed / "_info.json").exists(), "the write finished before it could be killed"
    for shard in killed.glob("*.tar"):  # every shard under its final name is complete
        with tarfile.open(shard) as tar:
            assert len(tar.getnames()) == 40
    # The re-run and the uninterrupted reference run in-process: the same code path as the CLI.
    arguments = dict(samples_per_shard=20, val_samples=40, seed=4, progress=False)
    write_shards(shapes(600, 96, seed=4), str(killed), **arguments)
    write_shards(shapes(600, 96, seed=4), str(tmp_path / "complete"), **arguments)
    assert _files(killed) == _files(tmp_path / "complete")
    assert len(_files(killed)) == 2 * 30 + 2  # 28 + 2 shards, their records, plan and info


def test_cli_write_and_inspect(tmp_path):
    url = f"file://{tmp_path}/set"
    options = ["--num-samples", "60", "--resolution", "16", "--samples-per-shard", "25"]
    assert shards.main(["write", "digits", url, *options, "--val-samples", "10", "--quiet"]) == 0
    info = read_info(url)
    assert {name: split.num_samples for name, split in info.splits.items()} == {
        "train": 50,
        "validation": 10,
    }
    assert info.class_names[:3] == ("0", "1", "2")
    grid = tmp_path / "grid.png"
    assert (
        shards.main(["inspect", url, "--grid", str(grid), "--grid-samples", "6", "--verify"]) == 0
    )
    with Image.open(grid) as image:
        assert image.size == (6 * THUMBNAIL, THUMBNAIL)
    report = inspect_shards(url, str(tmp_path / "again.png"), grid_samples=6, verify=True)
    assert report["num_classes"] == 10
    figures = report["splits"]
    assert (figures["train"]["num_shards"], figures["train"]["samples_read"]) == (2, 50)
    assert (figures["validation"]["num_shards"], figures["validation"]["samples_read"]) == (1, 10)


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["write", "/no/such/dir/", "/tmp/x"], "'/no/such/dir/'"),
        (["write", "cifar", "/tmp/x"], "'cifar'"),
        (["inspect", "file:///no/such/shards"], "file:///no/such/shards/_info.json"),
        (
            ["write", "shapes", "/tmp/x", "--num-samples", "5", "--val-samples", "5"],
            "validation size 5",
        ),
    ],
)
def test_cli_bad_input_exits_2_naming_the_culprit(argv, named, capsys):
    assert shards.main(argv) == 2
    assert named in capsys.readouterr().err


class _MixedSource:
    """Five images: a small JPEG, a large JPEG, a PNG, a JPEG with garbage scan data, a cut one."""

    name = "mixed"
    class_names = ["a", "b"]

    def __init__(self) -> None:
        rng = np.random.default_rng(0)
        small = jpeg_bytes(1, 40)
        large = encode_jpeg(Image.fromarray(rng.integers(0, 256, (90, 120, 3), np.uint8)))
        _, scan = _jpeg_layout(small)
        # Garbage after the header: a frame marker inside the scan data, then the end marker.
        garbage = small[:scan] + bytes(50) + b"\xff\xc0\x00\x11" + bytes(50) + b"\xff\xd9"
        self.images = [
            small,
            large,
            png_bytes(Image.new("RGB", (30, 20), (200, 10, 10))),
            garbage,
            small[: len(small) // 2],
        ]

    def __len__(self) -> int:
        return len(self.images)

    def sample(self, index: int) -> tuple[bytes, int]:
        return self.images[index], index % 2

    def describe(self) -> dict:
        return {"source": "mixed"}


def _samples(shard: Path) -> dict[str, bytes]:
    with tarfile.open(shard) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar if m.name.endswith(".jpg")}


def test_jpegs_within_max_side_keep_their_bytes_larger_ones_are_resized_corrupt_ones_listed(
    tmp_path, caplog
):
    source = _MixedSource()
    with pytest.raises(CorruptImage):
        decode_rgb(source.images[3])  # passes the reader's cheap check, fails its decode
    check_image(source.images[3])
    info = write_shards(
        source, str(tmp_path), samples_per_shard=8, val_samples=0, max_side=64, progress=False
    )
    stored = _samples(tmp_path / "mixed-train-000000.tar")
    assert stored["000000000.jpg"] == source.images[0]  # 40 px JPEG: byte for byte
    assert tuple(decode_rgb(stored["000000001.jpg"]).shape) == (3, 48, 64)  # 120 px -> 64
    assert tuple(decode_rgb(stored["000000002.jpg"]).shape) == (3, 20, 30)  # PNG -> JPEG
    assert stored["000000002.jpg"][:3] == b"\xff\xd8\xff"
    assert len(stored) == 3 and info.split("train").shard_lengths == (3,)
    listed = read_info(str(tmp_path)).corrupt
    assert listed == info.corrupt and sorted(entry["source"] for entry in listed) == ["3", "4"]
    assert all(entry["split"] == "train" and entry["reason"] for entry in listed)
    assert "2 corrupt image(s) left out" in caplog.text


def test_a_shard_that_does_not_match_its_record_is_written_again(tmp_path):
    arguments = dict(samples_per_shard=10, val_samples=6, seed=2, progress=False)
    write_shards(IndexedSource(36), str(tmp_path), **arguments)
    reference = _files(tmp_path)
    (tmp_path / "indexed-train-000001.tar").write_bytes(b"not the shard")  # present, wrong size
    (tmp_path / "_parts" / "indexed-train-000002.tar.json").unlink()  # present, no record
    write_shards(IndexedSource(36), str(tmp_path), **arguments)
    assert _files(tmp_path) == reference


def test_a_destination_holding_another_shard_set_is_refused_before_any_write(tmp_path):
    write_shards(IndexedSource(12), str(tmp_path / "other"), val_samples=2, progress=False)
    (tmp_path / "other" / "_write_plan.json").unlink()  # a set this command did not write
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "000000.tar").write_bytes(b"")
    for dest in (tmp_path / "other", foreign):
        before = _files(dest)
        assert shards.main(["write", "shapes", str(dest), "--num-samples", "20", "--quiet"]) == 2
        assert _files(dest) == before


def test_an_image_tree_gets_its_validation_split_carved_from_its_images(tmp_path):
    for index in range(12):
        path = tmp_path / "tree" / f"class_{index % 3}" / f"{index:03d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(jpeg_bytes(index, 16))
    source = open_source(str(tmp_path / "tree"))
    info = write_shards(source, str(tmp_path / "set"), samples_per_shard=5, val_samples=4)
    assert info.class_names == ("class_0", "class_1", "class_2")
    assert info.split("train").shard_lengths == (5, 3) and info.split("validation").num_samples == 4
    stored = [
        data
        for split in info.splits.values()
        for url in split.shard_urls
        for data in _samples(Path(url)).values()
    ]
    assert sorted(stored) == sorted(jpeg_bytes(index, 16) for index in range(12))
