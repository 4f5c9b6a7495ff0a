"""export.quantize --kv-cache int8 and export.quantize_kv (export/kv_quant.py): the cache stored
in 8 bits with calibrated scales, recorded in the manifest, run unchanged by the runtime, close
to the float cache's answers; refused, in one line, where there is no in-place
GroupQueryAttention cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

import export.quantize as q
from export.common import ExportError
from export.kv_quant import calibration_image, scales_from
from runtime import contract as c
from runtime.manifest import read_manifest
from runtime.pipeline import Pipeline
from runtime.sampling import SamplingOptions
from tests.test_batching import MMCA

QUESTION = "What is in the picture?"
STEPS = 24


def image() -> np.ndarray:
    return np.random.default_rng(3).integers(0, 256, (56, 56, 3), dtype=np.uint8)


def greedy(path: Path) -> tuple[list[int], np.ndarray]:
    steps: list[np.ndarray] = []
    with Pipeline.from_artifacts(path, threads=2) as pipe:
        result = pipe.generate([image()], QUESTION, SamplingOptions(max_new_tokens=STEPS),
                               on_step=lambda logits, tokens: steps.append(logits.copy()))
    return result.tokens, np.stack(steps)


@pytest.fixture(scope="module")
def int4(exported, tmp_path_factory) -> Path:
    """The same source and weights as ``kv8_export``, with the float cache."""
    out = tmp_path_factory.mktemp("int4") / "artifacts"
    assert q.main(["--artifacts", str(exported("--vis-proj", "baseline")), "--out", str(out)]) == 0
    return out


def test_manifest_and_graph_say_int8(kv8_export: Path):
    decoder = read_manifest(kv8_export).decoder
    assert decoder.kv_cache == c.KV_SHARED and decoder.kv_cache_dtype == "int8"
    assert decoder.cache_dtype == "int8" and decoder.io_dtype == "float32"
    record = decoder.kv_cache_quantization
    assert (decoder.quantization.bits, record.bits, record.scales) == (4, 8, "per-tensor")
    assert "synthetic image" in record.calibration and "unquantized" in record.calibrated_on
    model = onnx.load(str(kv8_export / c.DECODER_FILE), load_external_data=False)
    cache = {name for pair in c.cache_name_pairs(decoder.num_layers) for name in pair}
    types = {t.name: t.type.tensor_type.elem_type for t in [*model.graph.input, *model.graph.output]}
    assert {types[name] for name in cache} == {onnx.TensorProto.INT8}
    assert types[c.INPUTS_EMBEDS] == types[c.LOGITS] == onnx.TensorProto.FLOAT
    attention = [n for n in model.graph.node if n.op_type == "GroupQueryAttention"]
    assert len(attention) == decoder.num_layers
    for node in attention:
        attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attributes["kv_cache_bit_width"] == 8
        assert attributes["k_quant_type"] == attributes["v_quant_type"] == b"PER_TENSOR"
        assert node.input[12].endswith("key_scale") and node.input[13].endswith("value_scale")


def test_answers_stay_close_to_the_float_cache(kv8_export: Path, int4: Path):
    tokens, logits = greedy(int4)
    tokens8, logits8 = greedy(kv8_export)
    # Same prompt pass; the steps differ by the cache's rounding only.
    cosine = (logits * logits8).sum(1) / np.linalg.norm(logits, axis=1) / np.linalg.norm(logits8, axis=1)
    assert cosine.min() > 0.999
    assert np.mean(np.asarray(tokens[:STEPS]) == np.asarray(tokens8[:STEPS])) >= 0.9


def test_per_channel_scales(exported, tmp_path):
    out = tmp_path / "kv8c"
    source = exported("--vis-proj", "baseline")
    assert q.main(["--artifacts", str(source), "--out", str(out), "--kv-cache", "int8",
                   "--kv-scales", "channel", "--no-check"]) == 0
    decoder = read_manifest(out).decoder
    assert decoder.kv_cache_quantization.scales == "per-channel"
    model = onnx.load(str(out / c.DECODER_FILE))
    scales = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer
              if t.name.startswith("kv_cache.")}
    assert len(scales) == 2 * decoder.num_layers
    assert {s.shape for s in scales.values()} == {(1, decoder.num_kv_heads, 1, decoder.head_dim)}
    with Pipeline.from_artifacts(out, threads=2) as pipe:
        result = pipe.generate([image()], QUESTION, SamplingOptions(max_new_tokens=4))
    assert len(result.tokens) == 4


def test_scales_per_tensor_and_per_channel():
    """Per tensor: the largest magnitude / 127. Per channel: x 1.25, and a key's channels i and
    i + D/2 (one rotary pair, which the position turns) share the larger maximum."""
    key = np.zeros((1, 2, 4), np.float32)
    key[0, 0, 0], key[0, 1, 2] = 3.0, -4.0  # channels 0 and 2: one pair
    value = np.full((1, 2, 4), -2.0, np.float32)
    keys, values = scales_from([key, value], "tensor")
    assert keys[0].shape == (1,) and np.isclose(keys[0][0], 4 / 127)
    assert np.isclose(values[0][0], 2 / 127)
    keys, values = scales_from([key, value], "channel")
    assert keys[0].shape == (1, 1, 1, 4)
    pair = 4 * 1.25 / 127
    assert np.allclose(keys[0][0, 0, 0], [pair, 1e-6, pair, 1e-6])  # a zero pair: epsilon
    assert np.allclose(values[0], 2 * 1.25 / 127)


def test_calibration_image_is_seeded():
    assert np.array_equal(calibration_image(), calibration_image())
    assert calibration_image().shape == (224, 224, 3)


def test_kv_scales_without_an_int8_cache_is_refused(exported, tmp_path):
    source = exported("--vis-proj", "baseline")
    with pytest.raises(ExportError, match="add --kv-cache int8"):
        q.main(["--artifacts", str(source), "--out", str(tmp_path / "x"), "--kv-scales", "channel"])


def test_a_concat_cache_is_refused_in_one_line(exported, tmp_path):
    source = exported(*MMCA, "--kv-cache", "concat")
    with pytest.raises(ExportError, match="an int8 KV cache needs the in-place cache of a fused graph"):
        q.main(["--artifacts", str(source), "--out", str(tmp_path / "x"), "--kv-cache", "int8"])
    assert not (tmp_path / "x").exists()


def test_quantize_kv_rewrites_only_the_graph_of_a_streamed_int4_export(exported, tmp_path, capsys):
    """export.quantize_kv: an int4 export streamed by export.all (no float model at hand) gets an
    int8 cache calibrated on itself; the weights file is the same file, linked."""
    from export import quantize_kv

    source = exported("--vis-proj", "baseline", "--weights", "int4")
    out = tmp_path / "kv8"
    assert quantize_kv.main(["--artifacts", str(source), "--out", str(out)]) == 0
    assert f"top-1 agreement {quantize_kv.CHECK_TOKENS} of {quantize_kv.CHECK_TOKENS}" in capsys.readouterr().out
    decoder = read_manifest(out).decoder
    assert decoder.kv_cache_dtype == "int8" and decoder.quantization.streamed
    assert decoder.kv_cache_quantization.calibrated_on == "its own 4-bit weights"
    data = c.DECODER_FILE + c.EXTERNAL_DATA_SUFFIX
    assert (out / data).stat().st_ino == (source / data).stat().st_ino
    assert read_manifest(source).decoder.kv_cache_dtype is None  # the source is untouched
    with Pipeline.from_artifacts(out, threads=2) as pipe:
        assert pipe.decoder.cache_dtype == np.int8
        assert len(pipe.generate([image()], QUESTION, SamplingOptions(max_new_tokens=3)).tokens) == 3
    with pytest.raises(ExportError, match="already int8"):
        quantize_kv.main(["--artifacts", str(out), "--out", str(tmp_path / "again")])
