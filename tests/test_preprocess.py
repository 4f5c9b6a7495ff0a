"""runtime.preprocess must reproduce transformers' CLIPImageProcessor bit for bit, on images
made RGB as DSVL makes them (``convert("RGB")``; transformers 5 would composite transparency
onto white, DSVL's 4.33 drops it: tests/test_preprocess_hf433.py holds 4.33's own pixels).

The reference is the processor transformers actually builds here: without torchvision,
``CLIPImageProcessor`` falls back to the PIL backend (``CLIPImageProcessorPil``).
"""

from __future__ import annotations

import io
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from transformers import CLIPImageProcessor
from transformers.utils import logging as hf_logging

from runtime.cli import run_cli
from runtime.preprocess import ImageError, ImagePreprocessor, load_image

ROOT = Path(__file__).resolve().parents[1]
hf_logging.set_verbosity_error()  # silences "falling back to CLIPImageProcessorPil"

CONFIGS: dict[str, dict[str, Any]] = {
    "clip-224": {},
    "tiny-56": {"size": 56, "crop_size": 56},
    "pad-crop": {"size": {"shortest_edge": 47}, "crop_size": {"height": 56, "width": 60}},
    "rect-crop": {"size": 64, "crop_size": [40, 56], "resample": 2},
    "fixed-hw": {"size": {"height": 50, "width": 70}, "do_center_crop": False},
    "no-resize": {"do_resize": False, "crop_size": 33, "image_mean": 0.5, "image_std": 0.5},
    "no-rescale": {"size": 32, "crop_size": 32, "do_rescale": False},
}

# (height, width): square, landscape, portrait, a long edge that truncates (not rounds),
# smaller than every crop, a sliver, and a single pixel.
SIZES = [(224, 224), (48, 64), (97, 61), (333, 517), (19, 23), (5, 130), (1, 1)]


def reference(config: dict[str, Any]) -> CLIPImageProcessor:
    return CLIPImageProcessor(**config)


def hf_pixels(processor: CLIPImageProcessor, images: list, **kwargs: Any) -> np.ndarray:
    return processor(images, return_tensors="np", **kwargs)["pixel_values"]


def dsvl_rgb(image: Image.Image | np.ndarray) -> Image.Image | np.ndarray:
    """What DSVL's processor works on: ``convert("RGB")``'s pixels (a 4-channel array: its alpha
    dropped, as Pillow would). A fresh image, since Pillow keeps a palette's transparency in the
    converted image's ``info``, where transformers 5 would composite it onto white and 4.33
    (which returns an RGB image as it is) would not."""
    if isinstance(image, np.ndarray):
        return image[..., :3] if image.ndim == 3 and image.shape[2] == 4 else image
    return Image.fromarray(np.asarray(image.convert("RGB")))


def assert_same(ours: np.ndarray, theirs: np.ndarray) -> None:
    assert ours.dtype == np.float32 and theirs.dtype == np.float32
    assert ours.shape == theirs.shape
    diff = float(np.abs(ours - theirs).max()) if ours.size else 0.0
    assert np.array_equal(ours, theirs), f"max abs diff {diff}"


def random_image(rng: np.random.Generator, height: int, width: int, mode: str) -> Image.Image:
    """Noise: the hardest case for bicubic overshoot and clipping."""
    rgba = rng.integers(0, 256, (height, width, 4), dtype=np.uint8)
    if mode == "RGBA":
        return Image.fromarray(rgba, "RGBA")
    rgb = Image.fromarray(rgba[..., :3], "RGB")
    if mode == "P":
        return rgb.quantize(colors=16)
    if mode == "P-transparent":
        img = rgb.quantize(colors=16)
        img.info["transparency"] = 3
        return img
    return rgb.convert(mode)


