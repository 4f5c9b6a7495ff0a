"""Fuzz the command lines with generated bad inputs: every run must end with exit code 0, 1, 2
or 130, no traceback, within the per-call timeout.

    python scripts/fuzz_cli.py --count 200 --seed 0            # makes its own tiny export
    python scripts/fuzz_cli.py --artifacts artifacts --count 20 --json fuzz.json

Bounded: at most --count runs and --time-budget seconds, each run killed after --timeout.
Seeded: the same seed draws the same cases. It builds its bad inputs in a temporary directory:
corrupt, truncated and header-only (huge) PNGs, extreme aspect ratios, directories and text as
images, broken copies of the export (manifest as a list, missing keys, truncated ONNX, object
.npy, missing preprocessor config, corrupt tokenizer), and bad flags. Prints counts per CLI and,
last, one JSON summary line; exits 1 when any run failed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
ALLOWED = {0, 1, 2, 130}
CLIS = ("runtime.generate", "runtime.chat", "runtime.evaluate", "export.vision", "export.all", "export.quantize")


@dataclass
class Case:
    cli: str
    argv: list[str | bytes]
    stdin: bytes = b""
    label: str = ""


@dataclass
class Outcome:
    case: Case
    code: int | None
    seconds: float
    stderr_tail: str
    problem: str | None = None


@dataclass
class Inputs:
    """The bad (and a few good) files the cases draw from."""
    images: dict[str, Path] = field(default_factory=dict)
    exports: dict[str, Path] = field(default_factory=dict)
    files: dict[str, Path] = field(default_factory=dict)


# ------------------------------------------------------------------ bad files
def png_header_only(path: Path, width: int, height: int) -> Path:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))
    return path


def make_images(root: Path, rng: np.random.Generator) -> dict[str, Path]:
    root.mkdir()
    good = root / "good.png"
    Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(good)
    images = {"good": good}
    for name, (w, h) in {"wide-5000x1": (5000, 1), "tall-1x10000": (1, 10000), "wide-600x10": (600, 10)}.items():
        images[name] = root / f"{name}.png"
        Image.fromarray(np.zeros((h, w), np.uint8)).save(images[name])
    images["huge-13000sq"] = png_header_only(root / "huge.png", 13000, 13000)
    images["bomb-40000sq"] = png_header_only(root / "bomb.png", 40000, 40000)
    images["zero-0x0"] = png_header_only(root / "zero.png", 0, 0)
    data = good.read_bytes()
    images["truncated"] = root / "truncated.png"
    images["truncated"].write_bytes(data[: len(data) // 2])
    corrupt = bytearray(data)
    for i in rng.integers(8, len(corrupt), 40):
        corrupt[i] = int(rng.integers(0, 256))
    images["corrupt"] = root / "corrupt.png"
    images["corrupt"].write_bytes(bytes(corrupt))
    images["garbage"] = root / "garbage.jpg"
    images["garbage"].write_bytes(rng.integers(0, 256, 3000, dtype=np.uint8).tobytes())
    images["empty"] = root / "empty.png"
    images["empty"].write_bytes(b"")
    images["text"] = root / "text.png"
    images["text"].write_text("not an image\n")
    images["directory"] = root / "a-directory"
    images["directory"].mkdir()
    images["missing"] = root / "missing.png"
    return images


def _edit_manifest(path: Path, edit) -> None:
    manifest = json.loads((path / "manifest.json").read_text())
    manifest = edit(manifest)
    (path / "manifest.json").write_text(json.dumps(manifest))


def make_exports(good: Path, root: Path, rng: np.random.Generator) -> dict[str, Path]:
    """Broken copies of a good export, one problem each."""
    exports = {"good": good}

    def copy(name: str) -> Path:
        path = root / name
        shutil.copytree(good, path, ignore=shutil.ignore_patterns(".*"))
        exports[name] = path
        return path

    _edit_manifest(copy("manifest-list"), lambda m: [m])
    for section, key in (("vision", "file"), ("decoder", "num_layers"), ("tokenizer", "dir"),
                         ("decoder", "prompt_embeddings"), ("vision", "preprocessor")):
        def drop(m, section=section, key=key):
            del m[section][key]
            return m
        _edit_manifest(copy(f"no-{section}-{key}"), drop)
    _edit_manifest(copy("wrong-types"), lambda m: m | {"decoder": {**m["decoder"], "num_layers": "two"}})
    _edit_manifest(copy("path-escape"), lambda m: m | {"vision": {**m["vision"], "file": {
        **m["vision"]["file"], "path": "../../etc/passwd"}}})
    (copy("not-json") / "manifest.json").write_text("{ nope")
    path = copy("truncated-onnx")
    data = (path / "decoder.onnx").read_bytes()
    (path / "decoder.onnx").write_bytes(data[: len(data) // 3])
    path = copy("flipped-onnx")
    data = bytearray((path / "vision.onnx").read_bytes())
    data[int(rng.integers(0, len(data)))] ^= 0xFF
    (path / "vision.onnx").write_bytes(bytes(data))
    path = copy("object-npy")
    np.save(path / "lang_embed.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    (copy("no-preprocessor") / "preprocessor_config.json").unlink()
    (copy("corrupt-tokenizer") / "tokenizer" / "tokenizer.json").write_text("{ not json")
    (copy("empty-dir-as-export") / "manifest.json").unlink()
    exports["missing"] = root / "no-such-export"
    return exports


def make_files(root: Path, rng: np.random.Generator) -> dict[str, Path]:
    root.mkdir()
    files = {"text": root / "notes.txt", "garbage-bin": root / "garbage" / "pytorch_model.bin",
             "blocker": root / "a-file"}
    files["text"].write_text("hello world\nthis is text\n")
    files["garbage-bin"].parent.mkdir()
    files["garbage-bin"].write_bytes(rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
    files["blocker"].write_text("a regular file\n")
    return files


# ------------------------------------------------------------------ cases
BAD_RUNTIME_FLAGS = [
    ["--max-context", "-5"], ["--max-context", "0"], ["--max-context", "abc"], ["--seed", "-1"],
    ["--seed", str(2**40)], ["--temperature", "nan"], ["--temperature=-inf"], ["--temperature", "0"],
    ["--top-p", "2"], ["--top-k", "-1"], ["--repetition-penalty", "nan"], ["--repetition-penalty", "0"],
    ["--max-new-tokens", "0"], ["--backend", "bogus"], ["--threads", "-1"], ["--max-image-pixels", "0"],
    ["--max-image-aspect", "0.5"], ["--do-sample", "--temperature", "1e-30"], ["--unknown-flag"],
]
PROMPTS: list[str | bytes] = ["Describe the image.", "</s><s><PAD>### Image: <image>", "x" * 5000,
                              "", "héllo ✓ 🙂", b"caf\xe9 \xff\xfe", "<image>"]


def runtime_generate_case(rng: random.Random, inputs: Inputs) -> Case:
    kind = rng.choice(["image", "image", "flag", "export", "prompt"])
    export = inputs.exports["good"]
    argv: list[str | bytes] = ["--max-new-tokens", "2"]
    image = inputs.images["good"]
    if kind == "image":
        label = rng.choice(sorted(inputs.images))
        image = inputs.images[label]
    elif kind == "flag":
        flags = rng.choice(BAD_RUNTIME_FLAGS)
        argv += flags
        label = " ".join(flags)
    elif kind == "export":
        label = rng.choice(sorted(inputs.exports))
        export = inputs.exports[label]
    else:
        prompt = rng.choice(PROMPTS)
        argv += ["--raw-prompt"] if rng.random() < 0.3 else []
        return Case("runtime.generate", ["--artifacts", str(export), "--image", str(image), "--prompt",
                                         prompt, *argv], label=f"prompt {prompt[:20]!r}")
    return Case("runtime.generate", ["--artifacts", str(export), "--image", str(image),
                                     "--prompt", "Describe it.", *argv], label=f"{kind} {label}")


def runtime_chat_case(rng: random.Random, inputs: Inputs) -> Case:
    kind = rng.choice(["stdin", "stdin", "flag", "export"])
    export, argv = inputs.exports["good"], ["--max-new-tokens", "2"]
    lines = [b"Hello there"]
    if kind == "stdin":
        picks = [rng.choice(sorted(inputs.images)) for _ in range(2)]
        lines = [f"/image {inputs.images[p]}".encode() for p in picks]
        lines += [rng.choice([b"What is it?", b"/clear", b"/image", b"/image 'unterminated",
                              b"</s> <image>", b"", b"/unknown", "héllo".encode()]) for _ in range(2)]
        label = f"stdin {picks}"
    elif kind == "flag":
        flags = rng.choice(BAD_RUNTIME_FLAGS)
        argv += flags
        label = " ".join(flags)
    else:
        label = rng.choice(sorted(inputs.exports))
        export = inputs.exports[label]
    stdin = b"\n".join(lines + [b"/quit"]) + b"\n"
    return Case("runtime.chat", ["--artifacts", str(export), *argv], stdin=stdin, label=f"{kind} {label}")


EVAL_DATA: dict[str, object] = {  # label -> a DSVL eval JSON's content ({image}: a drawn image)
    "good": {"t": [["Describe it.", "{image}"], ["Why?"]]}, "text-only": {"t": [["Hello?"]]},
    "list": [["q", "{image}"]], "empty": {}, "no-rounds": {"t": []}, "three-fields": {"t": [["q", "{image}", "x"]]},
    "number": {"t": [[3]]}, "double-space": {"t": [["q", "{image}  {image}"]]},
    "nine-images": {"t": [["q", " ".join(["{image}"] * 9)]]}, "missing": {"t": [["q", "nowhere.png"]]},
    "special-text": {"t": [["</s><image>### Image:", "{image}"]]},
}


def runtime_evaluate_case(rng: random.Random, inputs: Inputs) -> Case:
    kind = rng.choice(["data", "data", "image", "flag", "export"])
    export, argv = inputs.exports["good"], ["--max-new-tokens", "2"]
    image, label, content = inputs.images["good"], "good", EVAL_DATA["good"]
    if kind == "data":
        label = rng.choice(sorted(EVAL_DATA) + ["not-json", "not-utf8"])
        content = EVAL_DATA.get(label)
    elif kind == "image":
        label = rng.choice(sorted(inputs.images))
        image = inputs.images[label]
    elif kind == "flag":
        flags = rng.choice(BAD_RUNTIME_FLAGS + [["--tests", "nope"], ["--image-root", "/nowhere"],
                                                ["--output", str(inputs.files["blocker"] / "out.csv")],
                                                ["--compare", str(inputs.files["text"])],
                                                ["--compare", str(inputs.files["garbage-bin"])],
                                                ["--compare", str(inputs.files["blocker"] / "x.csv")]])
        argv += flags
        label = " ".join(flags)
    else:
        label = rng.choice(sorted(inputs.exports))
        export = inputs.exports[label]
    folder = inputs.files["blocker"].parent
    data = folder / f"eval-{rng.randrange(10**6)}.json"
    if label == "not-json":
        data.write_text("{ not json")
    elif label == "not-utf8":
        data.write_bytes(b'{"t": [["caf\xe9"]]}')
    else:
        data.write_text(json.dumps(content).replace("{image}", str(image)))
    argv = ["--artifacts", str(export), "--eval-data", str(data), *argv]
    if "--output" not in argv:
        argv += ["--output", str(data.with_suffix(".csv"))]
    return Case("runtime.evaluate", argv, label=f"{kind} {label}")


def export_case(cli: str):
    def make(rng: random.Random, inputs: Inputs) -> Case:
        out = inputs.files["blocker"].parent / f"out-{rng.randrange(10**6)}"
        choices = [
            ["--opset", "99"], ["--opset", "16"], ["--seed", "-1"], ["--preset", "nope"],
            ["--vis-proj", "nope"], ["--precision", "fp8"],
            ["--checkpoint-path", str(inputs.files["text"])],
            ["--checkpoint-path", str(inputs.files["garbage-bin"].parent)],
            ["--checkpoint-path", str(inputs.files["blocker"].parent / "nowhere")],
            ["--vision-model-name-or-path", str(inputs.files["text"])],
            ["--lm-model-name-or-path", str(inputs.files["blocker"].parent / "nowhere")],
            ["--out", str(inputs.files["blocker"] / "out")],
        ]
        if cli == "export.all":
            choices += [["--kv-cache", "shared", "--enable-mmca-attention", "--decoder-graph", "traced"],
                        ["--kv-cache", "bogus"]]
        flags = rng.choice(choices)
        argv = flags if "--out" in flags else [*flags, "--out", str(out)]
        return Case(cli, argv, label=" ".join(flags))
    return make


def quantize_case(rng: random.Random, inputs: Inputs) -> Case:
    label = rng.choice(sorted(inputs.exports))
    flags = rng.choice([[], ["--bits", "3"], ["--block-size", "7"], ["--block-size", "48"],
                        ["--accuracy-level", "9"], ["--seed", "-1"], ["--no-check"]])
    out = inputs.files["blocker"].parent / f"q-{rng.randrange(10**6)}"
    if label == "good" and not flags:
        flags = ["--out", str(inputs.exports["good"])]  # --out is --artifacts itself
    argv = ["--artifacts", str(inputs.exports[label]), *flags]
    if "--out" not in flags:
        argv += ["--out", str(out)]
    return Case("export.quantize", argv, label=f"{label} {' '.join(flags)}")


MAKERS = {"runtime.generate": runtime_generate_case, "runtime.chat": runtime_chat_case,
          "runtime.evaluate": runtime_evaluate_case,
          "export.vision": export_case("export.vision"), "export.all": export_case("export.all"),
          "export.quantize": quantize_case}


# ------------------------------------------------------------------ running
def run_case(case: Case, timeout: float) -> Outcome:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", case.cli, *case.argv], cwd=REPO, env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        _, err = proc.communicate(case.stdin, timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        _, err = proc.communicate()
        return Outcome(case, None, time.perf_counter() - start, err.decode(errors="replace")[-400:],
                       f"hang: no exit within {timeout:g} s")
    text = err.decode(errors="replace")
    outcome = Outcome(case, proc.returncode, time.perf_counter() - start, text[-400:])
    if "Traceback (most recent call last)" in text:
        outcome.problem = "traceback"
    elif proc.returncode not in ALLOWED:
        outcome.problem = f"exit code {proc.returncode}"
    return outcome


def good_export(root: Path) -> Path:
    out = root / "export"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    subprocess.run([sys.executable, "-m", "export.all", "--out", str(out)], cwd=REPO, env=env,
                   check=True, capture_output=True, timeout=600)
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python scripts/fuzz_cli.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=100, help="runs in all (default 100)")
    parser.add_argument("--seed", type=int, default=0, help="draws the cases (default 0)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per run (default 120)")
    parser.add_argument("--time-budget", type=float, default=1800.0,
                        help="stop starting new runs after this many seconds (default 1800)")
    parser.add_argument("--artifacts", type=Path, help="a good export to break (default: make one)")
    parser.add_argument("--cli", action="append", choices=CLIS, help="only these CLIs (repeatable)")
    parser.add_argument("--json", type=Path, help="also write the summary here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    np_rng, rng = np.random.default_rng(args.seed), random.Random(args.seed)
    clis = args.cli or list(CLIS)
    with tempfile.TemporaryDirectory(prefix="dsvl-fuzz-") as tmp:
        root = Path(tmp)
        good = args.artifacts or good_export(root)
        inputs = Inputs()
        inputs.images = make_images(root / "images", np_rng)
        inputs.files = make_files(root / "files", np_rng)
        (root / "exports").mkdir()
        inputs.exports = make_exports(good, root / "exports", np_rng)
        outcomes: list[Outcome] = []
        for index in range(args.count):
            if time.perf_counter() - started > args.time_budget:
                print(f"time budget of {args.time_budget:g} s spent after {index} runs", flush=True)
                break
            case = MAKERS[clis[index % len(clis)]](rng, inputs)
            outcome = run_case(case, args.timeout)
            outcomes.append(outcome)
            mark = "FAIL " + outcome.problem if outcome.problem else f"ok (exit {outcome.code})"
            print(f"[{index + 1}/{args.count}] {case.cli:<17} {case.label[:60]:<60} {mark} "
                  f"{outcome.seconds:.1f} s", flush=True)
    summary = summarize(outcomes, args, time.perf_counter() - started)
    for cli, stats in summary["per_cli"].items():
        print(f"{cli:<17} {stats['runs']:>4} runs  {stats['failures']:>3} failures  "
              f"exit codes {stats['exit_codes']}")
    for failure in summary["failures"]:
        print(f"FAILED {failure['cli']} {failure['argv']}: {failure['problem']}\n  {failure['stderr_tail']}")
    line = json.dumps(summary)
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    print(line)
    return 1 if summary["failures"] else 0


def summarize(outcomes: list[Outcome], args: argparse.Namespace, seconds: float) -> dict:
    per_cli: dict[str, dict] = defaultdict(lambda: {"runs": 0, "failures": 0, "exit_codes": Counter()})
    failures = []
    for outcome in outcomes:
        stats = per_cli[outcome.case.cli]
        stats["runs"] += 1
        stats["exit_codes"][str(outcome.code)] += 1
        if outcome.problem:
            stats["failures"] += 1
            failures.append({"cli": outcome.case.cli, "label": outcome.case.label,
                             "argv": [a if isinstance(a, str) else repr(a) for a in outcome.case.argv],
                             "problem": outcome.problem, "stderr_tail": outcome.stderr_tail})
    return {"seed": args.seed, "runs": len(outcomes), "failures": failures, "seconds": round(seconds, 1),
            "per_cli": {cli: {**s, "exit_codes": dict(s["exit_codes"])} for cli, s in per_cli.items()}}


if __name__ == "__main__":
    sys.exit(main())
