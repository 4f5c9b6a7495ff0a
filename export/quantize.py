"""python -m export.quantize: weight-only int4/int8 quantization of decoder.onnx (MatMulNBits).

Every MatMul of decoder.onnx whose weight is a constant (the q/k/v/o, gate/up/down projections
and the LM head) becomes ONNX Runtime's ``com.microsoft.MatMulNBits``: weights stored in 4 or 8
bits, symmetric, one fp32 scale per block of ``--block-size`` input channels; activations, the
KV cache and the graph's inputs/outputs stay as they were, so the runtime runs the result
unchanged (``Pipeline.from_artifacts(OUT)``). ``--kv-cache int8`` also stores the in-place KV
cache in 8 bits (export/kv_quant.py); the manifest's ``decoder.kv_cache_dtype`` tells the
runtime to allocate it so. MatMulNBits is an ONNX Runtime contrib op:
TensorRT cannot build an engine from the result, so ``engines/`` is not carried over.

The output is a complete artefact directory: every other file is hard-linked (copied across
file systems) from --artifacts, the manifest's decoder "file" entry is rewritten and a
"quantization" entry added. It is assembled in a hidden staging directory next to --out and
renamed into place, so a killed run never leaves a directory that looks complete.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx

from export.cache_feed import CacheFeed
from export.checks import check_onnx_files
from export.cli import seed_arg
from export.common import ExportError, Progress, compare, run_cli, save_onnx
from export.head_rescore import APPROX_HEAD_BLOCK, DEFAULT_TOP_K
from export.head_rescore import add_to_model as add_rescoring
from export.kv_quant import (
    DEFAULT_GRANULARITY,
    GRANULARITIES,
    calibrate_step,
    check_cache_mode,
    quantize_cache,
)
from export.publish import carry_old, staged, swap_in
from runtime import contract as c
from runtime.artifacts import load_table
from runtime.durable import write_durable
from runtime.integrity import check_files
from runtime.manifest import (
    Comparison,
    DecoderSection,
    FileEntry,
    Manifest,
    QuantizationSection,
    read_manifest,
)

METHOD = "MatMulNBits"
DEFAULT_BLOCK_SIZE = 32
# MatMulNBits' compute type: 4 = int8 activations x int-N weights (ONNX Runtime GenAI's choice
# for CPU); 0 = dequantize to fp32 and multiply. Same weights either way, see docs/benchmarks.md.
DEFAULT_ACCURACY_LEVEL = 4
SUPPORTED_BITS = (4, 8)
CHECK_POSITIONS = 16  # prompt length of the on-the-spot check against the unquantized decoder


def default_out(artifacts: Path, bits: int) -> Path:
    return Path(f"{artifacts}-int{bits}")


def quantizer_bits() -> tuple[int, ...]:
    """The bit widths this onnxruntime's MatMulNBitsQuantizer accepts (8 arrived after 4)."""
    from onnxruntime.quantization import matmul_nbits_quantizer as mnq

    return (4, 8) if hasattr(mnq, "quantize_matmul_8bits") else (4,)


def lm_head_node(model: onnx.ModelProto) -> str | None:
    """The name of the MatMul that makes ``logits`` (through Identity/Cast), if any."""
    producers = {out: node for node in model.graph.node for out in node.output}
    node = producers.get(c.LOGITS)
    while node is not None and node.op_type in ("Identity", "Cast"):
        node = producers.get(node.input[0])
    return node.name if node is not None and node.op_type == "MatMul" else None