def test_reference_is_the_pil_backend() -> None:
    """The runtime mirrors the PIL backend; the torchvision one resizes differently."""
    assert type(reference({})).__name__ == "CLIPImageProcessorPil", (
        "torchvision is installed, so CLIPImageProcessor uses the torch backend, which "
        "runtime.preprocess does not reproduce")


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "LA", "P", "P-transparent", "CMYK"])
def test_pil_images_match(name: str, mode: str) -> None:
    config = CONFIGS[name]
    rng = np.random.default_rng(zlib.crc32(f"{name}/{mode}".encode()))
    ours, theirs = ImagePreprocessor.from_dict(config), reference(config)
    for height, width in SIZES:
        image = random_image(rng, height, width, mode)
        assert_same(ours([image]), hf_pixels(theirs, [dsvl_rgb(image)]))


@pytest.mark.parametrize("name", ["clip-224", "tiny-56", "pad-crop", "fixed-hw"])
@pytest.mark.parametrize("channels", [0, 1, 3, 4])
def test_uint8_arrays_match(name: str, channels: int) -> None:
    """HWC uint8 arrays (0 = a 2-D grayscale array, which transformers takes as HxWx1)."""
    config = CONFIGS[name]
    rng = np.random.default_rng(channels)
    ours, theirs = ImagePreprocessor.from_dict(config), reference(config)
    for height, width in SIZES:
        shape = (height, width, max(channels, 1))
        array = rng.integers(0, 256, shape, dtype=np.uint8)
        ours_in = array[..., 0] if channels == 0 else array
        # transformers guesses the channel axis; a 1- or 3-pixel-high image would fool it
        theirs_out = hf_pixels(theirs, [dsvl_rgb(array)], input_data_format="channels_last")
        assert_same(ours([ours_in]), theirs_out)


def test_batch_of_mixed_inputs(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    path = tmp_path / "photo.jpg"
    random_image(rng, 120, 90, "RGB").save(path, quality=90)
    images = [random_image(rng, 64, 80, "RGB"), random_image(rng, 30, 30, "RGBA"),
              rng.integers(0, 256, (70, 50, 3), dtype=np.uint8)]
    theirs = hf_pixels(reference({}), [*map(dsvl_rgb, images), str(path)],
                       input_data_format="channels_last")
    ours = ImagePreprocessor()([*images, path])
    assert ours.shape == (4, 3, 224, 224)
    assert_same(ours, theirs)


@pytest.mark.parametrize("fmt,mode", [("PNG", "RGBA"), ("PNG", "P-transparent"), ("JPEG", "L"),
                                      ("JPEG", "RGB"), ("GIF", "P")])
def test_files_match(tmp_path: Path, fmt: str, mode: str) -> None:
    """A path is opened as DSVL's chat.py opens it: ``Image.open(path).convert("RGB")``."""
    image = random_image(np.random.default_rng(1), 61, 83, mode)
    path = tmp_path / f"image.{fmt.lower()}"
    image.save(path, format=fmt)
    config = CONFIGS["tiny-56"]
    with Image.open(path) as stored:
        theirs = hf_pixels(reference(config), [dsvl_rgb(stored)])
    assert_same(ImagePreprocessor.from_dict(config)([path]), theirs)
    assert_same(ImagePreprocessor.from_dict(config)([str(path)]), theirs)


def test_exif_orientation_is_not_applied_as_in_dsvl(tmp_path: Path) -> None:
    """DSVL's chat.py opens a path with ``Image.open(path).convert("RGB")``: a photo whose
    EXIF tag says "rotate on display" is seen as stored (transformers' ``load_image``, which
    the reference processor uses for paths, would rotate it)."""
    image = random_image(np.random.default_rng(2), 40, 70, "RGB")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif)
    assert load_image(path).size == image.size
    config = CONFIGS["rect-crop"]
    with Image.open(path) as stored:
        dsvl = hf_pixels(reference(config), [dsvl_rgb(stored)])
    assert_same(ImagePreprocessor.from_dict(config)([path]), dsvl)
    assert not np.array_equal(dsvl, hf_pixels(reference(config), [str(path)]))  # a real rotation


