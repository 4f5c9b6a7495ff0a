"""python -m runtime.chat: multi-turn chat about images, answering as DSVL's chat.py does.

Each turn: optionally `/image PATH [PATH ...]` lines to attach images, then a question.
Commands: /image, /clear (new conversation), /quit (or Ctrl-D). Ctrl-C stops an answer and
keeps the conversation. With --json (for scripts and evaluations driving a chat from stdin),
each turn prints one JSON object with the same fields as `runtime.generate --json`.

Modes: `exact` (default) gives DSVL's tokens, turn after turn, reusing the KV cache wherever
that is exact; `reencode` re-runs the whole conversation each turn as DSVL's chat.py does (same
tokens, slower); `approximate` keeps everything cached and runs only the new round, giving up
DSVL's re-embedding of earlier answers and its cross-turn image pairing (see docs/runtime.md).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING

from runtime.cli import USER_ERRORS, add_common_flags, open_pipeline, run_cli, sampling_options
from runtime.conversation import MODES
from runtime.preprocess import load_image

if TYPE_CHECKING:  # the pipeline loads onnxruntime: only when a chat starts (fast --help)
    from runtime.pipeline import Pipeline


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m runtime.chat", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_flags(parser)
    parser.add_argument("--mode", choices=MODES, default="exact",
                        help="exact (default: DSVL's tokens, cache reused where exact), reencode "
                             "(DSVL's full re-encoding every turn), approximate (fastest; gives up "
                             "DSVL's answer re-embedding and cross-turn image pairing)")
    parser.add_argument("--reencode", dest="mode", action="store_const", const="reencode",
                        help="same as --mode reencode")
    parser.add_argument("--truncate-history", action="store_true",
                        help="when the conversation outgrows the context, drop the oldest turns "
                             "(with a notice) instead of refusing the turn")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object per turn (prompt_ids, generated_ids, text, "
                             "stop_reason, timings, notes) instead of streaming text")
    return parser.parse_args(argv)


def lines(interactive: bool) -> Iterator[str]:
    """Input lines; Ctrl-D (EOF) ends the chat quietly."""
    if not interactive:
        yield from sys.stdin
        return
    while True:
        try:
            yield input("> ")
        except EOFError:
            print(file=sys.stderr)
            return
        except KeyboardInterrupt:  # Ctrl-C at the prompt drops the line, as shells do
            print(file=sys.stderr)


def _valid_utf8(line: str) -> bool:
    try:
        line.encode("utf-8")
    except UnicodeEncodeError:  # surrogate-escaped bytes from stdin
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with open_pipeline(args) as pipe:
        return converse(args, pipe)


def converse(args: argparse.Namespace, pipe: Pipeline) -> int:
    """Read a line, answer it, until /quit or the end of the input."""

    def new_chat():
        return pipe.chat(args.mode, args.allow_special_tokens, args.truncate_history)

    chat, options, pending = new_chat(), sampling_options(args, pipe), []
    print("DSVL chat. /image PATH... attaches images, /clear starts over, /quit leaves; "
          "Ctrl-C stops an answer.", file=sys.stderr)
    stream = None if args.json else (lambda piece: print(piece, end="", flush=True))
    if hasattr(sys.stdin, "reconfigure"):  # a bad byte must not end the session
        sys.stdin.reconfigure(errors="surrogateescape")
    for line in lines(sys.stdin.isatty()):
        line = line.strip()
        if not line:
            continue
        if not _valid_utf8(line):
            print("error: that line is not valid UTF-8 text; type it again", file=sys.stderr)
            continue
        if line in ("/quit", "/exit"):
            break
        if line == "/clear":
            chat, pending = new_chat(), []
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
            result = chat.ask(line, pending, options, stream=stream)
        except USER_ERRORS as err:
            print(f"error: {err}", file=sys.stderr)
            pending = []
            continue
        except KeyboardInterrupt:  # before the first token: the turn is dropped
            print("\n(interrupted; the question was not kept)", file=sys.stderr)
            continue
        pending = []
        if args.json:
            print(json.dumps(result.to_json(args.backend)), flush=True)
        else:
            print()
        if result.stop_reason == "interrupted":
            print("(answer stopped)", file=sys.stderr)
        for note in result.notes:
            print(f"note: {note}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    run_cli(main)
