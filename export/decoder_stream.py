"""The decoder export that never holds the model: lazy weights in, built graph out.

``DecoderWeights`` (dsvl/lazy_weights.py) hands out one tensor at a time; the graph builder
(export/decoder_graph.py) writes each to ``decoder.onnx.data`` as it goes, cast to fp16 or
quantized to int4/int8 on the way. The parity check then runs in one of two ways:

* ``full``, when the fp32 decoder fits comfortably (``FULL_CHECK_BYTES``): the eager decoder is
  built from the same weights and the whole graph runs a real spliced prompt + 4 greedy steps,
  as the traced export's check does.
* ``layers``, for larger models: for the first and the last layer in turn, the PyTorch
  reference runs that layer with lazily loaded weights (dsvl/layerwise.py) + the final norm and
  LM head, and ONNX Runtime runs a graph of the same (built over the export's own data file, no
  copy), both on the spliced prompt + 4 teacher-forced steps. Every layer is built by the same
  code, and the small-preset tests check the whole stacked graph against the tracer's, so this
  catches what only real sizes show (weights, layouts, fp16 range) within bounded memory.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from export.cli import Progress
from runtime import contract as c
from runtime.prompt import format_round

if TYPE_CHECKING:
    import torch

    from dsvl.lazy_weights import DecoderWeights
    from dsvl.loading import Loaded, WeightSource

FULL_CHECK_BYTES = 2 << 30  # fp32 decoder size up to which the eager model is built for the check
PARITY_QUESTION = "What is different between them?"
PARITY_TEACHER_TEXT = " The first image shows"  # teacher-forced decode tokens of the layer check
PARITY_FILE = ".parity-layers.onnx"  # a subset graph over decoder.onnx.data, deleted after use


def load_tokenizer_for(src: WeightSource):
    """The tokenizer ``load_model`` would build (DSVL's three tokens added)."""
    from dsvl import config as cfgmod
    from dsvl.tokenizer import load_tokenizer, preset_tokenizer

    if src.lm_model is not None:
        return load_tokenizer(src.lm_model)
    return preset_tokenizer(cfgmod.base_vocab_size(src.preset))


def open_sources(src: WeightSource):
    """(eager vision model, Loaded, tokenizer, DecoderWeights): everything but the decoder's
    tensors, which stay in their files until the builder asks for them one by one."""
    from dsvl import config as cfgmod
    from dsvl.lazy_weights import open_decoder_weights
    from dsvl.loading import load_vision

    vision, loaded = load_vision(src)
    tokenizer = load_tokenizer_for(src)
    weights = open_decoder_weights(src, len(tokenizer))
    loaded.generation = cfgmod.generation_defaults(src.lm_model)
    for note in loaded.notes + weights.notes:
        print(f"      {note}")
    return vision, loaded, tokenizer, weights


def parity_images(vision, image_size: int, seed: int) -> torch.Tensor:
    """The two seeded images of the decoder check, through the eager vision model [2, T, D]."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randn(2, 3, image_size, image_size, generator=generator)
    with torch.no_grad():
        return vision(pixels).float()


def parity_prompt(weights: DecoderWeights, tokenizer, image_embeds: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """DSVL's two-image prompt, spliced with the prompt table (lang_embed) rows."""
    import torch

    from dsvl.model import splice_embeds
    from runtime.prompt import IMAGE_TOKEN

    ids = torch.tensor(tokenizer(format_round(PARITY_QUESTION, 2)).input_ids)
    table = weights.prompt_embedding()
    embeds, mask = splice_embeds(ids, image_embeds, lambda rows: table[rows],
                                 tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))
    return embeds, mask


def decoder_bytes(weights: DecoderWeights) -> int:
    return 4 * sum(int(np.prod(weights.shape(name))) for name in weights.names())