def test_config_written_by_save_pretrained(tmp_path: Path) -> None:
    reference(CONFIGS["rect-crop"]).save_pretrained(tmp_path)
    theirs = CLIPImageProcessor.from_pretrained(tmp_path)
    ours = ImagePreprocessor.from_file(tmp_path)
    assert ours == ImagePreprocessor.from_file(tmp_path / "preprocessor_config.json")
    assert ours.size == {"shortest_edge": 64} and ours.crop_size == {"height": 40, "width": 56}
    assert ours.resample == 2
    rng = np.random.default_rng(3)
    images = [random_image(rng, h, w, "RGB") for h, w in SIZES]
    assert_same(ours(images[:1]), hf_pixels(theirs, images[:1]))
    for image in images:
        assert_same(ours([image]), hf_pixels(theirs, [image]))


def test_legacy_config_format() -> None:
    """Pre-v4.26 CLIP configs: int sizes, feature-extractor keys that must be ignored."""
    legacy = {"crop_size": 224, "do_center_crop": True, "do_normalize": True, "do_resize": True,
              "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": [0.5, 0.4, 0.3],
              "image_std": [0.2, 0.3, 0.4], "resample": 3, "size": 224}
    ours = ImagePreprocessor.from_dict(legacy)
    assert ours.size == {"shortest_edge": 224}
    assert ours.crop_size == {"height": 224, "width": 224}
    image = random_image(np.random.default_rng(4), 300, 200, "RGB")
    assert_same(ours([image]), hf_pixels(CLIPImageProcessor(**legacy), [image]))


def test_defaults_equal_clip_to_dict() -> None:
    assert ImagePreprocessor.from_dict(reference({}).to_dict()) == ImagePreprocessor()


@pytest.mark.parametrize("height,width", [(56, 56), (28, 42), (70, 42)])
def test_override_size(height: int, width: int) -> None:
    base = ImagePreprocessor.from_dict(CONFIGS["clip-224"])
    ours = base.override_size(height, width)
    assert base.size == {"shortest_edge": 224}  # the original is untouched
    theirs = reference({"size": max(height, width), "crop_size": [height, width]})
    rng = np.random.default_rng(5)
    for h, w in SIZES:
        image = random_image(rng, h, w, "RGB")
        out = ours([image])
        assert out.shape == (1, 3, height, width)
        assert_same(out, hf_pixels(theirs, [image]))
    fixed = ImagePreprocessor.from_dict(CONFIGS["fixed-hw"]).override_size(height, width)
    assert fixed([random_image(rng, 33, 77, "RGB")]).shape == (1, 3, height, width)


def test_unsupported_size_is_rejected() -> None:
    with pytest.raises(ValueError, match="size"):
        ImagePreprocessor.from_dict({"size": {"shortest_edge": 224, "longest_edge": 448}})


def _truncated_jpeg() -> bytes:
    buf = io.BytesIO()
    random_image(np.random.default_rng(6), 64, 64, "RGB").save(buf, format="JPEG")
    return buf.getvalue()[: len(buf.getvalue()) // 2]


@pytest.mark.parametrize("content,problem", [
    (None, "no such file"),
    (b"", "empty"),
    (b"this is not an image at all", "cannot read image"),
    (_truncated_jpeg(), "cannot read image"),
])
def test_bad_files_raise_image_error(tmp_path: Path, content: bytes | None, problem: str,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "broken_input.jpg"
    if content is not None:
        path.write_bytes(content)
    for call in (lambda: load_image(path), lambda: ImagePreprocessor()([str(path)])):
        with pytest.raises(ImageError) as info:
            call()
        message = str(info.value)
        assert "broken_input.jpg" in message and problem in message
        assert "\n" not in message
    # what the hierarchy promises: a CLI prints it as one error line with exit 2, and callers
    # that catch ValueError (as before the hierarchy) still catch it
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: load_image(path))
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == f"error: {message}\n"
    with pytest.raises(ValueError, match=problem):
        load_image(path)


def test_does_not_import_torch() -> None:
    code = "import runtime.preprocess, sys; assert 'torch' not in sys.modules; " \
           "assert 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
