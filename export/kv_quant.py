"""An int8 KV cache for a fused decoder (``export.quantize --kv-cache int8``, ``export.quantize_kv``).

A decode step reads the whole cache: on a 2-core CPU at 1024 cached positions, `small`'s fp32
cache (33.5 MB) costs as much as its int4 weights. ONNX Runtime's GroupQueryAttention can store
the cache as int8 with fixed scales (``kv_cache_bit_width=8``, ``k_quant_type``/``v_quant_type``,
``k_scale``/``v_scale`` inputs), quantizing each new key and value as it writes them, and
computing the attention from the int8 values: a quarter of the bytes per step.

The scales are fixed, so they are calibrated here, once: a decoder answers a calibration round
(DSVL's template, one synthetic image, a fixed question, greedy tokens) and every layer's cached
keys and values give their largest magnitude / 127, per tensor or per (head, channel). Values
beyond it saturate at +-127 steps. Measured on SmolLM2-135M's real weights (docs/design.md):
per-tensor maxima from one round clip 0.002% of later values, and a margin only coarsens the
steps (worse logits); per-channel maxima come from fewer values each and clip 0.16%, 0.014%
with a 1.25 margin, which gives the closest logits of all. Keys are cached after the rotary
embedding, which moves magnitude between channels i and i + head_dim/2 with the position, so
per channel the two share the larger of their maxima.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper
from onnx import helper as oh

from export.common import ExportError, Progress
from runtime import contract as c

if TYPE_CHECKING:
    from runtime.manifest import DecoderSection

BITS = 8
GRANULARITIES = {"tensor": "PER_TENSOR", "channel": "PER_CHANNEL"}  # flag value -> ONNX Runtime's
SCALES_NAMES = {"tensor": "per-tensor", "channel": "per-channel"}  # -> the manifest's record
DEFAULT_GRANULARITY = "tensor"
# GroupQueryAttention's inputs: k_scale and v_scale follow 12 others (unused ones left empty).
K_SCALE_INPUT, V_SCALE_INPUT = 12, 13
CALIBRATION_QUESTION = ("Describe this picture in detail: the objects in it, their colours and "
                        "shapes, where each one is, and what might happen next.")
CALIBRATION_TOKENS = 32  # greedy tokens after the prompt, so decode-step keys are seen too
CALIBRATION_IMAGE_SIZE = 224
# Positions the calibration's pipelines allocate a cache for: the round needs ~400 (411 with
# CLIP's 257 image tokens), and a 7B's full 4096-position fp32 cache would be 4.3 GB.
CALIBRATION_CONTEXT = 1024
CHANNEL_MARGIN = 1.25  # per-channel maxima x this (see the docstring); per-tensor: none
EPSILON = 1e-6  # a scale for a tensor that was all zeros in the calibration


@dataclass
class KvScales:
    """Per layer, the key and value scales (float32, [1] or [1, kv_heads, 1, head_dim])."""

    granularity: str
    keys: list[np.ndarray]
    values: list[np.ndarray]
    positions: int  # how many cached positions the calibration saw
    answer: list[int]  # the calibrating decoder's greedy answer to the round
    finite: bool  # whether every logit of that answer was finite

    def description(self) -> str:
        return (f"{self.positions} positions: DSVL's template, one synthetic image, a fixed "
                f"question and {CALIBRATION_TOKENS} greedy tokens (export/kv_quant.py)")

    def record(self, decoder: DecoderSection, calibrated_on: str) -> None:
        """Say in the manifest's decoder section (runtime.manifest.DecoderSection) that its
        cache is int8, and how the scales were made."""
        from runtime.manifest import KvCacheQuantization

        decoder.kv_cache_dtype = "int8"
        decoder.kv_cache_quantization = KvCacheQuantization(
            bits=BITS, scales=SCALES_NAMES[self.granularity], calibrated_on=calibrated_on,
            calibration=self.description())

    def summary(self) -> str:
        """One line for the CLI: what the calibration saw and the scales' ranges."""

        def span(scales: list[np.ndarray]) -> str:
            return f"{min(float(x.min()) for x in scales):.3g}-{max(float(x.max()) for x in scales):.3g}"

        return (f"{self.positions} cached positions seen; key scales {span(self.keys)}, value "
                f"scales {span(self.values)}")


def check_cache_mode(decoder: DecoderSection, artifacts: Path) -> None:
    """An int8 cache needs the fused graph's in-place GroupQueryAttention cache."""
    if decoder.kv_cache != c.KV_SHARED or decoder.graph != c.GRAPH_FUSED:
        raise ExportError(f"an int8 KV cache needs the in-place cache of a fused graph; {artifacts} "
                          f"has a {decoder.graph} graph with a {decoder.kv_cache} cache: re-export with "
                          "`python -m export.all` (default --decoder-graph fused --kv-cache auto)")
    if decoder.kv_cache_dtype is not None:
        raise ExportError(f"{artifacts}'s KV cache is already {decoder.kv_cache_dtype}: quantize the "
                          "export it was made from instead")


