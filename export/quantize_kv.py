"""python -m export.quantize_kv: give an existing export an int8 KV cache (export/kv_quant.py).

For exports whose float model is not at hand: a 7B decoder exported with ``export.all --weights
int4`` (streamed, never whole in memory), or a float export that should keep its weights. The
scales are calibrated on the given export's own decoder, then only the graph changes:
decoder.onnx is rewritten (a few kB: types, attributes, two scales per layer) and its external
weight file is hard-linked, not copied, so a 7B export takes the calibration's time and no
extra disk. ``export.quantize --kv-cache int8`` does the same while quantizing the weights,
calibrated on the float decoder.

The output is a complete artefact directory, assembled beside --out and swapped in whole.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import onnx

from export.checks import check_onnx_files
from export.common import ExportError, Progress, run_cli
from export.kv_quant import (
    DEFAULT_GRANULARITY,
    GRANULARITIES,
    KvScales,
    calibrate_step,
    check_cache_mode,
    quantize_cache,
)
from export.publish import carry_old
from export.quantize import check_out, open_decoder, staged_dir
from runtime import contract as c
from runtime.durable import write_durable
from runtime.integrity import check_files
from runtime.manifest import DecoderSection, FileEntry, Manifest

CHECK_TOKENS = 16  # greedy tokens compared between the two caches after writing


def default_out(artifacts: Path) -> Path:
    return Path(f"{artifacts}-kv8")


def weights_of(decoder: DecoderSection) -> str:
    """The decoder's weights in words, for the manifest's ``calibrated_on``."""
    q = decoder.quantization
    return f"its own {q.bits}-bit weights" if q is not None else f"its own {decoder.precision} weights"


def quantize_kv_artifacts(artifacts: Path, out: Path, granularity: str, check: bool,
                          progress: Progress) -> Manifest:
    """Write ``out``: ``artifacts`` with an int8 KV cache; returns its manifest."""
    manifest, decoder = open_decoder(artifacts)
    check_cache_mode(decoder, artifacts)
    source = artifacts / decoder.file.path
    check_files(artifacts, decoder.file.with_data())
    check_out(artifacts, out)
    with staged_dir(out) as stage:
        scales = calibrate_step(artifacts, granularity, progress)
        with progress.step(f"rewriting {source.name}'s graph (weights linked, not copied)"):
            try:  # the graph only: initializers keep pointing at decoder.onnx.data
                model = onnx.load(str(source), load_external_data=False)
            except Exception as err:  # noqa: BLE001 - protobuf's DecodeError and friends
                raise c.ArtifactError(f"{source} is not a readable ONNX model ({type(err).__name__}); "
                                      f"re-run `python -m export.all --out {artifacts}`") from None
            quantize_cache(model, scales)
            write_durable(stage / c.DECODER_FILE, model.SerializeToString())
            carried = carry_old(artifacts, stage, {c.DECODER_FILE, c.ENGINES_DIR})
            print(f"      {len(carried)} entries linked: {', '.join(carried)}")
        decoder.file = FileEntry.describe(stage, c.DECODER_FILE)
        scales.record(decoder, calibrated_on=weights_of(decoder))
        manifest.engines = None  # TensorRT has no int8-cache GroupQueryAttention
        manifest.validate("manifest")
        check_onnx_files(stage, manifest, [decoder.file.path])
        write_durable(stage / c.MANIFEST_NAME, manifest.dumps().encode())
        if check:
            with progress.step(f"comparing {CHECK_TOKENS} greedy tokens with the float cache"):
                same, total = greedy_agreement(stage, scales)
                print(f"      top-1 agreement {same} of {total} (teacher-forced: the float "
                      "cache's greedy answer to the calibration round fed to the int8 cache)")
    return manifest


def greedy_agreement(quantized: Path, scales: KvScales) -> tuple[int, int]:
    """Teacher-forced agreement on the calibration round: the calibrating decoder's greedy
    answer (its first CHECK_TOKENS) fed to the int8 cache, and how many of its tokens the int8
    cache's logits also pick first (free-running answers would part at the first near-tie for
    good). NaN/Inf logits in either are an error (nothing is written then)."""
    from export.kv_quant import CALIBRATION_CONTEXT, CALIBRATION_QUESTION, calibration_image
    from runtime.pipeline import Pipeline
    from runtime.sampling import SamplingOptions

    answer = scales.answer[:CHECK_TOKENS]
    picks: list[int] = []
    finite = [scales.finite]

    def forced(logits: np.ndarray, tokens: list[int]) -> int:
        return answer[len(tokens)]

    def on_step(logits: np.ndarray, tokens: list[int]) -> None:
        finite.append(bool(np.isfinite(logits).all()))
        picks.append(int(logits.argmax()))

    with Pipeline.from_artifacts(quantized, max_context=CALIBRATION_CONTEXT, huge_pages=False) as pipe:
        images = [calibration_image()] if pipe.artifacts.vision is not None else []
        pipe.generate(images, CALIBRATION_QUESTION, SamplingOptions(max_new_tokens=len(answer)),
                      on_step=on_step, sampler=forced)
    if not all(finite):
        raise ExportError("a decoder gives NaN/Inf logits on the calibration round; nothing was written")
    return sum(a == b for a, b in zip(answer, picks, strict=True)), len(answer)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m export.quantize_kv",
        description="Store an export's KV cache in int8 (ONNX Runtime GroupQueryAttention's "
                    "quantized cache, fixed scales calibrated on the export's own decoder): a "
                    "quarter of an fp32 cache's memory and bytes per decode step. Only the graph "
                    "is rewritten; the weights are linked. Needs the fused graph's in-place cache "
                    "(export.all's default). Writes a complete artefact directory.")
    parser.add_argument("--artifacts", type=Path, required=True, metavar="DIR",
                        help="artefact directory written by export.all or export.quantize")
    parser.add_argument("--out", type=Path, metavar="DIR",
                        help="output directory (default: ARTIFACTS-kv8); replaced atomically if it exists")
    parser.add_argument("--kv-scales", choices=tuple(GRANULARITIES), default=DEFAULT_GRANULARITY,
                        help=f"one scale per cache tensor (tensor, default {DEFAULT_GRANULARITY}: ONNX "
                             "Runtime's fastest path) or per head and channel (channel: closer "
                             "logits, slower steps)")
    parser.add_argument("--no-check", action="store_true",
                        help=f"skip comparing {CHECK_TOKENS} greedy tokens with the float cache")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = args.out or default_out(args.artifacts)
    progress = Progress(total=2 if args.no_check else 3)
    quantize_kv_artifacts(args.artifacts, out, args.kv_scales, not args.no_check, progress)
    print(f"wrote {out} in {progress.elapsed():.1f} s; try:\n"
          f"  python -m runtime.generate --artifacts {out} --image IMAGE --prompt \"Describe the image.\"")
    return 0


if __name__ == "__main__":
    run_cli(main)
