"""The datasets users have, on moto's S3 over HTTP: an ImageNet tree, Hugging Face parquet files
and img2dataset shards become shard sets a run trains on; a parallel write interrupted and run
again gives the bytes of one that was not; bad input exits 2 naming the URL."""

from __future__ import annotations

import io
import json
import signal
import subprocess
import sys
import tarfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import s3fs
import webdataset as wds
from PIL import Image

from pipeline import shards
from pipeline.data.catalog import open_source
from pipeline.data.decode import _jpeg_layout, decode_rgb
from pipeline.data.info import read_info
from pipeline.data.sources import encode_jpeg, shapes
from pipeline.data.storage import find_files, read_bytes
from pipeline.data.writer import write_shards
from tests.helpers.runs import ROOT, checked, only_run, run_pretrain, small_run_config

pytestmark = pytest.mark.integration
SYNSETS = ("n01440764", "n01443537", "n01484850")  # listed unsorted below on purpose
SIZES = ((20, 30), (64, 40), (90, 70), (33, 33))  # (width, height): two beyond --max-side 48


def _fs(endpoint) -> s3fs.S3FileSystem:
    return s3fs.S3FileSystem(skip_instance_cache=True, **endpoint.storage_options)


def _photo(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    width, height = SIZES[seed % len(SIZES)]
    base = rng.integers(0, 256, 3) * np.ones((height, width, 3))
    noise = rng.normal(0, 30, (height, width, 3))
    return encode_jpeg(Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8)))


