"""Sources: procedural shapes, sklearn digits, ImageFolder directories."""

from __future__ import annotations

import pytest
from PIL import Image

from pipeline.data.decode import decode_rgb
from pipeline.data.sources import SourceError, digits, from_name, imagefolder, shapes
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


def test_imagefolder_sorts_classes_keeps_jpeg_bytes_and_reencodes_png(tmp_path):
    (tmp_path / "b_cats").mkdir()
    (tmp_path / "a_dogs" / "nested").mkdir(parents=True)
    jpeg = jpeg_bytes(1, 16)
    (tmp_path / "b_cats" / "x.jpg").write_bytes(jpeg)
    (tmp_path / "a_dogs" / "nested" / "y.PNG").write_bytes(
        png_bytes(Image.new("RGBA", (10, 6), (9, 8, 7, 255)))
    )
    (tmp_path / "a_dogs" / "notes.txt").write_text("not an image")
    source = imagefolder(f"file://{tmp_path}")
    assert source.class_names == ["a_dogs", "b_cats"] and len(source) == 2
    png_data, png_label = source.sample(0)
    assert png_label == 0 and png_data[:3] == b"\xff\xd8\xff"
    assert tuple(decode_rgb(png_data).shape) == (3, 6, 10)
    assert source.sample(1) == (jpeg, 1)


def test_bad_sources_name_the_path(tmp_path):
    with pytest.raises(SourceError, match="does-not-exist"):
        imagefolder(str(tmp_path / "does-not-exist"))
    with pytest.raises(SourceError, match="no class sub-folders"):
        imagefolder(str(tmp_path))
    with pytest.raises(SourceError, match="'mnist'"):
        from_name("mnist", num_samples=None, resolution=None, seed=0, num_classes=10)
