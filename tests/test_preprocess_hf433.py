"""Preprocessing equals DSVL's own CLIPImageProcessor (transformers 4.33) bit for bit.

The expected pixel values were computed with transformers 4.33.3 by
scripts/make_preprocess_fixtures.py (odd sizes, RGBA/L/P modes, images smaller than the crop;
CLIP's dict-style config and Qwen-VL's integer-style one).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from runtime.preprocess import ImagePreprocessor, load_image

FIXTURE = np.load(Path(__file__).parent / "data" / "preprocess_hf433.npz")
IMAGES = json.loads(bytes(FIXTURE["images_json"]))
CONFIGS = json.loads(bytes(FIXTURE["configs_json"]))


def as_file(tmp_path: Path, index: int) -> Path:
    """The fixture's input as the file a user would pass (PNG keeps every mode losslessly)."""
    height, width, mode = IMAGES[index]
    pixels = FIXTURE[f"input_{index}"]
    image = Image.fromarray(pixels, "RGBA" if mode == "RGBA" else "RGB")
    if mode == "L":
        image = image.convert("L")
    elif mode == "P":
        image = image.convert("P", palette=Image.ADAPTIVE, colors=32)
    path = tmp_path / f"image{index}.png"
    image.save(path)
    return path


@pytest.mark.parametrize("config", sorted(CONFIGS))
@pytest.mark.parametrize("index", range(len(IMAGES)))
def test_pixels_equal_transformers_433(tmp_path, config, index):
    preprocessor = ImagePreprocessor.from_dict(CONFIGS[config])
    want = FIXTURE[f"{config}_{index}"]
    got = preprocessor([load_image(as_file(tmp_path, index))])[0]
    assert got.shape == want.shape
    assert np.array_equal(got, want)
