"""python -m runtime.serve: an OpenAI-compatible server for an exported DSVL model.

    python -m runtime.serve --artifacts A [--host 127.0.0.1 --port 8000]
    python -m runtime.serve --artifacts A --ray --replicas 2     # on Ray Serve

Concurrent requests share each decode step (batched decoding); see docs/serving.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from runtime import contract as c
from runtime.backends import BACKENDS
from runtime.cli import add_huge_pages_flag
from runtime.sampling import DSVL_ANSWER_TOKENS
from runtime.serve.messages import ImageLimits


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m runtime.serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifacts", type=Path, default=Path("artifacts"), metavar="DIR",
                        help="directory written by `python -m export.all` (default: artifacts)")
    parser.add_argument("--backend", choices=[b for b in BACKENDS if b != "trt"], default="ort-cpu",
                        help="ONNX Runtime provider (batched decoding runs decoder.onnx)")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--model-name", help="the model id clients see (default: the directory name)")
    parser.add_argument("--max-context", type=int, metavar="N",
                        help="positions per sequence (default: the model's maximum)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (default: all cores)")
    add_huge_pages_flag(parser)
    parser.add_argument("--max-batch", type=int, default=8, help="sequences per decode step (default 8)")
    parser.add_argument("--max-queue", type=int, default=32,
                        help="requests waiting beyond the batch before 429 (default 32)")
    parser.add_argument("--max-tokens", type=int, default=DSVL_ANSWER_TOKENS,
                        help="completion tokens when a request sets no max_tokens (default "
                             f"{DSVL_ANSWER_TOKENS}: DSVL's chat.py --generation_length_per_round)")
    parser.add_argument("--max-body-bytes", type=int, default=32 << 20, help="default 32 MiB")
    parser.add_argument("--max-image-bytes", type=int, default=20 << 20, help="default 20 MiB")
    parser.add_argument("--max-image-pixels", type=int, default=40_000_000, help="default 40 Mpx")
    parser.add_argument("--max-image-aspect", type=float, default=20.0,
                        help="longest / shortest side (default 20)")
    parser.add_argument("--allow-local-images", type=Path, metavar="DIR",
                        help="accept image_url paths to files under DIR (off by default)")
    parser.add_argument("--allow-special-tokens", action="store_true",
                        help="let user text spell special tokens, as DSVL's chat.py does")
    parser.add_argument("--verify-hash", action="store_true", help="full sha256 check at load")
    parser.add_argument("--ray", action="store_true", help="serve on Ray Serve (pip install 'ray[serve]')")
    parser.add_argument("--replicas", type=int, default=1, help="Ray Serve replicas (with --ray)")
    parser.add_argument("--ray-address", help="an existing Ray cluster (default: start a local one)")
    parser.add_argument("--log-level", default="warning", help="uvicorn's log level")
    return parser.parse_args(argv)


def config_from(args: argparse.Namespace):
    from runtime.serve.app import ServerConfig

    for name in ("max_batch", "max_queue", "max_tokens", "max_body_bytes", "max_image_bytes",
                 "max_image_pixels", "replicas"):
        if getattr(args, name) < 1:
            raise SystemExit(f"error: --{name.replace('_', '-')} must be at least 1")
    limits = ImageLimits(args.max_image_bytes, args.max_image_pixels, args.max_image_aspect,
                         args.allow_local_images)
    return ServerConfig(args.artifacts, args.backend, args.max_context, args.threads,
                        args.model_name, args.max_batch, args.max_queue, args.max_body_bytes,
                        args.max_tokens, args.allow_special_tokens, args.verify_hash, limits,
                        args.huge_pages)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as err:
        print(f"error: serving needs {err.name}: pip install -e \".[serve]\"", file=sys.stderr)
        return 2
    config = config_from(args)
    if not (args.artifacts / c.MANIFEST_NAME).is_file():
        print(f"error: --artifacts {args.artifacts}: no {c.MANIFEST_NAME}; export one with "
              f"`python -m export.all --out {args.artifacts}`", file=sys.stderr)
        return 2
    if args.ray:
        from runtime.serve.ray_app import run_ray

        return run_ray(config, args.replicas, args.host, args.port, args.ray_address)
    import uvicorn

    from runtime.serve.app import create_app

    print(f"serving {config.name} on http://{args.host}:{args.port}/v1 (GET /health says when "
          "the model is loaded)", file=sys.stderr)
    uvicorn.run(create_app(config), host=args.host, port=args.port, log_level=args.log_level)
    return 0


if __name__ == "__main__":
    sys.exit(main())
