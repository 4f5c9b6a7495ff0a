"""Image limits (runtime/preprocess.py): extreme images are refused from the file header, with
one line that names the limit and the flag to raise it; degenerate inputs get clear errors."""

from __future__ import annotations

import struct
import tracemalloc
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from runtime.preprocess import ImageError, ImageLimits, ImagePreprocessor, as_image_list, load_image


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims ``width`` x ``height`` (no pixel data): tiny on disk, huge if decoded."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))
    return path


def png(path: Path, width: int, height: int) -> Path:
    Image.fromarray(np.full((height, width), 128, np.uint8)).save(path)
    return path


@pytest.mark.parametrize("width,height", [(5000, 1), (10000, 1), (1, 5000)])
def test_extreme_aspect_png_is_refused_before_resizing(tmp_path, width, height):
    path = png(tmp_path / f"{width}x{height}.png", width, height)  # a valid, ~100-byte PNG
    tracemalloc.start()
    with pytest.raises(ImageError) as err:
        ImagePreprocessor()([path])
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    message = str(err.value)
    assert "\n" not in message and str(path) in message
    assert "aspect ratio" in message and "50:1" in message and "--max-image-aspect" in message
    assert peak < 50e6, f"{peak / 1e6:.0f} MB allocated before refusing"  # it took GBs before


def test_raised_aspect_limit_lets_it_through(tmp_path):
    path = png(tmp_path / "wide.png", 600, 10)
    with pytest.raises(ImageError, match="aspect"):
        ImagePreprocessor()([path])
    pre = ImagePreprocessor(limits=ImageLimits(max_aspect_ratio=100))
    assert pre([path]).shape == (1, 3, 224, 224)


def test_aspect_only_limits_shortest_edge_resizing(tmp_path):
    """A fixed-size resize costs the same for any aspect ratio: no aspect limit there."""
    path = png(tmp_path / "wide.png", 600, 2)
    pre = ImagePreprocessor(size={"height": 32, "width": 32}, crop_size={"height": 32, "width": 32})
    assert pre([path]).shape == (1, 3, 32, 32)


def test_huge_png_is_a_clear_error_without_pillow_warning(tmp_path):
    path = png_header_only(tmp_path / "huge.png", 13000, 13000)  # 169 Mpx claimed
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ImageError) as err:
            load_image(path)
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]
    message = str(err.value)
    assert "13000x13000" in message and "169.0 Mpx" in message and "--max-image-pixels" in message


def test_beyond_pillow_bomb_limit_is_a_clear_error(tmp_path):
    path = png_header_only(tmp_path / "bomb.png", 20000, 20000)  # 400 Mpx: Pillow raises
    with pytest.raises(ImageError, match="--max-image-pixels|downscale"):
        load_image(path, ImageLimits(max_pixels=10**9).check_pixels)


def test_pixel_limit_applies_to_arrays_and_pil_images():
    pre = ImagePreprocessor(limits=ImageLimits(max_pixels=100))
    with pytest.raises(ImageError, match="limit of 0.0001 Mpx"):
        pre([np.zeros((20, 20, 3), np.uint8)])
    with pytest.raises(ImageError, match="--max-image-pixels"):
        pre([Image.new("RGB", (20, 20))])


@pytest.mark.parametrize("shape", [(0, 0, 3), (0, 5, 3), (5, 0), (0, 0)])
def test_empty_array_is_a_clear_error(shape):
    with pytest.raises(ImageError, match="no pixels"):
        ImagePreprocessor()([np.zeros(shape, np.uint8)])


def test_zero_size_pil_image_is_a_clear_error():
    with pytest.raises(ImageError, match="0x0: it has no pixels"):
        ImagePreprocessor()([Image.new("RGB", (0, 0))])


def test_directory_is_named_a_directory(tmp_path):
    with pytest.raises(ImageError, match="is a directory, not an image file"):
        load_image(tmp_path)
    with pytest.raises(ImageError, match="is a directory"):
        ImagePreprocessor()([tmp_path])


def test_single_path_is_one_image(tmp_path):
    path = png(tmp_path / "x.png", 30, 20)
    assert as_image_list(str(path)) == [str(path)]
    assert as_image_list(path) == [path]
    array = np.zeros((4, 4, 3), np.uint8)
    assert len(as_image_list(array)) == 1 and as_image_list(None) == []
    assert ImagePreprocessor()(str(path)).shape == (1, 3, 224, 224)
    with pytest.raises(ImageError, match="not bytes"):
        as_image_list(b"\x89PNG")
    with pytest.raises(ImageError, match="not int"):
        as_image_list(3)


def test_unsupported_image_type_is_an_image_error():
    with pytest.raises(ImageError, match="unsupported image type dict"):
        ImagePreprocessor()([{}])


def test_the_server_decodes_images_as_files_are_loaded(tmp_path):
    """An uploaded JPEG is decoded as ``load_image`` opens the file (DSVL's
    ``Image.open(...).convert("RGB")``): the EXIF orientation is not applied by either."""
    from runtime.serve.messages import ImageLimits as ServerLimits
    from runtime.serve.messages import decode_image

    pixels = np.random.default_rng(3).integers(0, 256, (30, 50, 3), np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    path = tmp_path / "sideways.jpg"
    Image.fromarray(pixels).save(path, exif=exif)
    decoded = decode_image(path.read_bytes(), "messages[0]", ServerLimits())
    assert decoded.size == (50, 30) and decoded.mode == "RGB"
    assert np.array_equal(np.asarray(decoded), np.asarray(load_image(path)))
