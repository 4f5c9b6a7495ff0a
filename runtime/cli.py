"""Shared CLI pieces for runtime.generate and runtime.chat (argument groups, error handling)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from runtime.backends import BACKENDS
from runtime.backends.errors import BackendUnavailable
from runtime.contract import ArtifactError
from runtime.pipeline import InputError
from runtime.preprocess import ImageError
from runtime.sampling import SamplingOptions

USER_ERRORS = (ArtifactError, BackendUnavailable, InputError, ImageError, ValueError)


def add_common_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--artifacts", type=Path, default=Path("artifacts"), metavar="DIR",
                        help="directory written by `python -m export.all` (default: artifacts)")
    parser.add_argument("--backend", choices=BACKENDS, default="ort-cpu",
                        help="ort-cpu (default), ort-cuda, ort-trt (ONNX Runtime providers) or trt "
                             "(TensorRT engines from `python -m export.engine`)")
    parser.add_argument("--max-context", type=int, metavar="N",
                        help="KV cache size in positions (default: the model's maximum, 4096)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (default: all cores)")
    parser.add_argument("--allow-special-tokens", action="store_true",
                        help="let the question spell special tokens (<image>, </s>, ### Image:...) "
                             "as DSVL's chat.py does; by default they are read as plain text")
    parser.add_argument("--verify-hash", action="store_true",
                        help="check every artefact's full sha256 against the manifest (slow for "
                             "large models; sizes and fingerprints are always checked)")
    group = parser.add_argument_group(
        "generation (defaults: the model's own, as DSVL's generate() uses them: the LLaMA "
        "directory's generation_config.json, else greedy; the manifest's generation_defaults)")
    group.add_argument("--max-new-tokens", type=int, default=128)
    group.add_argument("--do-sample", action="store_true", default=None, help="sample instead of greedy")
    group.add_argument("--greedy", dest="do_sample", action="store_false",
                       help="greedy decoding even where the model's generation config samples")
    group.add_argument("--temperature", type=float)
    group.add_argument("--top-k", type=int, help="0 = off")
    group.add_argument("--top-p", type=float, help="1.0 = off")
    group.add_argument("--repetition-penalty", type=float)
    group.add_argument("--seed", type=int, default=0, help="sampling seed")


def open_pipeline(args: argparse.Namespace):
    from runtime.pipeline import Pipeline

    return Pipeline.from_artifacts(args.artifacts, args.backend, args.max_context, args.threads,
                                   args.verify_hash)


def sampling_options(args: argparse.Namespace, pipe=None) -> SamplingOptions:
    """The flags given, over the model's own defaults (``pipe``'s manifest)."""
    defaults = pipe.artifacts.decoder.get("generation_defaults") if pipe is not None else None
    return SamplingOptions.model_defaults(
        defaults, max_new_tokens=args.max_new_tokens, do_sample=args.do_sample,
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        repetition_penalty=args.repetition_penalty, seed=args.seed)


def run_cli(main: Callable[[], int], user_errors: tuple[type[BaseException], ...] = USER_ERRORS,
            interrupted: str | None = None) -> None:
    """Run an entry point: user errors become one ``error:`` line on stderr and exit code 2."""
    try:
        code = main()
    except user_errors as err:
        print(f"error: {err}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        if interrupted:
            print(interrupted, file=sys.stderr)
        code = 130
    sys.exit(code)
