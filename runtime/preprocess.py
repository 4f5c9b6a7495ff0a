"""CLIP image preprocessing in numpy + Pillow, bit-identical to transformers' CLIPImageProcessor.

The edge runtime cannot depend on torch or transformers, yet the exported vision model was traced
against tensors produced by ``CLIPImageProcessor``; any drift in resizing, cropping or
normalisation shows up as drift in the image embeddings. This module therefore copies the exact
arithmetic of the PIL backend that transformers 5.24 uses when torchvision is absent
(``PilBackend`` + ``image_transforms``), including its quirks, and follows DSVL's own code
(transformers 4.33 and chat.py) where the two differ (the RGB conversion and opening a file):

* the resized long edge is truncated, ``int(shortest * long / short)``, never rounded;
* resizing is done by Pillow on the uint8 RGB image, not in float;
* a center crop larger than the image pads with zeros (black, before normalisation), placing
  the image at offset ``ceil((crop - size) / 2)``;
* every image becomes RGB as DSVL makes it: ``convert("RGB")`` (chat.py calls it on each
  image, and transformers 4.33's ``convert_to_rgb`` is the same call), so transparency is
  dropped, not composited onto white as transformers 5 does; a uint8 array converts as Pillow
  would convert it (alpha dropped, gray repeated), so a picture gives the same pixels whether
  it comes as a file, a PIL image or an array;
* a *file path* is opened as chat.py opens one, ``Image.open(path).convert("RGB")``: the EXIF
  orientation is not applied (transformers' ``load_image`` would rotate);
* rescale runs in float64 and is cast to float32; normalisation runs in float32.
"""

from __future__ import annotations

import copy
import json
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from runtime.errors import UserError

# OpenAI CLIP's statistics: CLIPImageProcessor's defaults.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

ImageInput = Image.Image | str | Path | np.ndarray


class ImageError(UserError):
    """An image file is missing, empty or cannot be decoded; the message names the file."""


@dataclass(frozen=True)
class ImageLimits:
    """What one image may cost before any pixel is decoded or resized.

    ``max_pixels`` bounds the decoded input (a 95-byte PNG can claim 169 Mpx);
    ``max_aspect_ratio`` bounds the resize of shortest-edge configs, whose long edge grows with
    the aspect ratio (a 5000x1 image would become 224 x 1,120,000): with it the resized image
    holds at most ``max_aspect_ratio * shortest_edge**2`` pixels.
    """

    max_pixels: int = 50_000_000
    max_aspect_ratio: float = 50.0

    def check_pixels(self, width: int, height: int, name: str = "image") -> None:
        if width <= 0 or height <= 0:
            raise ImageError(f"{name} is {width}x{height}: it has no pixels")
        if width * height > self.max_pixels:
            raise ImageError(f"{name} is {width}x{height} ({width * height / 1e6:.1f} Mpx), above the "
                             f"limit of {self.max_pixels / 1e6:g} Mpx: downscale it or raise "
                             "--max-image-pixels")


SizeCheck = Callable[[int, int, str], None]


def as_image_list(images: Sequence[ImageInput] | ImageInput | None) -> list[ImageInput]:
    """The images of a request as a list: one path, PIL image or array is one image (a string is
    not a sequence of 24 one-letter images)."""
    if images is None:
        return []
    if isinstance(images, (str, Path, Image.Image, np.ndarray)):
        return [images]
    if isinstance(images, (bytes, bytearray)):
        raise ImageError("images must be paths, PIL images or uint8 arrays, not bytes: "
                         "pass a file path, or Image.open(io.BytesIO(data))")
    try:
        return list(images)
    except TypeError:
        raise ImageError(f"images must be a list of paths, PIL images or uint8 arrays, not "
                         f"{type(images).__name__}") from None


def load_image(path: str | Path, check_size: SizeCheck | None = None) -> Image.Image:
    """Open and fully decode an image file as RGB, the way DSVL's chat.py and
    eval/batch_generation.py do: ``Image.open(path).convert("RGB")``. Transparency is dropped,
    not composited, and the EXIF orientation is not applied (transformers' ``load_image``
    would rotate a photo stored sideways; DSVL sees it as stored). To feed a photo upright,
    pass ``ImageOps.exif_transpose(Image.open(path))`` instead of the path.

    ``Image.open`` is lazy, so ``.load()`` runs inside the ``try`` to surface truncated or
    corrupt data here, as an ``ImageError`` naming the file, instead of deep inside a resize.
    The size is checked from the header, before decoding (``check_size``, else the default
    pixel limit), so a tiny file claiming a huge image is refused at once.
    """
    path = Path(path)
    if path.is_dir():
        raise ImageError(f"{path} is a directory, not an image file: pass an image file")
    if not path.is_file():
        raise ImageError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise ImageError(f"{path}: file is empty")
    check = check_size or ImageLimits().check_pixels
    try:
        with warnings.catch_warnings():  # our own limit speaks instead of Pillow's warning
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(path)
        with img:
            check(img.width, img.height, str(path))
            img.load()
            return img.convert("RGB")
    except ImageError:
        raise
    except Image.DecompressionBombError:
        raise ImageError(f"{path}: more than {2 * (Image.MAX_IMAGE_PIXELS or 0) / 1e6:.0f} Mpx, "
                         "above what Pillow decodes: downscale it") from None
    except Exception as err:  # Pillow raises many types (OSError, SyntaxError, struct.error...)
        msg = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ImageError(f"{path}: cannot read image ({msg})") from err


