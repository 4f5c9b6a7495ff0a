"""python -m runtime.evaluate: run DSVL's evaluation sets on an exported model, as DSVL's own
eval/batch_generation.py does, and write its CSV.

The input is DSVL's eval JSON (eval/eval_data/eval_single.json, eval_comprehensive.json,
eval_robustness.json, or your own in that format): each test is a conversation, a list of
rounds ``[question, "image paths separated by spaces"]`` or ``[question]``. Each test starts a
new conversation; each round sends the round's images and its question in batch_generation.py's
prompts (a round's first image line reads ``### Image N:``, N the images so far; see
docs/runtime.md) with its history (each earlier round's prompt and answer, an EOS after each
answer) and re-encodes everything, as DSVL does. The output is batch_generation.py's CSV:
``test_name, image_path, question, answer`` per round (``image_path`` holds the round's last
field, so a round without images repeats its question, as DSVL writes it). So the CSV can be
compared row by row with the one DSVL writes for the same checkpoint (eval/results/).

Generation follows the model's own defaults and DSVL's 256-token answers, as batch_generation.py
does; the usual flags change them. ``--compare DSVL.csv`` then reports, answer by answer,
whether ours is identical to the one in DSVL's CSV and where the first difference is; the exit
status is 1 when any differs (as ``cmp``), 0 when all are identical.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image

from runtime.cli import add_common_flags, open_pipeline, run_cli, sampling_options
from runtime.durable import write_durable
from runtime.errors import UserError
from runtime.preprocess import load_image

if TYPE_CHECKING:  # the pipeline loads onnxruntime: only when the evaluation starts (fast --help)
    from runtime.pipeline import Pipeline

CSV_HEADER = ["test_name", "image_path", "question", "answer"]  # batch_generation.py's


@dataclass
class Round:
    question: str
    image_paths: list[str]  # as written in the JSON, split on spaces as DSVL splits them
    last_field: str  # what DSVL writes in the CSV's image_path column


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m runtime.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_flags(parser)
    parser.add_argument("--eval-data", type=Path, required=True, metavar="FILE",
                        help="DSVL's eval JSON (e.g. DeepSpeed-VisualChat/eval/eval_data/eval_single.json)")
    parser.add_argument("--image-root", type=Path, default=Path("."), metavar="DIR",
                        help="directory the JSON's relative image paths start from (default: the "
                             "current directory, as for DSVL, whose paths read ./eval/eval_data/images/...: "
                             "pass the DeepSpeed-VisualChat directory)")
    parser.add_argument("--output", type=Path, required=True, metavar="CSV",
                        help="where to write the CSV (written once every test has run)")
    parser.add_argument("--tests", nargs="+", metavar="NAME", help="run only these tests (default: all)")
    parser.add_argument("--compare", type=Path, metavar="CSV",
                        help="a CSV batch_generation.py wrote (e.g. DSVL's eval/results/...): report "
                             "which answers differ and where; exit status 1 if any does")
    return parser.parse_args(argv)


def read_eval_data(path: Path) -> dict[str, list[Round]]:
    """The tests of a DSVL eval JSON, checked: one line naming the problem if malformed."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise UserError(f"cannot read {path}: {err.strerror or err}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{path} is not a JSON file: {err}") from None
    if not isinstance(data, dict) or not data:
        raise UserError(f"{path}: expected DSVL's eval format, an object of test name -> rounds")
    tests = {}
    for name, rounds in data.items():
        if not isinstance(rounds, list) or not rounds:
            raise UserError(f"{path}: test {name!r} must be a non-empty list of rounds")
        parsed = []
        for index, pair in enumerate(rounds, 1):
            if (not isinstance(pair, list) or len(pair) not in (1, 2)
                    or not all(isinstance(field, str) for field in pair)):
                raise UserError(f"{path}: test {name!r} round {index} must be [question] or "
                                f"[question, \"image paths separated by spaces\"]")
            paths = [p.strip() for p in pair[1].split(" ")] if len(pair) == 2 else []
            if any(not p for p in paths):
                raise UserError(f"{path}: test {name!r} round {index} has an empty image path "
                                f"(two spaces in a row?): {pair[1]!r}")
            parsed.append(Round(pair[0], paths, pair[-1]))
        tests[name] = parsed
    return tests


def check_images(tests: dict[str, list[Round]], root: Path) -> None:
    """Every image exists and is an image before the first answer: a typo or a broken file
    must not cost an hour's run. Only headers are read here; sizes are checked on loading."""
    paths = sorted({p for rounds in tests.values() for r in rounds for p in r.image_paths})
    missing = [p for p in paths if not (root / p).is_file()]
    if missing:
        raise UserError(f"{len(missing)} image file(s) not found under {root}: {_first_few(missing)}; "
                        "pass --image-root (the directory DSVL ran from)")
    unreadable = [p for p in paths if not _has_image_header(root / p)]
    if unreadable:
        raise UserError(f"{len(unreadable)} file(s) under {root} are not images Pillow can open: "
                        f"{_first_few(unreadable)}")


