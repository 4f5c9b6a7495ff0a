"""Write the preprocessing fixture the tests compare against: pixel values computed by DSVL's
own ``CLIPImageProcessor`` (transformers 4.33), for odd image sizes and modes and for both
config styles (CLIP's dict sizes; Qwen-VL's plain integers, as in DSVL's helper/qwen_clip).

Run it in the environment described in scripts/make_tokenizer_fixtures.py (plus Pillow), never
in CI:

    /tmp/hf433/bin/pip install Pillow "numpy<2"
    /tmp/hf433/bin/python scripts/make_preprocess_fixtures.py tests/data/preprocess_hf433.npz
"""

from __future__ import annotations

import json
import sys

import numpy as np
from PIL import Image

CONFIGS = {
    "clip": {"size": {"shortest_edge": 56}, "crop_size": {"height": 56, "width": 56},
             "do_center_crop": True, "do_normalize": True, "do_resize": True, "resample": 3,
             "image_mean": [0.48145466, 0.4578275, 0.40821073],
             "image_std": [0.26862954, 0.26130258, 0.27577711]},
    "qwen-style": {"size": 48, "crop_size": 48, "do_center_crop": True, "do_normalize": True,
                   "do_resize": True, "resample": 3, "feature_extractor_type": "CLIPFeatureExtractor",
                   "image_mean": [0.48145466, 0.4578275, 0.40821073],
                   "image_std": [0.26862954, 0.26130258, 0.27577711]},
}
# (height, width, PIL mode)
IMAGES = [(37, 91, "RGB"), (120, 45, "RGBA"), (64, 64, "L"), (50, 300, "P"), (20, 20, "RGB"),
          (57, 56, "RGB")]


def make_images() -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    return [rng.integers(0, 256, (h, w, 4 if mode == "RGBA" else 3), dtype=np.uint8)
            for h, w, mode in IMAGES]


def to_pil(pixels: np.ndarray, mode: str) -> Image.Image:
    if mode == "RGBA":
        return Image.fromarray(pixels, "RGBA")
    image = Image.fromarray(pixels, "RGB")
    if mode == "L":
        return image.convert("L")
    if mode == "P":
        return image.convert("P", palette=Image.ADAPTIVE, colors=32)
    return image


def main(out: str) -> None:
    import transformers
    from transformers import CLIPImageProcessor

    assert transformers.__version__.startswith("4.33"), "run with DSVL's transformers 4.33"
    arrays = {"images_json": np.frombuffer(json.dumps(IMAGES).encode(), np.uint8),
              "configs_json": np.frombuffer(json.dumps(CONFIGS).encode(), np.uint8)}
    for i, pixels in enumerate(make_images()):
        arrays[f"input_{i}"] = pixels
        for name, config in CONFIGS.items():
            processor = CLIPImageProcessor(**config)
            image = to_pil(pixels, IMAGES[i][2])
            # chat.py: Image.open(path).convert('RGB'), then preprocess
            arrays[f"{name}_{i}"] = processor.preprocess(image.convert("RGB"), return_tensors="np")[
                "pixel_values"][0].astype(np.float32)
    np.savez_compressed(out, **arrays)
    print(f"wrote {out}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "tests/data/preprocess_hf433.npz")