def quantize_model(model: onnx.ModelProto, bits: int, block_size: int, accuracy_level: int,
                   lm_head_bits: int | None = None, rescore_top_k: int = 0) -> tuple[onnx.ModelProto, int]:
    """Returns the quantized model and how many MatMuls became MatMulNBits. ``lm_head_bits``
    quantizes the LM head with other bits than the rest (a first pass over that node alone);
    ``rescore_top_k`` rescores a 4-bit head's best candidates at 8 bits (export/head_rescore.py)."""
    from onnxruntime.quantization import matmul_nbits_quantizer as mnq

    # The quantizer logs every node at INFO on its own handler: keep the CLI's output readable.
    logging.getLogger(mnq.__name__).setLevel(logging.WARNING)
    for width in {bits, lm_head_bits or bits}:
        if width not in quantizer_bits():
            import onnxruntime

            raise ExportError(f"{width} bits: onnxruntime {onnxruntime.__version__}'s MatMulNBits "
                              f"quantizer supports only {quantizer_bits()} bits; use 4 or a newer "
                              "onnxruntime")
    head_name = lm_head_node(model)
    head_bits = lm_head_bits or bits
    rescore = head_name if rescore_top_k and head_bits == 4 else None
    head_weight = _float_weight(model, head_name) if rescore else None
    head_block = APPROX_HEAD_BLOCK if rescore else block_size
    if head_name is not None and (head_bits, head_block) != (bits, block_size):
        others = [node.name for node in model.graph.node if node.op_type == "MatMul" and node.name != head_name]
        # (the quantizer's nodes_to_include adds to op_types_to_quantize; exclusion restricts)
        first = mnq.MatMulNBitsQuantizer(model, bits=head_bits, block_size=head_block, is_symmetric=True,
                                         accuracy_level=accuracy_level, op_types_to_quantize=("MatMul",),
                                         nodes_to_exclude=others)
        first.process()
        model = first.model.model
    quantizer = mnq.MatMulNBitsQuantizer(model, bits=bits, block_size=block_size, is_symmetric=True,
                                         accuracy_level=accuracy_level, op_types_to_quantize=("MatMul",))
    quantizer.process()
    result = quantizer.model.model
    if rescore is not None:
        add_rescoring(result, f"{rescore}_Q4", head_weight, block_size, rescore_top_k)
    return result, sum(node.op_type == METHOD for node in result.graph.node)


def _float_weight(model: onnx.ModelProto, matmul: str) -> np.ndarray:
    """A MatMul's constant weight [K, N] in its own float type (read before the quantizer
    replaces it)."""
    node = next(n for n in model.graph.node if n.name == matmul)
    tensor = next(t for t in model.graph.initializer if t.name == node.input[1])
    return onnx.numpy_helper.to_array(tensor)


@contextlib.contextmanager
def staged_dir(out: Path) -> Iterator[Path]:
    """A hidden directory beside ``out``, swapped in for ``out`` when the block succeeds
    (export/publish.py: a killed run leaves the old ``out`` or the new one, whole)."""
    with staged(out) as stage:
        yield stage
        swap_in(stage, out)


def check_out(artifacts: Path, out: Path) -> None:
    if out.resolve() == artifacts.resolve():
        raise ExportError(f"--out {out} is --artifacts itself: write the quantized copy elsewhere")
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / c.MANIFEST_NAME).is_file())):
        raise ExportError(f"--out {out} exists and is not an artefact directory; it would be "
                          "replaced: choose another --out")


def check_quantized(original: Path, quantized: Path, decoder: DecoderSection, prompt_table: np.ndarray,
                    seed: int) -> Comparison:
    """Run both decoders on one seeded prompt: logits error and top-1 agreement per position."""
    import onnxruntime as ort

    rng = np.random.default_rng(seed)
    ids = rng.integers(0, decoder.vocab_size, CHECK_POSITIONS)
    embeds = prompt_table[ids][None]
    mask = np.ones((1, CHECK_POSITIONS), np.int64)
    logits = []
    for path in (original, quantized):
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        logits.append(CacheFeed(session, decoder.num_kv_heads, decoder.head_dim)(embeds, mask)[0])
        del session
    result = Comparison.from_dict(compare(f"prompt pass ({CHECK_POSITIONS} positions)", logits[1],
                                          logits[0]), "check")
    result.top1_agreement = float(np.mean(logits[0].argmax(-1) == logits[1].argmax(-1)))
    return result


def open_decoder(artifacts: Path) -> tuple[Manifest, DecoderSection]:
    """The export's manifest and its decoder section, or a one-line error naming the fix."""
    if not artifacts.is_dir():
        raise c.ArtifactError(f"--artifacts {artifacts}: directory not found; export one with "
                              f"`python -m export.all --out {artifacts}`")
    manifest = read_manifest(artifacts).require("decoder", root=artifacts)
    assert manifest.decoder is not None  # noqa: S101 - required above
    return manifest, manifest.decoder


