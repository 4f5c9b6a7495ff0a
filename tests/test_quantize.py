"""python -m export.quantize on a tiny export: a complete artefact directory the runtime opens
unchanged, its manifest rewritten (file entry, sha256, quantization), written atomically."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

import export.all as export_all
import export.quantize as q
from export.common import ExportError, Progress
from runtime.artifacts import load_table
from runtime.contract import DECODER_FILE, MANIFEST_NAME
from runtime.hashing import sha256_file
from runtime.manifest import read_manifest
from runtime.pipeline import Pipeline
from runtime.sampling import SamplingOptions

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("quantize") / "artifacts"
    assert export_all.main(["--preset", "tiny", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def int4(artifacts: Path) -> Path:
    assert q.main(["--artifacts", str(artifacts), "--bits", "4"]) == 0
    return Path(f"{artifacts}-int4")


def op_types(path: Path) -> set[str]:
    return {node.op_type for node in onnx.load(str(path)).graph.node}


def matmul_weight_bytes(path: Path) -> int:
    """Bytes of the constant weights of MatMul (input B) and MatMulNBits (packed B + scales)."""
    model = onnx.load(str(path))
    sizes = {t.name: onnx.numpy_helper.to_array(t).nbytes for t in model.graph.initializer}
    used = [name for node in model.graph.node if node.op_type in ("MatMul", "MatMulNBits")
            for name in (node.input[1:3] if node.op_type == "MatMulNBits" else node.input[1:2])]
    return sum(sizes.get(name, 0) for name in used)


def image(size: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)


def test_int4_manifest_and_files(artifacts: Path, int4: Path):
    source = read_manifest(artifacts)
    manifest = read_manifest(int4)
    decoder = manifest.decoder
    entry = decoder.file
    assert entry.sha256 == sha256_file(int4 / entry.path)
    assert entry.bytes == (int4 / entry.path).stat().st_size
    assert entry.sha256 != source.decoder.file.sha256
    # The multiplied weights shrink to 4 bits + one fp32 scale per 32 (the graph's other
    # constants, e.g. the rotary tables, stay as they are): (0.5 + 4/32) / 4 = 0.156 of fp32.
    assert matmul_weight_bytes(int4 / entry.path) <= 0.157 * matmul_weight_bytes(
        artifacts / source.decoder.file.path)
    quant = decoder.quantization
    assert quant.bits == 4 and quant.block_size == 32 and quant.method == "MatMulNBits"
    assert quant.symmetric is True and quant.quantized_matmuls > 0
    assert quant.source_sha256 == source.decoder.file.sha256
    # the recorded check is what running both decoders on the seeded prompt gives, and int4
    # keeps most of the 16 top-1 tokens of the fp32 decoder
    table = load_table(artifacts / source.decoder.prompt_embeddings.path, artifacts)
    again = q.check_quantized(artifacts / DECODER_FILE, int4 / DECODER_FILE, source.decoder, table, 0)
    assert quant.check == again and quant.check.finite
    assert quant.check.top1_agreement * q.CHECK_POSITIONS == round(quant.check.top1_agreement * q.CHECK_POSITIONS)
    assert quant.check.top1_agreement >= 0.75, quant.check
    # everything else is the source's, unchanged
    unchanged = {k: v for k, v in decoder.to_dict().items() if k not in ("file", "quantization")}
    assert unchanged == {k: v for k, v in source.decoder.to_dict().items() if k != "file"}
    for section in ("vision", "tokenizer", "precision"):
        assert getattr(manifest, section) == getattr(source, section)
    for other in (manifest.vision.file, decoder.prompt_embeddings, decoder.decoder_embeddings):
        assert sha256_file(int4 / other.path) == other.sha256
    assert "MatMulNBits" in op_types(int4 / DECODER_FILE)
    assert "MatMulNBits" not in op_types(artifacts / DECODER_FILE)  # the source is untouched
    assert source.decoder.file.sha256 == sha256_file(artifacts / DECODER_FILE)
    assert not [p for p in int4.parent.iterdir() if p.name.startswith(".")]  # no staging left


def test_int4_pipeline_generates(artifacts: Path, int4: Path):
    pipe = Pipeline.from_artifacts(int4, verify_hash=True)
    size = pipe.artifacts.vision.image_size
    result = pipe.generate([image(size)], "What is in the image?", SamplingOptions(max_new_tokens=6))
    assert 1 <= len(result.tokens) <= 6
    assert all(0 <= t < pipe.artifacts.decoder.vocab_size for t in result.tokens)
    # the prompt pass is close to the fp32 decoder's (same prompt, same image)
    ref = Pipeline.from_artifacts(artifacts)
    ids = ref.tokenizer.encode("### Question:\nhello\n\n### Answer:\n")
    embeds, mask = ref.splice(ids, ref.encode_images([]))
    want, got = ref.prefill(embeds, mask), pipe.prefill(embeds, mask)
    assert np.isfinite(got).all()
    assert np.abs(got - want).max() < 0.5 * np.abs(want).max()


def test_int8_when_supported(artifacts: Path, tmp_path: Path):
    out = tmp_path / "int8"
    if 8 not in q.quantizer_bits():
        with pytest.raises(ExportError, match="supports only"):
            q.quantize_artifacts(artifacts, out, 8, 32, 4, False, 0, Progress(2))
        return
    manifest = q.quantize_artifacts(artifacts, out, 8, 32, 4, True, 0, Progress(3))
    assert manifest.decoder.quantization.bits == 8
    assert manifest.decoder.quantization.check.top1_agreement >= 0.9
    pipe = Pipeline.from_artifacts(out, verify_hash=True)
    size = pipe.artifacts.vision.image_size
    assert pipe.generate([image(size)], "Describe it.", SamplingOptions(max_new_tokens=3)).tokens


def test_lm_head_bits_quantize_the_lm_head_alone(artifacts: Path, tmp_path: Path):
    if 8 not in q.quantizer_bits():
        pytest.skip("this onnxruntime's quantizer has no 8 bits")
    out = tmp_path / "int4-lm8"
    assert q.main(["--artifacts", str(artifacts), "--bits", "4", "--lm-head-bits", "8", "--out", str(out)]) == 0
    model = onnx.load(str(out / DECODER_FILE))
    bits = {node.name: next(a.i for a in node.attribute if a.name == "bits")
            for node in model.graph.node if node.op_type == "MatMulNBits"}
    head = q.lm_head_node(onnx.load(str(artifacts / DECODER_FILE)))
    assert head is not None and bits.pop(head + "_Q8") == 8
    assert bits and set(bits.values()) == {4}
    quantization = read_manifest(out).decoder.quantization
    assert (quantization.bits, quantization.lm_head_bits) == (4, 8)
    pipe = Pipeline.from_artifacts(out, verify_hash=True)
    assert pipe.generate([image(pipe.artifacts.vision.image_size)], "Hi.", SamplingOptions(max_new_tokens=2)).tokens


def test_refuses_requantizing_and_overwriting_the_source(artifacts: Path, int4: Path, tmp_path: Path):
    with pytest.raises(ExportError, match="already quantized"):
        q.quantize_artifacts(int4, tmp_path / "again", 4, 32, 4, False, 0, Progress(2))
    with pytest.raises(ExportError, match="is --artifacts itself"):
        q.quantize_artifacts(artifacts, artifacts, 4, 32, 4, False, 0, Progress(2))
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match="not an artefact directory"):
        q.quantize_artifacts(artifacts, stranger, 4, 32, 4, False, 0, Progress(2))
    assert (stranger / "notes.txt").read_text() == "mine"


def test_failure_leaves_nothing_and_rerun_replaces(artifacts: Path, tmp_path: Path, monkeypatch):
    out = tmp_path / "q"

    def broken(*args, **kwargs):
        raise ExportError("simulated failure")

    with monkeypatch.context() as patch:
        patch.setattr(q, "check_quantized", broken)
        with pytest.raises(ExportError, match="simulated"):
            q.quantize_artifacts(artifacts, out, 4, 32, 4, True, 0, Progress(3))
    assert list(tmp_path.iterdir()) == []  # no output, no staging directory
    q.quantize_artifacts(artifacts, out, 4, 32, 4, False, 0, Progress(2))
    first = json.loads((out / MANIFEST_NAME).read_text())
    q.quantize_artifacts(artifacts, out, 4, 64, 4, False, 0, Progress(2))  # replaces it whole
    second = json.loads((out / MANIFEST_NAME).read_text())
    assert first["decoder"]["quantization"]["block_size"] == 32
    assert second["decoder"]["quantization"]["block_size"] == 64
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]


def test_cli_errors_are_one_line(tmp_path: Path):
    proc = subprocess.run([sys.executable, "-m", "export.quantize", "--artifacts", str(tmp_path / "nope")],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "not found" in lines[0]
