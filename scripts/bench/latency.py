"""Vision + projector latency, and time to the first token: PyTorch against the runtime on the
same inputs, timed repeats interleaved."""

from __future__ import annotations

import functools

import numpy as np
import torch

from dsvl.config import VIS_PROJS
from dsvl.generate import position_ids_for
from runtime.backends.ort import OrtVisionRunner
from runtime.pipeline import Pipeline
from scripts.bench.settings import Settings
from scripts.bench.timing import interleaved, log


def bench_vision(settings: Settings, exports: dict, model, pipe: Pipeline, size: int) -> dict:
    results = {}
    rng = np.random.default_rng(0)
    for vis_proj in VIS_PROJS:
        if vis_proj == "perceiver":
            torch_vision, ort_vision = model.vision().eval(), pipe.vision
        else:
            torch_vision = exports["torch_vision"][vis_proj]
            ort_vision = OrtVisionRunner(exports["vision_files"][vis_proj],
                                         exports["vision_sections"][vis_proj], threads=settings.threads)
        results[vis_proj] = {}
        for images in (1, 4):
            pixels = rng.standard_normal((images, 3, size, size)).astype(np.float32)
            pixels_t = torch.from_numpy(pixels)
            with torch.no_grad():
                want = torch_vision(pixels_t).numpy()
            err = float(np.abs(ort_vision.encode(pixels) - want).max())

            def run_torch(vision=torch_vision, px=pixels_t):
                with torch.no_grad():
                    return vision(px)

            timing = interleaved({"pytorch": run_torch,
                                  "ort": functools.partial(ort_vision.encode, pixels)},
                                 settings.repeats, settings.warmup)
            timing["ratio"] = timing["ort"]["median_ms"] / timing["pytorch"]["median_ms"]
            timing["max_abs_err"] = err
            results[vis_proj][str(images)] = timing
            log(f"      vision {vis_proj} x{images}: PyTorch {timing['pytorch']['median_ms']:.1f} ms, "
                f"ORT {timing['ort']['median_ms']:.1f} ms (max|err| {err:.1e})")
        if ort_vision is not pipe.vision:
            ort_vision.close()
    return results


def bench_first_token(settings: Settings, model, pipes: dict[str, Pipeline], ids: list[int],
                      pixels: np.ndarray) -> dict:
    """Vision + splice + prompt pass, to the first token's logits (preprocessing excluded)."""
    decoder = model.lang_decoder
    ids_t, pixels_t = torch.tensor(ids), torch.from_numpy(pixels)

    @torch.no_grad()
    def run_torch():
        embeds, mask = model.splice(ids_t, model.encode_images(pixels_t))
        logits, _ = decoder(embeds, mask, position_ids_for(mask), decoder.empty_cache())
        return int(logits[0, -1].argmax())

    def run_ort(pipe: Pipeline):
        embeds, mask = pipe.splice(ids, pipe.vision.encode(pixels))
        pipe.reset()
        return int(np.argmax(pipe.prefill(embeds, mask)))

    fns = {"pytorch": run_torch} | {name: functools.partial(run_ort, p) for name, p in pipes.items()}
    result = interleaved(fns, settings.repeats, settings.warmup)
    result["prompt_positions"] = len(ids) - 1 + pipes["fp32"].artifacts.vision.image_tokens
    return result