def calibration_image(size: int = CALIBRATION_IMAGE_SIZE) -> np.ndarray:
    """A seeded HWC uint8 image: smooth colour gradients under some noise, like a photo's
    mix of flat areas and edges."""
    y, x = np.mgrid[0:size, 0:size] / size
    base = np.stack([x, y, 1 - (x + y) / 2], axis=-1) * 200
    noise = np.random.default_rng(0).normal(0, 25, (size, size, 3))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def scales_from(cached: list[np.ndarray], granularity: str) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Scales from each cache tensor's calibration values [kv_heads, positions, head_dim]
    (contract order: key 0, value 0, key 1, ...): the largest magnitude / 127; per channel,
    times CHANNEL_MARGIN, a key's rotary channel pair sharing the larger maximum."""
    keys, values = [], []
    for index, tensor in enumerate(cached):
        magnitude = np.abs(tensor.astype(np.float32))
        if granularity == "tensor":
            bound = np.array([magnitude.max(initial=0.0)])
        else:
            bound = magnitude.max(axis=1, initial=0.0)  # [H, D]
            if index % 2 == 0:  # a key: rotation moves magnitude between i and i + D/2
                half = bound.shape[-1] // 2
                shared = np.maximum(bound[:, :half], bound[:, half:])
                bound = np.concatenate([shared, shared], axis=-1)
            bound = bound[None, :, None, :] * CHANNEL_MARGIN  # [1, H, 1, D]
        scale = np.maximum(bound / 127.0, EPSILON).astype(np.float32)
        (keys if index % 2 == 0 else values).append(scale)
    return keys, values


def calibrate(artifacts: Path, granularity: str) -> KvScales:
    """Run the export's decoder on the calibration round and read its cache."""
    from runtime.pipeline import Pipeline
    from runtime.sampling import SamplingOptions

    finite: list[bool] = []
    with Pipeline.from_artifacts(artifacts, max_context=CALIBRATION_CONTEXT, huge_pages=False) as pipe:
        images = [calibration_image()] if pipe.artifacts.vision is not None else []
        result = pipe.generate(images, CALIBRATION_QUESTION, SamplingOptions(max_new_tokens=CALIBRATION_TOKENS),
                               on_step=lambda logits, tokens: finite.append(bool(np.isfinite(logits).all())))
        cached = pipe.decoder.cached_values()
    keys, values = scales_from(cached, granularity)
    return KvScales(granularity, keys, values, cached[0].shape[1], result.tokens, all(finite))


def calibrate_step(artifacts: Path, granularity: str, progress: Progress) -> KvScales:
    """``calibrate`` as one step of a command's progress, with its summary line."""
    with progress.step(f"calibrating {SCALES_NAMES[granularity]} int8 KV scales on {artifacts}"):
        scales = calibrate(artifacts, granularity)
        print(f"      {scales.summary()}")
    return scales


def quantize_cache(model: onnx.ModelProto, scales: KvScales) -> onnx.ModelProto:
    """Make every past/present tensor int8 and each layer's GroupQueryAttention quantize to
    and read from it with the calibrated scales (in place; returns ``model``)."""
    graph = model.graph
    layers = len(scales.keys)
    cache_names = {name for pair in c.cache_name_pairs(layers) for name in pair}
    typed = [t for t in list(graph.input) + list(graph.output) if t.name in cache_names]
    if len(typed) != len(cache_names):
        raise ExportError("decoder.onnx does not have the contract's cache inputs and outputs: "
                          "re-export it with `python -m export.all`")
    for tensor in typed:
        tensor.type.tensor_type.elem_type = TensorProto.INT8
    present_layer = {c.present_key_name(i): i for i in range(layers)}
    attention = [n for n in graph.node if n.op_type == "GroupQueryAttention"]
    if len(attention) != layers or any(len(n.output) < 2 or n.output[1] not in present_layer
                                       for n in attention):
        raise ExportError("an int8 KV cache needs a decoder whose cache is written by "
                          "GroupQueryAttention, one per layer: export with --decoder-graph fused "
                          "--kv-cache shared (export.all's default)")
    kind = GRANULARITIES[scales.granularity]
    for node in attention:
        layer = present_layer[node.output[1]]
        inputs = list(node.input) + [""] * max(0, K_SCALE_INPUT - len(node.input))
        key_scale, value_scale = f"kv_cache.{layer}.key_scale", f"kv_cache.{layer}.value_scale"
        inputs[K_SCALE_INPUT:V_SCALE_INPUT + 1] = [key_scale, value_scale]
        del node.input[:]
        node.input.extend(inputs)
        node.attribute.extend([oh.make_attribute("k_quant_type", kind),
                               oh.make_attribute("v_quant_type", kind),
                               oh.make_attribute("kv_cache_bit_width", BITS)])
        graph.initializer.extend([numpy_helper.from_array(scales.keys[layer], key_scale),
                                  numpy_helper.from_array(scales.values[layer], value_scale)])
    return model
