"""Decoding: every stored mode ends as RGB uint8 with the expected pixel values; bad bytes fail."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.data.decode import CorruptImage, check_image, decode_rgb, sample_label
from pipeline.data.sources import encode_jpeg
from tests.helpers.images import jpeg_bytes, png_bytes, without_segment


def _pixel(data: bytes, x: int = 0, y: int = 0) -> list[int]:
    image = decode_rgb(data)
    assert image.dtype == torch.uint8 and image.shape[0] == 3
    return image[:, y, x].tolist()


def test_grayscale_becomes_three_equal_channels():
    assert _pixel(png_bytes(Image.new("L", (4, 3), 77))) == [77, 77, 77]


def test_sixteen_bit_gray_is_rescaled_not_clipped():
    wide = np.array([[0, 257 * 100, 65535, 1000]], dtype=np.uint16)
    data = png_bytes(Image.fromarray(wide))
    assert decode_rgb(data)[0, 0].tolist() == [0, 100, 255, 4]  # 1000 / 257 = 3.89 -> 4


def test_rgba_is_composited_on_black():
    rgba = Image.new("RGBA", (2, 1), (200, 100, 50, 255))
    rgba.putpixel((1, 0), (200, 100, 50, 0))
    data = png_bytes(rgba)
    assert _pixel(data, 0) == [200, 100, 50]
    assert _pixel(data, 1) == [0, 0, 0]


def test_palette_and_transparent_palette_images():
    palette = Image.new("P", (2, 1), 1)
    palette.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    assert _pixel(png_bytes(palette)) == [10, 20, 30]
    palette.info["transparency"] = 1
    assert _pixel(png_bytes(palette)) == [0, 0, 0]


def test_grayscale_jpeg_and_size():
    data = encode_jpeg(Image.new("L", (20, 10), 128))
    image = decode_rgb(data)
    assert tuple(image.shape) == (3, 10, 20)
    assert abs(int(image[0, 5, 5]) - 128) <= 1 and torch.equal(image[0], image[2])


def test_the_cheap_check_rejects_broken_and_truncated_jpegs():
    good = jpeg_bytes(3, 64)
    check_image(good)
    check_image(good + b"trailing bytes after the end-of-image marker")
    for broken in (b"not an image at all", good[: len(good) // 2], good[:-2], good[:100]):
        with pytest.raises(CorruptImage):
            check_image(broken)
        with pytest.raises(CorruptImage):
            decode_rgb(broken)


def test_a_jpeg_without_quantisation_tables_passes_the_check_but_not_the_decode():
    broken = without_segment(jpeg_bytes(4, 32), 0xDB)
    check_image(broken)
    with pytest.raises(CorruptImage):
        decode_rgb(broken)


def test_png_is_checked_by_a_full_decode():
    data = png_bytes(Image.new("RGB", (8, 8), (1, 2, 3)))
    check_image(data)
    with pytest.raises(CorruptImage):
        check_image(data[: len(data) // 2])


@pytest.mark.parametrize(
    ("sample", "label"),
    [
        ({"cls": b" 7\n", "json": b'{"label": 3}'}, 7),  # the cls member wins
        ({"json": b'{"key": "000000001", "label": 3}'}, 3),  # img2dataset's extra column
        ({"json": b'{"cls": 4}'}, 4),
        ({"json": b'{"class": 5, "label": "five"}'}, 5),
        ({"json": b'{"label": true}'}, None),
        ({"json": b"[1, 2]"}, None),
        ({"json": b"not json"}, None),
        ({"cls": b"seven"}, None),
        ({"txt": b"a caption"}, None),
    ],
)
def test_a_samples_class_comes_from_cls_or_from_its_json(sample, label):
    assert sample_label(sample) == label