def quantize_artifacts(artifacts: Path, out: Path, bits: int, block_size: int,
                       accuracy_level: int, check: bool, seed: int,
                       progress: Progress, lm_head_bits: int | None = None,
                       rescore_top_k: int = 0, kv_scales: str | None = None) -> Manifest:
    """Write the quantized artefact directory ``out``; returns its manifest. ``kv_scales``: also
    store the KV cache as int8 with scales of this granularity (export/kv_quant.py), calibrated
    on the float export."""
    manifest, decoder = open_decoder(artifacts)
    if decoder.quantization is not None:
        q = decoder.quantization
        raise ExportError(f"{artifacts}'s decoder is already quantized ({q.bits}-bit "
                          f"{q.method}): quantize the unquantized export instead")
    source = artifacts / decoder.file.path
    check_files(artifacts, decoder.file.with_data())
    hidden = decoder.hidden_size
    if hidden % block_size:
        raise ExportError(f"--block-size {block_size} does not divide the hidden size {hidden}")
    if kv_scales is not None:
        check_cache_mode(decoder, artifacts)
    if rescore_top_k >= decoder.vocab_size:
        raise ExportError(f"--lm-head-rescore {rescore_top_k}: rescore fewer candidates than the "
                          f"vocabulary's {decoder.vocab_size} tokens")
    check_out(artifacts, out)
    calibration = None
    with staged_dir(out) as stage:
        if kv_scales is not None:  # before the model is loaded: one decoder in memory at a time
            calibration = calibrate_step(artifacts, kv_scales, progress)
        with progress.step(f"quantizing {source.name} to {bits}-bit {METHOD} "
                           f"(block {block_size}, symmetric, accuracy_level {accuracy_level})"):
            try:
                model = onnx.load(str(source))
            except Exception as err:  # noqa: BLE001 - protobuf's DecodeError and friends
                raise c.ArtifactError(f"{source} is not a readable ONNX model ({type(err).__name__}); "
                                      f"re-run `python -m export.all --out {artifacts}`") from None
            matmuls = sum(node.op_type == "MatMul" for node in model.graph.node)
            model, quantized = quantize_model(model, bits, block_size, accuracy_level, lm_head_bits,
                                              rescore_top_k)
            rescored = any(node.op_type == "GatherBlockQuantized" for node in model.graph.node)
            if not quantized:
                raise ExportError(f"{source} has no MatMul with a constant weight: nothing to quantize")
            if calibration is not None:
                quantize_cache(model, calibration)
            save_onnx(model, stage / c.DECODER_FILE)
            del model
            before = source.stat().st_size + _data_size(source)
            after = (stage / c.DECODER_FILE).stat().st_size + _data_size(stage / c.DECODER_FILE)
            print(f"      {quantized} of {matmuls} MatMuls quantized (the rest multiply "
                  f"activations); {before / 1e6:.1f} MB -> {after / 1e6:.1f} MB")
        with progress.step(f"linking the other artefacts from {artifacts}"):
            skip = {e.path for e in decoder.file.with_data()} | {c.ENGINES_DIR}
            carried = carry_old(artifacts, stage, skip)  # the manifest is rewritten, not carried
            print(f"      {len(carried)} entries: {', '.join(carried)}")
            if (artifacts / c.ENGINES_DIR).exists() or manifest.engines is not None:
                print(f"      {c.ENGINES_DIR}/ not carried: TensorRT has no {METHOD}; "
                      "the quantized decoder runs on ONNX Runtime")
        section = QuantizationSection(bits=bits, block_size=block_size, method=METHOD, symmetric=True,
                                      accuracy_level=accuracy_level, quantized_matmuls=quantized,
                                      source_sha256=decoder.file.sha256,
                                      lm_head_bits=lm_head_bits if lm_head_bits != bits else None,
                                      lm_head_rescore_top_k=rescore_top_k if rescored else None)
        if calibration is not None:
            calibration.record(decoder, calibrated_on=f"the unquantized decoder ({decoder.precision})")
        if check:
            with progress.step("checking the quantized decoder against the original (ONNX Runtime CPU)"):
                table = load_table(artifacts / decoder.prompt_embeddings.path, artifacts)
                result = check_quantized(source, stage / c.DECODER_FILE, decoder, table, seed)
                if not result.finite:
                    raise ExportError("the quantized decoder gives NaN/Inf logits; nothing was written")
                print(f"      logits max|err| {result.max_abs_err:.3g} (rel "
                      f"{result.max_rel_err:.2e} of scale {result.ref_max_abs:.2f}), "
                      f"top-1 agreement {result.top1_agreement:.0%} over {CHECK_POSITIONS} positions")
                section.check = result
        manifest.engines = None
        decoder.file, decoder.quantization = FileEntry.describe(stage, c.DECODER_FILE), section
        manifest.validate("manifest")
        check_onnx_files(stage, manifest, [decoder.file.path])
        write_durable(stage / c.MANIFEST_NAME, manifest.dumps().encode())
    return manifest


