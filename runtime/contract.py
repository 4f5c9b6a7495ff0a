"""The artefact contract's names: files, ONNX tensors, mask values, KV-cache modes and dtypes.

Exporters write what this module names and every runtime backend reads it; tests check both
against it. The rest of the contract builds on these names: runtime/graphs.py (each graph's
inputs and outputs with their axes) and runtime/manifest.py (the typed manifest). No torch
here: the runtime imports this module on edge devices.
"""

from __future__ import annotations

import numpy as np

from runtime.errors import ArtifactError  # noqa: F401  (re-exported: the contract's error)

FORMAT = "dsvl-edge"
FORMAT_VERSION = 1  # runtime/manifest.py: what older and newer versions get
MANIFEST_NAME = "manifest.json"
STAMP_NAME = ".manifest.verified.json"  # runtime/integrity.py: files fully hashed, by stat
PREPROCESSOR_NAME = "preprocessor_config.json"

VISION_FILE = "vision.onnx"
DECODER_FILE = "decoder.onnx"
EXTERNAL_DATA_SUFFIX = ".data"  # ONNX external data beside a large graph: vision.onnx.data
PROMPT_EMBED_FILE = "lang_embed.npy"  # DSVL's lang_embed: embeds the prompt
DECODER_EMBED_FILE = "embed_tokens.npy"  # the decoder's embed_tokens: embeds generated tokens
TOKENIZER_DIR = "tokenizer"
TOKENIZER_FILE = "tokenizer.json"  # inside TOKENIZER_DIR
ENGINES_DIR = "engines"
VISION_PLAN = "vision.plan"  # inside ENGINES_DIR
DECODER_PLAN = "decoder.plan"
TIMING_CACHE = "timing.cache"
ORT_TRT_CACHE = "ort-trt"  # ONNX Runtime's TensorRT provider caches its engines here

# vision.onnx
VISION_INPUT = "pixel_values"  # [images, 3, H, W] float
VISION_OUTPUT = "image_embeds"  # [images, tokens, lang_dim]

# decoder.onnx (names as Optimum / ONNX Runtime GenAI use them)
INPUTS_EMBEDS = "inputs_embeds"  # [batch, seq, hidden]
ATTENTION_MASK = "attention_mask"  # [batch, past + seq] int64: 0 pad, 1 text, 2 image
POSITION_IDS = "position_ids"  # [batch, seq] int64
LOGITS = "logits"  # [batch, seq, vocab]
# Fused (ONNX Runtime) decoder graphs only: int64 scalar, 0 = logits for every position, k = the
# last k only (a prompt pass needs one row of the LM head, not S).
LOGITS_TO_KEEP = "logits_to_keep"
# Fused decoder graphs only, optional (exports before it lack it): int64 [batch, logits rows], each
# logits row's greedy pick, the first index of its maximum (numpy's argmax). The generation loop
# reads it instead of scanning the logits in Python (docs/design.md, "The greedy pick in the graph").
NEXT_TOKEN = "next_token"

MASK_PAD, MASK_TEXT, MASK_IMAGE = 0, 1, 2

PAST_PREFIX, PRESENT_PREFIX = "past_key_values.", "present."  # Optimum / ORT GenAI names
PAST_GLOB = PAST_PREFIX + "*"  # every layer's cache input, in manifests and engine metadata

# The decoder's KV cache: the --kv-cache flag's value -> the manifest's decoder.kv_cache.
KV_CONCAT = "concat"  # present = concat(past, new): standard ops, ONNX Runtime and TensorRT, MMCA
KV_SHARED = "shared-buffer"  # one buffer updated in place (GroupQueryAttention): ONNX Runtime only
KV_FLAG_CONCAT, KV_FLAG_SHARED = "concat", "shared"  # the flag's values (and the graph builder's)
KV_CACHE_FLAGS = {KV_FLAG_CONCAT: KV_CONCAT, KV_FLAG_SHARED: KV_SHARED}
KV_CACHE_MODES = tuple(KV_CACHE_FLAGS.values())
# A shared-buffer cache may be stored quantized (export.quantize --kv-cache int8): the
# manifest's decoder.kv_cache_dtype, where it is not the graph's float type.
KV_CACHE_DTYPES = ("int8",)

