"""float32 <-> float16 on the host: numpy's ``astype`` against ``runtime.half.convert`` (ONNX
Runtime's CPU ``Cast``), side by side on the arrays an fp16 export's runners convert. Writes a
JSON and prints a markdown table; each pair of timings is interleaved, medians compared.

    python scripts/bench_casts.py --json casts.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from runtime.half import convert  # noqa: E402
from scripts.bench.timing import interleaved, log  # noqa: E402

# (what, shape, from, to): what the runners convert for LLaMA-2-7B-sized fp16 exports
CASES = (
    ("pixels, 1 image 224 px", (1, 3, 224, 224), np.float32, np.float16),
    ("pixels, 4 images 224 px", (4, 3, 224, 224), np.float32, np.float16),
    ("image embeddings, 4 x 257 x 4096", (4, 257, 4096), np.float16, np.float32),
    ("prompt embeddings, 1024 x 4096", (1, 1024, 4096), np.float32, np.float16),
    ("logits row, 32000", (1, 32000), np.float16, np.float32),
    ("step embedding, 4096 (numpy below 8192)", (1, 1, 4096), np.float32, np.float16),
)


def run(repeats: int, warmup: int) -> dict:
    rng = np.random.default_rng(0)
    rows = []
    for what, shape, src, dst in CASES:
        array = rng.standard_normal(shape).astype(src)
        same = np.array_equal(convert(array, dst).view(np.uint16 if dst == np.float16 else np.uint32),
                              array.astype(dst).view(np.uint16 if dst == np.float16 else np.uint32))
        timed = interleaved({"numpy": lambda a=array, d=dst: a.astype(d),
                             "ort": lambda a=array, d=dst: convert(a, d)}, repeats, warmup)
        row = {"what": what, "shape": list(shape), "from": np.dtype(src).name, "to": np.dtype(dst).name,
               "numpy": timed["numpy"], "ort": timed["ort"], "same_bits": bool(same),
               "speedup": timed["numpy"]["median_ms"] / timed["ort"]["median_ms"]}
        rows.append(row)
        log(f"{what}: numpy {row['numpy']['median_ms']:.3f} ms, ORT {row['ort']['median_ms']:.3f} ms")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                        "numpy": np.__version__, "load_1min": load},
            "repeats": repeats, "cases": rows}


def markdown(report: dict) -> str:
    lines = ["| array | numpy astype (ms) | ONNX Runtime Cast (ms) | speedup | same bits |", "|---|---|---|---|---|"]
    for row in report["cases"]:
        lines.append(f"| {row['what']} ({row['from']} to {row['to']}) | {row['numpy']['median_ms']:.3f} | "
                     f"{row['ort']['median_ms']:.3f} | {row['speedup']:.1f}x | {row['same_bits']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python scripts/bench_casts.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--repeats", type=int, default=51)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args(argv)
    report = run(args.repeats, args.warmup)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    print(markdown(report))
    return 0 if all(row["same_bits"] for row in report["cases"]) else 1


if __name__ == "__main__":
    sys.exit(main())