def _data_size(path: Path) -> int:
    data = path.with_name(path.name + c.EXTERNAL_DATA_SUFFIX)
    return data.stat().st_size if data.exists() else 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m export.quantize",
        description="Weight-only quantization of an export's decoder.onnx with ONNX Runtime's "
                    "MatMulNBits (symmetric, blockwise). Writes a complete artefact directory "
                    "that the runtime opens unchanged.")
    parser.add_argument("--artifacts", type=Path, required=True, metavar="DIR",
                        help="artefact directory written by python -m export.all")
    parser.add_argument("--bits", type=int, choices=SUPPORTED_BITS, default=4,
                        help="weight bits (default 4; 8 needs an onnxruntime whose quantizer has it)")
    parser.add_argument("--out", type=Path, metavar="DIR",
                        help="output directory (default: ARTIFACTS-int4 / ARTIFACTS-int8); replaced "
                             "atomically if it exists")
    parser.add_argument("--block-size", type=int, default=DEFAULT_BLOCK_SIZE,
                        help=f"input channels per scale (power of two >= 16; default {DEFAULT_BLOCK_SIZE})")
    parser.add_argument("--accuracy-level", type=int, choices=(0, 1, 2, 3, 4),
                        default=DEFAULT_ACCURACY_LEVEL,
                        help="MatMulNBits compute type: 4 = activations quantized to int8 on the fly "
                             f"(default {DEFAULT_ACCURACY_LEVEL}; fastest on CPU), 0 = fp32 (weights "
                             "dequantized); the stored weights are the same")
    parser.add_argument("--lm-head-bits", type=int, choices=SUPPORTED_BITS, default=None,
                        help="the LM head's bits (default: --bits). 8 keeps the top-1 token closer to "
                             "the float model's, as llama.cpp keeps Q4_0's output tensor at Q6_K; it "
                             "costs the small preset ~15%% of its int4 speed (docs/benchmarks.md)")
    parser.add_argument("--lm-head-rescore", type=int, default=DEFAULT_TOP_K, metavar="K",
                        help="with a 4-bit LM head, rescore its K best logits with an 8-bit copy of "
                             f"the head rows (default {DEFAULT_TOP_K}; 0: off): the top-1 token of an "
                             "8-bit head for about 0.15 ms per step (export/head_rescore.py)")
    parser.add_argument("--kv-cache", choices=("float", "int8"), default="float",
                        help="float (default): the KV cache keeps the export's float type; int8: "
                             "stored in 8 bits with scales calibrated once on the float export "
                             "(export/kv_quant.py), a quarter of fp32's bytes per step: faster "
                             "decoding at long contexts, slightly different logits. Needs the "
                             "fused graph's in-place cache (export.all's default)")
    parser.add_argument("--kv-scales", choices=tuple(GRANULARITIES), default=None,
                        help=f"with --kv-cache int8: one scale per cache tensor (tensor, default "
                             f"{DEFAULT_GRANULARITY}: ONNX Runtime's fastest path) or per head and "
                             "channel (channel: closer logits, slower steps)")
    parser.add_argument("--no-check", action="store_true",
                        help="skip running the original and quantized decoders on a seeded prompt")
    parser.add_argument("--seed", type=seed_arg, default=0, help="seed of the check's prompt (default 0)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.block_size < 16 or args.block_size & (args.block_size - 1):
        raise ExportError(f"--block-size {args.block_size}: MatMulNBits needs a power of two >= 16")
    if args.kv_scales is not None and args.kv_cache != "int8":
        raise ExportError(f"--kv-scales {args.kv_scales} applies to an int8 cache: add --kv-cache int8")
    if args.lm_head_rescore < 0:
        raise ExportError(f"--lm-head-rescore {args.lm_head_rescore}: a count of candidates, 0 or more")
    out = args.out or default_out(args.artifacts, args.bits)
    progress = Progress(total=(2 if args.no_check else 3) + (args.kv_cache == "int8"))
    quantize_artifacts(args.artifacts, out, args.bits, args.block_size, args.accuracy_level,
                       not args.no_check, args.seed, progress, args.lm_head_bits,
                       args.lm_head_rescore,
                       (args.kv_scales or DEFAULT_GRANULARITY) if args.kv_cache == "int8" else None)
    print(f"wrote {out} in {progress.elapsed():.1f} s; try:\n"
          f"  python -m runtime.generate --artifacts {out} --image IMAGE --prompt \"Describe the image.\"")
    return 0


if __name__ == "__main__":
    run_cli(main)