# How decoder.onnx was made (export/decoder_graph.py): ONNX Runtime's fused contrib ops, plain
# ONNX ops (what TensorRT parses), or the PyTorch tracer (manifests from before the builder).
GRAPH_FUSED, GRAPH_STANDARD, GRAPH_TRACED = "fused", "standard", "traced"
DECODER_GRAPHS = (GRAPH_FUSED, GRAPH_STANDARD, GRAPH_TRACED)

# ------------------------------------------------------------------ dtypes
# One map for the whole package: dtype names as the manifest writes them, and how numpy,
# ONNX and TensorRT spell each one.
PRECISIONS = ("fp32", "fp16")
IO_DTYPES = {"fp32": "float32", "fp16": "float16"}  # export precision -> graph float I/O type
NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "int32": np.int32,
                "int8": np.int8, "uint8": np.uint8, "bool": np.bool_}
ONNX_DTYPES = {1: "float32", 10: "float16", 16: "bfloat16", 7: "int64", 6: "int32", 3: "int8",
               2: "uint8", 9: "bool"}  # onnx.TensorProto element types
ORT_DTYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(bfloat16)": "bfloat16",
              "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(int8)": "int8",
              "tensor(uint8)": "uint8", "tensor(bool)": "bool"}  # onnxruntime NodeArg.type
TENSORRT_DTYPES = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT64": "int64",
                   "INT32": "int32", "INT8": "int8", "UINT8": "uint8", "BOOL": "bool"}  # trt.DataType


def io_dtype(precision: str) -> str:
    return IO_DTYPES[precision]


def precision_of(dtype_name: str) -> str:
    """'float16' -> 'fp16' (an engine's precision, read off its float input)."""
    return {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}.get(dtype_name, dtype_name)


def numpy_dtype(dtype_name: str) -> type:
    """The numpy type of a dtype name (a manifest ``io_dtype`` such as ``float32``)."""
    return NUMPY_DTYPES[dtype_name]


def tensorrt_dtype_name(trt_dtype: object) -> str:
    """A ``trt.DataType`` member as a dtype name ('float16'); unknown ones lower-cased."""
    raw = getattr(trt_dtype, "name", str(trt_dtype).rsplit(".", 1)[-1])
    return TENSORRT_DTYPES.get(raw, raw.lower())


# ------------------------------------------------------------------ cache tensor names
def is_past_name(name: str) -> bool:
    return name.startswith(PAST_PREFIX)


def is_present_name(name: str) -> bool:
    return name.startswith(PRESENT_PREFIX)


def past_key_name(layer: int) -> str:
    return f"{PAST_PREFIX}{layer}.key"


def past_value_name(layer: int) -> str:
    return f"{PAST_PREFIX}{layer}.value"


def present_key_name(layer: int) -> str:
    return f"{PRESENT_PREFIX}{layer}.key"


def present_value_name(layer: int) -> str:
    return f"{PRESENT_PREFIX}{layer}.value"


def cache_name_pairs(num_layers: int) -> list[tuple[str, str]]:
    """(past, present) names of every cache tensor: layer by layer, key then value."""
    return [pair for layer in range(num_layers)
            for pair in ((past_key_name(layer), present_key_name(layer)),
                         (past_value_name(layer), present_value_name(layer)))]


def decoder_input_names(num_layers: int) -> list[str]:
    return [INPUTS_EMBEDS, ATTENTION_MASK, POSITION_IDS] + [p for p, _ in cache_name_pairs(num_layers)]


def decoder_output_names(num_layers: int) -> list[str]:
    return [LOGITS] + [p for _, p in cache_name_pairs(num_layers)]