def _size_dict(value: Any, default_to_square: bool, name: str) -> dict[str, int]:
    """Normalise ``size``/``crop_size`` as transformers' ``get_size_dict`` does.

    Old configs store an int (CLIP: shortest edge for ``size``, a square for ``crop_size``) or an
    ``[height, width]`` list; new ones store a dict.
    """
    if isinstance(value, int):
        return {"height": value, "width": value} if default_to_square else {"shortest_edge": value}
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return {"height": int(value[0]), "width": int(value[1])}
    if isinstance(value, dict):
        keys = {k for k, v in value.items() if v is not None}
        if keys == {"shortest_edge"} or keys == {"height", "width"}:
            return {k: int(value[k]) for k in keys}
    raise UserError(f"unsupported {name} {value!r}: expected shortest_edge or height/width")


def _triple(value: float | Sequence[float]) -> tuple[float, float, float]:
    """Mean/std may be a scalar (applied to every channel) or one value per channel."""
    values = [float(v) for v in value] if isinstance(value, Sequence) else [float(value)] * 3
    if len(values) != 3:
        raise UserError(f"expected 3 channel values, got {value!r}")
    return values[0], values[1], values[2]


@dataclass
class ImagePreprocessor:
    """The subset of CLIPImageProcessor's settings that changes pixels, with its defaults."""

    do_resize: bool = True
    size: dict[str, int] = field(default_factory=lambda: {"shortest_edge": 224})
    resample: int = Image.Resampling.BICUBIC.value
    do_center_crop: bool = True
    crop_size: dict[str, int] = field(default_factory=lambda: {"height": 224, "width": 224})
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD
    do_convert_rgb: bool = True
    limits: ImageLimits = field(default_factory=ImageLimits, compare=False)  # not from the config

    def __post_init__(self) -> None:
        self.size = _size_dict(self.size, default_to_square=False, name="size")
        self.crop_size = _size_dict(self.crop_size, default_to_square=True, name="crop_size")
        self.resample = int(self.resample)
        self.image_mean = _triple(self.image_mean)
        self.image_std = _triple(self.image_std)

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> ImagePreprocessor:
        """Build from a ``preprocessor_config.json`` dict; unknown keys (types, names) are ignored.

        A key that is absent or ``null`` keeps CLIP's default, as in transformers.
        """
        names = cls.__dataclass_fields__.keys() - {"limits"}
        return cls(**{k: v for k, v in config.items() if k in names and v is not None})

    @classmethod
    def from_file(cls, path: str | Path) -> ImagePreprocessor:
        """Read a ``preprocessor_config.json`` (or the directory holding one)."""
        path = Path(path)
        if path.is_dir():
            path = path / "preprocessor_config.json"
        config = json.loads(path.read_text())
        if not isinstance(config, dict):
            raise UserError(f"{path} holds a JSON {type(config).__name__}, not an object")
        return cls.from_dict(config)

    def override_size(self, height: int, width: int) -> ImagePreprocessor:
        """A copy whose output is exactly ``height`` x ``width`` (for dynamic-resolution exports).

        Shortest-edge configs resize the shortest edge to ``max(height, width)`` so the crop fits
        inside the resized image for any aspect ratio and never pads; fixed-size configs resize
        straight to the requested size. The center crop is switched on to pin the output shape.
        """
        if "shortest_edge" in self.size:
            size = {"shortest_edge": max(height, width)}
        else:
            size = {"height": height, "width": width}
        new = copy.deepcopy(self)
        new.do_resize, new.size = True, size
        new.do_center_crop, new.crop_size = True, {"height": height, "width": width}
        return new

    def __call__(self, images: Sequence[ImageInput] | ImageInput) -> np.ndarray:
        """Preprocess a batch into float32 ``[N, 3, H, W]`` pixel values.

        All images must come out at the same size (true whenever center crop is on).
        """
        return np.stack([self.preprocess_one(image) for image in as_image_list(images)]).astype(np.float32)

    def check_size(self, width: int, height: int, name: str = "image") -> None:
        """Refuse an image whose decode or resize would cost more than ``limits`` allow."""
        self.limits.check_pixels(width, height, name)
        if self.do_resize and "shortest_edge" in self.size:
            ratio = max(width, height) / min(width, height)
            if ratio > self.limits.max_aspect_ratio:
                new_h, new_w = self._resize_shape(height, width)
                raise ImageError(f"{name} is {width}x{height}: its aspect ratio {ratio:.0f}:1 is above "
                                 f"the limit of {self.limits.max_aspect_ratio:g}:1 (it would be resized "
                                 f"to {new_w}x{new_h}); crop it or raise --max-image-aspect")

    def output_size(self) -> tuple[int, int] | None:
        """(height, width) of every output, or None when it depends on the image."""
        if self.do_center_crop:
            return self.crop_size["height"], self.crop_size["width"]
        if self.do_resize and "height" in self.size:
            return self.size["height"], self.size["width"]
        return None

    def preprocess_one(self, image: ImageInput) -> np.ndarray:
        """One image to ``[3, H, W]`` float32, step for step as ``PilBackend._preprocess``."""
        pixels = self._to_rgb_array(image)  # HWC uint8
        if self.do_resize:
            height, width = self._resize_shape(*pixels.shape[:2])
            resized = Image.fromarray(pixels).resize((width, height), resample=self.resample)
            pixels = np.asarray(resized)
        chw = np.ascontiguousarray(pixels.transpose(2, 0, 1))
        if self.do_center_crop:
            chw = _center_crop(chw, self.crop_size["height"], self.crop_size["width"])
        out = chw.astype(np.float32)
        if self.do_rescale:  # transformers multiplies in float64, then casts
            out = (chw.astype(np.float64) * self.rescale_factor).astype(np.float32)
        if self.do_normalize:
            mean = np.array(self.image_mean, dtype=np.float32)[:, None, None]
            std = np.array(self.image_std, dtype=np.float32)[:, None, None]
            out = (out - mean) / std
        return out

    def _to_rgb_array(self, image: ImageInput) -> np.ndarray:
        """Any accepted input to an HWC uint8 RGB array, as ``PilBackend.process_image``."""
        if isinstance(image, (str, Path)):
            image = load_image(image, self.check_size)
        if isinstance(image, Image.Image):
            self.check_size(image.width, image.height)
            if self.do_convert_rgb:
                image = _pil_to_rgb(image)
            pixels = np.asarray(image)
        elif isinstance(image, np.ndarray):
            pixels = image[..., None] if image.ndim == 2 else image
            if pixels.ndim != 3 or pixels.dtype != np.uint8:
                raise ImageError(
                    f"expected a uint8 HxW or HxWxC array, got {pixels.dtype} {image.shape}")
            self.check_size(pixels.shape[1], pixels.shape[0])
            if self.do_convert_rgb:
                pixels = _array_to_rgb(pixels)
        else:
            raise ImageError(f"unsupported image type {type(image).__name__}: pass a file path, a PIL "
                             "image or a uint8 HxWxC array")
        if pixels.ndim != 3 or pixels.shape[2] != 3:
            raise ImageError(f"expected 3 channels, got shape {pixels.shape}; set do_convert_rgb")
        return pixels

    def _resize_shape(self, height: int, width: int) -> tuple[int, int]:
        """Output (height, width) of the resize, as ``get_resize_output_image_size``.

        The long edge is ``int(shortest * long / short)``: truncated, in float arithmetic.
        """
        if "shortest_edge" not in self.size:
            return self.size["height"], self.size["width"]
        target = self.size["shortest_edge"]
        short, long = (width, height) if width <= height else (height, width)
        new_long = int(target * long / short)
        return (new_long, target) if width <= height else (target, new_long)