def _first_few(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def _has_image_header(path: Path) -> bool:
    try:
        with Image.open(path):
            return True
    except Image.DecompressionBombError:
        return True  # an image: loading it names the pixel limit and its flag
    except (OSError, ValueError):
        return False


def evaluate(args: argparse.Namespace, pipe: Pipeline, tests: dict[str, list[Round]]) -> list[list[str]]:
    """The CSV's rows, in the JSON's order; progress on stderr."""
    options = sampling_options(args, pipe)
    check_size = pipe.artifacts.preprocessor.check_size
    rows = [CSV_HEADER]
    for number, (name, rounds) in enumerate(tests.items(), 1):
        chat = pipe.chat("exact", args.allow_special_tokens, template="eval")
        for index, r in enumerate(rounds, 1):
            try:
                images = [load_image(args.image_root / p, check_size) for p in r.image_paths]
                result = chat.ask(r.question, images, options)
            except UserError as err:
                raise UserError(f"test {name!r} round {index}: {err}") from None
            if result.stop_reason == "interrupted":  # a chat keeps going after Ctrl-C; a run stops
                raise KeyboardInterrupt
            rows.append([name, r.last_field, r.question, result.text])
            print(f"[{number}/{len(tests)}] {name} round {index}/{len(rounds)}: {len(result.tokens)} tokens "
                  f"({result.stop_reason}), {result.timings['total_s']:.1f} s", file=sys.stderr)
    return rows


def write_csv(rows: list[list[str]], path: Path) -> None:
    """batch_generation.py's CSV (Python's csv module, its default dialect), written whole."""
    text = io.StringIO(newline="")
    csv.writer(text).writerows(rows)
    try:
        write_durable(path, text.getvalue().encode("utf-8"))
    except OSError as err:
        raise UserError(f"cannot write {path}: {err.strerror or err}") from None


def check_output(path: Path) -> None:
    """The CSV can be written: checked before the first answer, not after the last."""
    folder = path.parent
    if path.is_dir():
        raise UserError(f"--output {path} is a directory: give a file name")
    if not folder.is_dir():
        raise UserError(f"--output {path}: {folder} is not a directory (create it first)")
    if not os.access(folder, os.W_OK):
        raise UserError(f"--output {path}: {folder} is not writable")


def read_csv(path: Path) -> list[list[str]]:
    """A batch_generation.py CSV's rows, header checked."""
    try:
        with open(path, newline="", encoding="utf-8") as file:
            rows = list(csv.reader(file))
    except OSError as err:
        raise UserError(f"cannot read {path}: {err.strerror or err}") from None
    except (UnicodeDecodeError, csv.Error) as err:
        raise UserError(f"{path} is not a CSV file: {err}") from None
    if not rows or rows[0] != CSV_HEADER:
        raise UserError(f"{path} is not a batch_generation.py CSV: its header should read "
                        f"{','.join(CSV_HEADER)}")
    if any(len(row) != len(CSV_HEADER) for row in rows[1:]):
        raise UserError(f"{path}: every row needs {len(CSV_HEADER)} fields")
    return rows


def compare(ours: list[list[str]], theirs: list[list[str]]) -> list[str]:
    """One line per answer that is not identical (rows paired by test and round; a row of a
    test only one side ran counts as a difference), then a summary line."""
    def keyed(rows: list[list[str]]) -> dict[tuple[str, int], list[str]]:
        seen: dict[str, int] = {}
        out = {}
        for row in rows[1:]:
            seen[row[0]] = seen.get(row[0], 0) + 1
            out[(row[0], seen[row[0]])] = row
        return out

    mine, reference = keyed(ours), keyed(theirs)
    lines, same = [], 0
    for key in [*mine, *(k for k in reference if k not in mine)]:
        where = f"{key[0]} round {key[1]}"
        if key not in reference or key not in mine:
            lines.append(f"{where}: only in {'ours' if key in mine else 'the reference'}")
            continue
        a, b = mine[key], reference[key]
        if a[2] != b[2]:
            lines.append(f"{where}: the questions differ ({a[2]!r} here, {b[2]!r} there)")
        elif a[3] == b[3]:
            same += 1
        else:
            pairs = enumerate(zip(a[3], b[3], strict=False))
            at = next((i for i, (x, y) in pairs if x != y), min(len(a[3]), len(b[3])))
            lines.append(f"{where}: answers differ from character {at} of {len(b[3])}: "
                         f"{a[3][at:at + 30]!r} here, {b[3][at:at + 30]!r} there")
    total = len(set(mine) | set(reference))
    lines.append(f"{same} of {total} answers identical to the reference")
    return lines


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    tests = read_eval_data(args.eval_data)
    if args.tests:
        unknown = [t for t in args.tests if t not in tests]
        if unknown:
            raise UserError(f"no test named {', '.join(map(repr, unknown))} in {args.eval_data}")
        tests = {t: tests[t] for t in args.tests}
    check_images(tests, args.image_root)
    check_output(args.output)
    reference = read_csv(args.compare) if args.compare else None
    with open_pipeline(args) as pipe:
        if pipe.artifacts.vision.random_weights:
            print("note: these artefacts hold RANDOM preset weights; the answers are noise", file=sys.stderr)
        rows = evaluate(args, pipe, tests)
    write_csv(rows, args.output)
    print(f"wrote {len(rows) - 1} answers to {args.output}", file=sys.stderr)
    if reference is None:
        return 0
    if args.tests:  # the reference's other tests were not run
        reference = [reference[0]] + [row for row in reference[1:] if row[0] in tests]
    report = compare(rows, reference)
    print("\n".join(report))
    return 0 if len(report) == 1 else 1


if __name__ == "__main__":
    run_cli(main, interrupted="interrupted: no CSV written")