def stream_decoder(weights: DecoderWeights, tokenizer, loaded: Loaded, stage: Path, precision: str,
                   graph: str, kv_cache: str, weight_format: str, image_embeds: torch.Tensor,
                   progress: Progress, check: str = "auto"):
    """Build decoder.onnx, the embedding tables and the tokenizer into ``stage``, then check."""
    from export import decoder as dec

    kv_cache = dec.resolve_kv_cache(kv_cache, graph, weights.mmca)
    dec.check_graph_choice(graph, kv_cache, weight_format, weights.mmca)
    spec = dec.graph_spec(weights.config, weights.mmca, precision, graph, kv_cache, weight_format)
    what = f"{graph} ops" + (f", {weight_format} weights" if weight_format != "float" else "")
    with progress.step(f"building decoder.onnx ({precision}, {what}, {spec.num_layers} layers, "
                       f"MMCA {'on' if weights.mmca else 'off'}, {kv_cache} KV cache), "
                       "streaming the weights"):
        tensors = dec.write_decoder_graph(stage, spec, LayerProgress(weights, spec.num_layers))
    with progress.step("writing embedding tables and tokenizer"):
        np_dtype = c.numpy_dtype(c.io_dtype(precision))
        np.save(stage / c.PROMPT_EMBED_FILE, weights.prompt_embedding().numpy().astype(np_dtype))
        np.save(stage / c.DECODER_EMBED_FILE,
                weights.get("model.embed_tokens.weight").numpy().astype(np_dtype))
        tokenizer.save(stage / c.TOKENIZER_DIR)
    if check == "auto":
        check = "full" if decoder_bytes(weights) <= FULL_CHECK_BYTES else "layers"
    layers = sorted({0, spec.num_layers - 1})
    label = ("prompt pass + 4 decode steps" if check == "full" else
             f"layers {layers} one at a time + norm + LM head, lazily loaded PyTorch reference, "
             "prompt pass + 4 teacher-forced steps")
    with progress.step(f"checking ONNX Runtime (CPU) against PyTorch: {label}"):
        embeds, mask = parity_prompt(weights, tokenizer, image_embeds)
        if check == "full":
            from dsvl.lazy_weights import materialize_decoder

            parity = dec.check_decoder(materialize_decoder(weights), embeds, mask,
                                       stage / c.DECODER_FILE, precision, dec.is_shared(kv_cache))
        else:
            parity = check_layers(weights, tokenizer, spec, tensors, stage, embeds, mask, layers)
    return dec.checked_export(weights.config, weights.mmca, loaded, tokenizer, stage, precision,
                              graph, kv_cache, weight_format, parity, check)


class LayerProgress:
    """The builder's weight reader, printing a line as each layer starts (minutes at 7B)."""

    def __init__(self, weights: DecoderWeights, num_layers: int):
        self.weights, self.num_layers, self.seen = weights, num_layers, -1

    def __call__(self, name: str) -> np.ndarray:
        if name.startswith("model.layers."):
            index = int(name.split(".")[2])
            if index > self.seen:
                self.seen = index
                if self.num_layers >= 8 and index % max(1, self.num_layers // 8) == 0:
                    print(f"      layer {index + 1}/{self.num_layers}", flush=True)
        return self.weights.get(name).numpy()


def check_layers(weights: DecoderWeights, tokenizer, spec, tensors: dict, stage: Path,
                 embeds: torch.Tensor, mask: torch.Tensor, layers: list[int]) -> list[dict]:
    """The bounded check, one layer at a time: a graph of that layer + norm + LM head over the
    export's own data file, against the PyTorch reference of the same layer. (ONNX Runtime's
    CPU provider keeps fp32 copies of fp16 weights, so one layer per session bounds memory.)"""
    tokens = tokenizer.backend.encode(PARITY_TEACHER_TEXT, add_special_tokens=False).ids[:4]
    results = []
    for index in layers:
        results += _check_layer(weights, spec, tensors, stage, embeds, mask, tokens, index)
    return results


def _check_layer(weights: DecoderWeights, spec, tensors: dict, stage: Path, embeds: torch.Tensor,
                 mask: torch.Tensor, tokens: list[int], index: int) -> list[dict]:
    import onnx
    import torch

    from dsvl.layerwise import LayerwiseReference
    from export import decoder as dec
    from export.cache_feed import CacheFeed
    from export.common import compare, ort_session
    from export.decoder_graph import DecoderGraphBuilder

    want = LayerwiseReference(weights, [index]).run(embeds, mask, tokens)
    path = stage / PARITY_FILE
    onnx.save(DecoderGraphBuilder(dataclasses.replace(spec, layers=[index]), read=None,
                                  reuse=tensors).build(), str(path))
    try:
        length = mask.shape[1] + len(tokens) if dec.is_shared(spec.kv_cache) else 0
        run = CacheFeed(ort_session(path, spec.precision), spec.num_kv_heads, spec.head_dim, length)
        rows = weights.embedding_rows(tokens)
        passes = [(embeds, mask)]
        for i in range(len(tokens)):
            passes.append((rows[i].view(1, 1, -1), torch.cat(
                [passes[-1][1], torch.full((1, 1), c.MASK_TEXT, dtype=mask.dtype)], 1)))
        results = []
        for i, ((step_embeds, step_mask), reference) in enumerate(zip(passes, want, strict=True)):
            logits = run(step_embeds.numpy(), step_mask.numpy())
            name = f"prompt pass ({step_mask.shape[1]} positions)" if i == 0 else f"decode step {i}"
            results.append(compare(f"{name}, layer {index}", logits, reference.numpy()))
        del run  # the session, before its graph file goes
    finally:
        os.remove(path)
    return results
