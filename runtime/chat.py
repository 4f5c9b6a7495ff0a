"""python -m runtime.chat: interactive multi-turn chat about images.

Each turn: optionally `/image PATH [PATH ...]` lines to attach images, then a question.
Commands: /image, /clear (new conversation), /quit. By default the KV cache is kept between
turns; --reencode re-encodes the whole conversation every turn as DSVL's chat.py does.
"""

from __future__ import annotations

import argparse
import shlex
import sys

from runtime.cli import USER_ERRORS, add_common_flags, open_pipeline, run_cli, sampling_options
from runtime.preprocess import load_image


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m runtime.chat", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_flags(parser)
    parser.add_argument("--reencode", action="store_true",
                        help="re-encode the whole history each turn (DSVL's chat.py behaviour)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    pipe = open_pipeline(args)
    chat = pipe.chat(reuse_cache=not args.reencode)
    options = sampling_options(args)
    pending: list = []
    print("DSVL chat. /image PATH... attaches images, /clear starts over, /quit leaves.", file=sys.stderr)
    for line in sys.stdin if not sys.stdin.isatty() else iter(lambda: input("> "), None):
        line = line.strip()
        if not line:
            continue
        if line in ("/quit", "/exit"):
            break
        if line == "/clear":
            chat, pending = pipe.chat(reuse_cache=not args.reencode), []
            print("(new conversation)", file=sys.stderr)
            continue
        if line.startswith("/image"):
            try:
                pending += [load_image(p, pipe.artifacts.preprocessor.check_size) for p in shlex.split(line)[1:]]
                print(f"({len(pending)} image(s) attached)", file=sys.stderr)
            except USER_ERRORS as err:
                print(f"error: {err}", file=sys.stderr)
            continue
        try:
            chat.ask(line, pending, options, stream=lambda piece: print(piece, end="", flush=True))
            print()
        except USER_ERRORS as err:
            print(f"error: {err}", file=sys.stderr)
        pending = []
    return 0


if __name__ == "__main__":
    run_cli(main)