def _pil_to_rgb(image: Image.Image) -> np.ndarray:
    """DSVL's conversion (chat.py's ``convert("RGB")``, transformers 4.33's ``convert_to_rgb``):
    transparency dropped, not composited."""
    return np.asarray(image.convert("RGB"))


def _array_to_rgb(pixels: np.ndarray) -> np.ndarray:
    """A uint8 HWC array as Pillow's ``convert("RGB")`` turns the same picture: gray repeated,
    alpha dropped."""
    channels = pixels.shape[2]
    if channels == 1:
        return np.repeat(pixels, 3, axis=2)
    if channels == 4:
        return np.ascontiguousarray(pixels[..., :3])
    return pixels


def _center_crop(chw: np.ndarray, crop_h: int, crop_w: int) -> np.ndarray:
    """transformers' ``center_crop``: offsets floor ``(size - crop) / 2``; zero-pads if too small.

    Padding puts the image at ``ceil((crop - size) / 2)``, so an odd surplus goes to the top/left.
    """
    _, height, width = chw.shape
    top, left = (height - crop_h) // 2, (width - crop_w) // 2
    if top >= 0 and left >= 0:
        return chw[:, top : top + crop_h, left : left + crop_w]
    new_h, new_w = max(crop_h, height), max(crop_w, width)
    top_pad, left_pad = math.ceil((new_h - height) / 2), math.ceil((new_w - width) / 2)
    padded = np.zeros((chw.shape[0], new_h, new_w), dtype=chw.dtype)
    padded[:, top_pad : top_pad + height, left_pad : left_pad + width] = chw
    top, left = top + top_pad, left + left_pad
    return padded[:, top : top + crop_h, left : left + crop_w]
