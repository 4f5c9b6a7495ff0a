"""python -m export.all: vision + decoder + embeddings + tokenizer + manifest in one directory.

The model is loaded once; both graphs are exported into one staging directory beside --out and
published together by one directory swap (export/publish.py): a killed export leaves either the
old export or the new one, whole.
"""

from __future__ import annotations

import argparse

from export import decoder as dec
from export import vision as vis
from export.cli import (
    Progress,
    add_output_flags,
    add_weight_flags,
    check_writable,
    publish,
    run_cli,
    staged,
    weight_source,
)
from runtime.contract import GRAPH_TRACED, PREPROCESSOR_NAME
from runtime.manifest import Manifest


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m export.all",
        description="Export a whole DSVL model (vision encoder + projector, LLaMA decoder with KV "
                    "cache, both embedding tables, tokenizer, manifest) for the runtime, checking "
                    "each ONNX graph against PyTorch. With no weight paths, uses --preset's seeded "
                    "random weights.")
    add_weight_flags(parser)
    add_output_flags(parser, "artifacts")
    parser.add_argument("--dynamic-resolution", action="store_true",
                        help="vision.onnx takes any image height/width (see export.vision)")
    dec.add_kv_cache_flag(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    check_writable(args.out)  # fail before minutes of loading, not after
    progress = Progress(total=6)
    src = weight_source(args)
    with staged(args.out) as stage:
        from export.common import print_parity, versions

        if args.decoder_graph == GRAPH_TRACED:  # the whole model in RAM, as the tracer needs it
            vision, decoder = _traced(args, src, stage, progress)
        else:
            vision, decoder = _streamed(args, src, stage, progress)
        print_parity(decoder.parity, decoder.section.parity.tolerance_rel)
        if not (vision.ok and decoder.ok):
            print("error: ONNX Runtime differs from PyTorch beyond tolerance; nothing was written")
            return 1
        names = [PREPROCESSOR_NAME] + [e.path for e in vision.manifest_section.file.with_data()]
        publish(stage, args.out, names + dec.decoder_files(stage),
                Manifest(vision=vision.manifest_section, decoder=decoder.section,
                         tokenizer=decoder.tokenizer_section, precision=args.precision,
                         versions=versions(args.opset)))
    print(f"wrote {args.out} in {progress.elapsed():.1f} s; try:\n"
          f"  python -m runtime.generate --artifacts {args.out} --image IMAGE --prompt \"Describe the image.\"")
    return 0


def _traced(args: argparse.Namespace, src, stage, progress: Progress):
    from dsvl.loading import load_model
    from export.common import print_parity

    with progress.step("loading weights"):
        model, tokenizer, loaded = load_model(src)
        for note in loaded.notes:
            print(f"      {note}")
    vision = vis.export_vision(model.vision(), loaded, stage, args.precision, args.opset,
                               args.dynamic_resolution, args.seed, progress)
    print_parity(vision.parity, vision.manifest_section.parity.tolerance_rel)
    decoder = dec.export_decoder(model, tokenizer, loaded, stage, args.precision, args.opset,
                                 args.seed, progress, args.kv_cache, args.decoder_graph, args.weights)
    return vision, decoder


def _streamed(args: argparse.Namespace, src, stage, progress: Progress):
    """Vision first (its model freed before the decoder starts), then the decoder streamed
    tensor by tensor from lazily opened weights: peak memory is the vision model or one layer."""
    from export import decoder_stream as stream
    from export.common import print_parity

    with progress.step("loading the vision weights and the tokenizer; opening the decoder's"):
        vision_model, loaded, tokenizer, weights = stream.open_sources(src)
    vision = vis.export_vision(vision_model, loaded, stage, args.precision, args.opset,
                               args.dynamic_resolution, args.seed, progress)
    print_parity(vision.parity, vision.manifest_section.parity.tolerance_rel)
    image_embeds = stream.parity_images(vision_model, loaded.config.image_size, args.seed)
    del vision_model
    decoder = stream.stream_decoder(weights, tokenizer, loaded, stage, args.precision,
                                    args.decoder_graph, args.kv_cache, args.weights, image_embeds,
                                    progress, args.parity_check)
    return vision, decoder


if __name__ == "__main__":
    run_cli(main)
