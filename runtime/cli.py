"""Shared CLI pieces for runtime.generate and runtime.chat (argument groups, error handling)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from runtime.backends import BACKENDS
from runtime.errors import DsvlEdgeError, UserError
from runtime.preprocess import ImageLimits
from runtime.sampling import DSVL_ANSWER_TOKENS, SamplingOptions, check_finite

USER_ERRORS = (DsvlEdgeError,)  # runtime/errors.py: everything raised on purpose, one line each


def _number(kind: type, text: str) -> int | float:
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None


def positive_int(text: str) -> int:
    """argparse type: an integer of at least 1 (0 is not "the default")."""
    value = _number(int, text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def non_negative_int(text: str) -> int:
    value = _number(int, text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} must be 0 or more")
    return value


def seed_int(text: str) -> int:
    """argparse type: a seed numpy accepts (0 to 2**32 - 1), checked before any work."""
    value = _number(int, text)
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"{value} is out of range: use 0 to {2**32 - 1}")
    return value


def finite_float(text: str) -> float:
    """argparse type: a finite number (nan and inf are refused here, not deep in sampling)."""
    value = _number(float, text)
    try:
        check_finite(value, "")
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text} is not a finite number") from None
    return value


def utf8_text(text: str) -> str:
    """argparse type: text that can be encoded (argv bytes that are not UTF-8 arrive as
    surrogates, which the tokenizer cannot take)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise argparse.ArgumentTypeError("is not valid UTF-8 text: check the terminal's encoding "
                                         "(LANG/LC_ALL) or the file it came from") from None
    return text


def add_huge_pages_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-huge-pages", dest="huge_pages", action="store_false",
                        help="leave the decoder's weights on 4 KiB pages (by default, on Linux with "
                             "ort-cpu, they are moved onto 2 MiB pages after loading: up to 15%% faster "
                             "decode steps on a small model, 0.1-0.3 s per 100 MiB at load)")


def add_common_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--artifacts", type=Path, default=Path("artifacts"), metavar="DIR",
                        help="directory written by `python -m export.all` (default: artifacts)")
    parser.add_argument("--backend", choices=BACKENDS, default="ort-cpu",
                        help="ort-cpu (default), ort-cuda, ort-trt (ONNX Runtime providers) or trt "
                             "(TensorRT engines from `python -m export.engine`)")
    parser.add_argument("--max-context", type=positive_int, metavar="N",
                        help="KV cache size in positions (default: the model's maximum, 4096)")
    parser.add_argument("--threads", type=non_negative_int, default=0,
                        help="CPU threads (default 0: all cores)")
    add_huge_pages_flag(parser)
    parser.add_argument("--allow-special-tokens", action="store_true",
                        help="let the question spell special tokens (<image>, </s>, ### Image:...) "
                             "as DSVL's chat.py does; by default they are read as plain text")
    parser.add_argument("--verify-hash", action="store_true",
                        help="check every artefact's full sha256 against the manifest (slow for "
                             "large models; sizes and fingerprints are always checked)")
    limits = ImageLimits()
    images = parser.add_argument_group("image limits (checked from the file header, before decoding)")
    images.add_argument("--max-image-pixels", type=positive_int, default=limits.max_pixels, metavar="N",
                        help=f"largest image, in pixels (default {limits.max_pixels})")
    images.add_argument("--max-image-aspect", type=finite_float, default=limits.max_aspect_ratio,
                        metavar="R", help="largest long/short edge ratio for shortest-edge resizing; it "
                                          "bounds the resized image to R x shortest_edge^2 pixels "
                                          f"(default {limits.max_aspect_ratio:g})")
    group = parser.add_argument_group(
        "generation (defaults: the model's own, as DSVL's generate() uses them: the LLaMA "
        "directory's generation_config.json, else greedy; the manifest's generation_defaults)")
    group.add_argument("--max-new-tokens", type=positive_int, default=DSVL_ANSWER_TOKENS, metavar="N",
                       help=f"most tokens per answer (default {DSVL_ANSWER_TOKENS}: DSVL's chat.py "
                            "--generation_length_per_round)")
    group.add_argument("--do-sample", action="store_true", default=None, help="sample instead of greedy")
    group.add_argument("--greedy", dest="do_sample", action="store_false",
                       help="greedy decoding even where the model's generation config samples")
    group.add_argument("--temperature", type=finite_float)
    group.add_argument("--top-k", type=non_negative_int, help="0 = off")
    group.add_argument("--top-p", type=finite_float, help="1.0 = off")
    group.add_argument("--repetition-penalty", type=finite_float)
    group.add_argument("--seed", type=seed_int, default=0, help="sampling seed (0 to 2**32-1)")


def open_pipeline(args: argparse.Namespace):
    from runtime.pipeline import Pipeline

    if args.max_image_aspect < 1:
        raise UserError(f"--max-image-aspect {args.max_image_aspect:g} must be at least 1")
    pipe = Pipeline.from_artifacts(args.artifacts, args.backend, args.max_context, args.threads,
                                   args.verify_hash, huge_pages=args.huge_pages)
    pipe.artifacts.preprocessor.limits = ImageLimits(args.max_image_pixels, args.max_image_aspect)
    return pipe


def sampling_options(args: argparse.Namespace, pipe=None) -> SamplingOptions:
    """The flags given, over the model's own defaults (``pipe``'s manifest)."""
    defaults = pipe.artifacts.decoder.generation_defaults if pipe is not None else None
    return SamplingOptions.model_defaults(
        defaults, max_new_tokens=args.max_new_tokens, do_sample=args.do_sample,
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        repetition_penalty=args.repetition_penalty, seed=args.seed)


def exit_status(main: Callable[[], int], user_errors: tuple[type[BaseException], ...] = USER_ERRORS,
                interrupted: str | None = None) -> int:
    """Run an entry point and return its exit status: user errors become one ``error:`` line
    on stderr and 2, Ctrl-C 130. For a ``main(argv)`` that returns its status (export.engine)."""
    try:
        return main()
    except user_errors as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if interrupted:
            print(interrupted, file=sys.stderr)
        return 130


def run_cli(main: Callable[[], int], user_errors: tuple[type[BaseException], ...] = USER_ERRORS,
            interrupted: str | None = None) -> None:
    """Run an entry point and exit with ``exit_status``'s status."""
    sys.exit(exit_status(main, user_errors, interrupted))