def _cli(*argv: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline.shards", *argv],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _jpegs(urls) -> list[bytes]:
    """The stored images of the shards at ``urls``."""
    images = []
    for url in urls:
        with tarfile.open(fileobj=io.BytesIO(read_bytes(url))) as tar:
            images += [tar.extractfile(m).read() for m in tar if m.name.endswith(".jpg")]
    return images


def _size(data: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(data)) as image:
        return image.size


def _records(fs: s3fs.S3FileSystem, url: str) -> list[str]:
    fs.invalidate_cache()  # a listing is cached otherwise, and the write goes on
    return fs.glob(f"{url}/_parts/*.json")


def _objects(fs: s3fs.S3FileSystem, url: str) -> dict[str, bytes]:
    fs.invalidate_cache()  # listings cached while the write was under way are stale
    return {path: fs.cat_file(f"{url}/{path}") for path in find_files(url)}


def _train(cluster, tracking, tmp_path, name: str, shards_url: str, options: dict) -> None:
    """A short pretraining run on the shards at ``shards_url``; it must finish."""
    config = small_run_config(
        tmp_path,
        name,
        tracking,
        data={"train_url": shards_url, "storage_options": options},
        train={"steps": 4, "eval_every": 4, "global_batch": 8, "micro_batch": 4},
    )
    checked(run_pretrain(cluster, config))
    client, run = only_run(tracking, f"{tmp_path.name}-{name}")
    assert run.info.status == "FINISHED"
    assert len(client.get_metric_history(run.info.run_id, "train/loss")) == 4


def test_an_imagenet_tree_becomes_shards_and_a_run_trains_on_them(
    ray_cluster, mlflow_server, s3_endpoint, tmp_path
):
    fs, root = _fs(s3_endpoint), s3_endpoint.url("imagenet")
    originals, labels = {}, ["ImageId,PredictionString"]
    for n, synset in enumerate(reversed(SYNSETS)):
        for k in range(12):
            originals[f"train/{synset}/{synset}_{k}.JPEG"] = _photo(100 * n + k)
        for k in range(3):
            name = f"ILSVRC2012_val_{3 * n + k:08d}"
            originals[f"val/{name}.JPEG"] = _photo(1000 + 3 * n + k)
            labels.append(f"{name},{synset} 0 0 10 10")
    good = originals[f"train/{SYNSETS[0]}/{SYNSETS[0]}_0.JPEG"]
    _, scan = _jpeg_layout(good)
    broken = good[:scan] + bytes(50) + b"\xff\xc0\x00\x11" + bytes(50) + b"\xff\xd9"
    originals[f"train/{SYNSETS[1]}/{SYNSETS[1]}_broken.JPEG"] = broken
    fs.pipe({f"{root}/{path}": data for path, data in originals.items()})
    fs.pipe_file(f"{root}/LOC_val_solution.csv", "\n".join(labels).encode())
    dest = s3_endpoint.url("imagenet-wds")
    options = json.dumps(s3_endpoint.storage_options)
    argv = [
        "--storage-options", options, "write", root, dest, "--max-side", "48",
        "--val-labels", f"{root}/LOC_val_solution.csv", "--samples-per-shard", "10", "--quiet",
    ]  # fmt: skip
    writer = _cli(*argv, env=ray_cluster.env())  # one Ray task per shard on the session's cluster
    output = writer.communicate(timeout=240)[0]
    assert writer.returncode == 0, output
    assert "corrupt images left out: 1" in output
    info = read_info(dest)
    assert info.class_names == SYNSETS and info.writer["source"]["layout"] == "imagenet"
    assert (info.split("train").num_samples, info.split("validation").num_samples) == (36, 9)
    assert [entry["source"] for entry in info.corrupt] == [
        f"train/{SYNSETS[1]}/n01443537_broken.JPEG"
    ]
    stored = _jpegs(info.split("train").shard_urls)
    assert len(stored) == 36 and max(max(decode_rgb(d).shape[1:]) for d in stored) == 48
    train = [d for p, d in originals.items() if p.startswith("train") and d is not broken]
    small = [data for data in train if max(_size(data)) <= 48]
    assert len(small) == 18 and set(small) <= set(stored)  # within --max-side: byte for byte
    _train(ray_cluster, mlflow_server, tmp_path, "imagenet", dest, s3_endpoint.storage_options)


def _hub_parquet(fs, url: str, labels: list[int], names: list[str]) -> list[bytes]:
    images = [_photo(7 * len(labels) + i) for i in range(len(labels))]
    table = pa.table(
        {
            "image": [{"bytes": data, "path": None} for data in images],
            "label": pa.array(labels, pa.int64()),
        }
    )
    features = {"image": {"_type": "Image"}, "label": {"names": names, "_type": "ClassLabel"}}
    metadata = {"huggingface": json.dumps({"info": {"features": features}})}
    with fs.open(url, "wb") as handle:
        pq.write_table(table.replace_schema_metadata(metadata), handle, row_group_size=3)
    return images


def test_hub_parquet_files_become_shards(s3_endpoint):
    fs, root = _fs(s3_endpoint), s3_endpoint.url("hub-imagenet", "data")
    names = ["tench", "goldfish", "great white shark"]
    images = _hub_parquet(fs, f"{root}/train-00000-of-00002.parquet", [0, 1, 2, 0, 1, 2, 0], names)
    images += _hub_parquet(fs, f"{root}/train-00001-of-00002.parquet", [2, 2, 1, 1], names)
    validation = _hub_parquet(fs, f"{root}/validation-00000-of-00001.parquet", [0, 1, 2], names)
    dest = s3_endpoint.url("hub-wds")
    source = open_source(
        s3_endpoint.url("hub-imagenet"), storage_options=s3_endpoint.storage_options
    )
    info = write_shards(source, dest, samples_per_shard=4, seed=1, progress=False)
    assert info.class_names == tuple(names) and info.corrupt == ()
    assert (info.split("train").num_samples, info.split("validation").num_samples) == (11, 3)
    stored = _jpegs(info.split("train").shard_urls + info.split("validation").shard_urls)
    assert sorted(stored) == sorted(images + validation)  # within --max-side: the Hub's bytes


def _img2dataset(fs, url: str, first: int, count: int, local) -> None:
    """img2dataset's layout (``00000.tar``: ``000000000.jpg`` + ``.json`` + ``.txt``, the class
    as an extra column in the json) written by webdataset's ShardWriter, then uploaded; the
    class also in ``.cls``, which the training reader reads."""
    local.mkdir(exist_ok=True)
    pattern = str(local / "%05d.tar")
    with wds.ShardWriter(pattern, maxcount=6, start_shard=first // 6, verbose=0) as sink:
        for i in range(first, first + count):
            meta = {"key": f"{i:09d}", "caption": "a photo", "label": i % 3}
            sink.write(
                {
                    "__key__": f"{i:09d}",
                    "jpg": _photo(i),
                    "txt": "a photo",
                    "json": json.dumps(meta).encode(),
                    "cls": str(i % 3).encode(),
                }
            )
    for path in local.glob("*.tar"):
        fs.put_file(str(path), f"{url}/{path.name}")


def test_img2dataset_shards_are_indexed_then_trained_on(
    ray_cluster, mlflow_server, s3_endpoint, tmp_path
):
    fs, url = _fs(s3_endpoint), s3_endpoint.url("img2dataset")
    _img2dataset(fs, url, 0, 24, tmp_path / "train")
    _img2dataset(fs, url, 24, 6, tmp_path / "validation")
    argv = ["index", f"{url}/{{00000..00003}}.tar", "--validation", f"{url}/00004.tar"]
    assert shards.main(argv) == 0
    info = read_info(url)
    assert info.split("train").shard_lengths == (6, 6, 6, 6) and info.num_classes == 3
    _train(ray_cluster, mlflow_server, tmp_path, "img2dataset", url, s3_endpoint.storage_options)


def test_an_interrupted_parallel_write_resumes_to_the_bytes_of_an_uninterrupted_one(
    ray_cluster, s3_endpoint, tmp_path
):
    fs = _fs(s3_endpoint)
    killed, straight = s3_endpoint.url("killed"), s3_endpoint.url("straight")
    options = json.dumps(s3_endpoint.storage_options)
    args = ["--num-samples", "600", "--resolution", "32", "--samples-per-shard", "6", "--quiet"]
    writer = _cli(
        "--storage-options", options, "write", "shapes", killed, *args, env=ray_cluster.env()
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(_records(fs, killed)) < 3:
        time.sleep(0.05)
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    fs.invalidate_cache()
    assert not fs.exists(f"{killed}/_info.json"), "the write ended before it could be killed"
    assert len(_records(fs, killed)) < 100
    again = _cli(
        "--storage-options", options, "write", "shapes", killed, *args, env=ray_cluster.env()
    )
    output = again.communicate(timeout=240)[0]
    assert again.returncode == 0, output
    assert "shards already complete" in output
    write_shards(
        shapes(600, 32, seed=0),
        straight,
        samples_per_shard=6,
        storage_options=s3_endpoint.storage_options,
        progress=False,
    )  # in this process, one shard after another
    first, second = _objects(fs, killed), _objects(fs, straight)
    assert len(first) == 2 + 2 * 100 and first == second  # plan, info, shards and records


def test_bad_input_exits_2_naming_the_url_and_leaves_nothing_a_reader_would_take(
    s3_endpoint, capsys
):
    fs = _fs(s3_endpoint)
    url = s3_endpoint.url
    fs.pipe_file(f"{url('unlabelled')}/00000.tar", _tar_without_labels())
    write_shards(shapes(20, 16, seed=0), url("taken"), samples_per_shard=10, progress=False)
    before = _objects(fs, url("taken"))
    cases = [
        (["write", url("no-such-tree"), url("out-1")], url("no-such-tree")),
        (["write", "s3://no-such-bucket-x/tree", url("out-2")], "s3://no-such-bucket-x/tree"),
        (["index", f"{url('nothing')}/{{000..009}}.tar"], f"{url('nothing')}/{{000..009}}.tar"),
        (["index", f"{url('unlabelled')}/{{00000..00000}}.tar"], f"{url('unlabelled')}/00000.tar"),
        (["write", "digits", url("taken"), "--num-samples", "30"], url("taken")),
    ]
    for argv, named in cases:
        assert shards.main(argv) == 2, argv
        assert named in capsys.readouterr().err
    assert not fs.exists(f"{url('out-1')}") and not fs.exists(f"{url('out-2')}")
    assert not fs.exists(f"{url('unlabelled')}/_info.json")
    assert _objects(fs, url("taken")) == before


def _tar_without_labels() -> bytes:
    buffer = io.BytesIO()
    with wds.TarWriter(buffer, encoder=False) as tar:
        for i in range(3):
            tar.write({"__key__": f"{i:09d}", "jpg": _photo(i), "txt": b"no class"})
    return buffer.getvalue()
