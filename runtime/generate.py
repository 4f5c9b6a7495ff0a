"""python -m runtime.generate: answer one prompt about images, streaming tokens as they come."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from runtime.cli import add_common_flags, open_pipeline, run_cli, sampling_options, utf8_text

if TYPE_CHECKING:  # the pipeline loads onnxruntime: only when a question is asked (fast --help)
    from runtime.pipeline import Pipeline


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m runtime.generate",
        description="Ask an exported DSVL model one question about one or more images "
                    "(DSVL's prompt template; greedy decoding by default).")
    add_common_flags(parser)
    parser.add_argument("--image", type=Path, action="append", default=[], metavar="PATH",
                        help="an image file; repeat for several images (at most 8)")
    parser.add_argument("--prompt", required=True, type=utf8_text, help="the question")
    parser.add_argument("--raw-prompt", action="store_true",
                        help="use --prompt as the whole prompt text (it must hold one <image> per image)")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object (prompt ids, generated ids, text, timings) instead of streaming")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with open_pipeline(args) as pipe:
        return answer(args, pipe)


def answer(args: argparse.Namespace, pipe: Pipeline) -> int:
    """Generate, streaming pieces as they come (or one JSON object), then the timings."""
    if pipe.artifacts.vision.random_weights and not args.json:
        print("note: these artefacts hold RANDOM preset weights; the answer is noise", file=sys.stderr)

    def stream(piece: str) -> None:
        print(piece, end="", flush=True)

    result = pipe.generate(args.image, args.prompt, sampling_options(args, pipe),
                           stream=None if args.json else stream, raw_prompt=args.raw_prompt,
                           allow_special_tokens=args.allow_special_tokens)
    if args.json:
        print(json.dumps(result.to_json(args.backend)))
    else:
        print()
        t = result.timings
        rate = f"{t['decode_tokens_per_s']:.1f} tok/s" if t.get("decode_tokens_per_s") else "n/a"
        print(f"[{len(result.tokens)} tokens, stop: {result.stop_reason}, first token "
              f"{t['time_to_first_token_s'] * 1e3:.0f} ms, decode {rate}]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    run_cli(main)
