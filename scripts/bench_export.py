"""Peak memory and time of ``export.all`` against decoder depth: the streamed path beside the old one.

    python scripts/bench_export.py --preset dsvl-7b --layers 4 8 16 32 --precision fp16 \
        --json /tmp/bench_export.json
    python scripts/bench_export.py --preset dsvl-7b --layers 32 --weights int4
    python scripts/bench_export.py --preset dsvl-7b --layers 32 --checkpoint   # via a DSVL .bin
    python scripts/bench_export.py --preset small --layers 8 --old              # + the tracer
    python scripts/bench_export.py --decoder-only --layers 4 8 16 32            # export.decoder

Each export runs in its own process (``python -m export.all``); its peak RSS is the kernel's
(``os.wait4``'s ru_maxrss), and each export step's own peak is read from the progress lines
(export/cli.py resets the high-water mark per step). ``--old`` adds ``--decoder-graph traced``
(the whole model in RAM) where ``--old-max-layers`` allows. ``--checkpoint`` first writes a
DSVL-format ``pytorch_model.bin`` with the preset's shapes (random fp16 weights, tensor by
tensor) and exports through ``--checkpoint-path``. Outputs are deleted after each run unless
``--keep``. Writes a markdown table and, with ``--json``, every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from runtime import contract as c  # noqa: E402

STEP = re.compile(r"^\[(\d+)/\d+\] (.*) \.\.\.$")
DONE = re.compile(r"done in ([\d.]+) s(?:, peak RSS ([\d.]+) GB)?")


def run_export(flags: list[str], out: Path, module: str = "export.all") -> dict:
    """One export in a child process: wall time, peak RSS, per-step peaks, exit code."""
    command = [sys.executable, "-m", module, *flags, "--out", str(out)]
    print("$ " + " ".join(command[1:]), file=sys.stderr, flush=True)
    load = os.getloadavg()
    start = time.perf_counter()
    child = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True)
    steps, current, lines = [], None, []
    for line in child.stdout:
        line = line.rstrip("\n")
        lines.append(line)
        print("  " + line, file=sys.stderr, flush=True)
        if m := STEP.match(line):
            current = m.group(2)
        elif (m := DONE.search(line)) and current:
            steps.append({"step": current, "seconds": float(m.group(1)),
                          "peak_rss_gb": float(m.group(2)) if m.group(2) else None})
            current = None
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - start
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) if out.exists() else 0
    return {"command": " ".join(command[1:]), "exit_code": os.waitstatus_to_exitcode(status),
            "seconds": round(seconds, 1), "peak_rss_gb": round(usage.ru_maxrss * 1024 / 1e9, 2),
            "steps": steps, "output_gb": round(size / 1e9, 2),
            "load_before": [round(x, 2) for x in load], "load_after": [round(x, 2) for x in os.getloadavg()],
            "tail": lines[-3:]}


def decoder_peak(result: dict) -> float | None:
    peaks = [s["peak_rss_gb"] for s in result["steps"]
             if "decoder" in s["step"] and s["peak_rss_gb"] is not None]
    return max(peaks) if peaks else None


def write_checkpoint(preset: str, layers: int, path: Path) -> dict:
    """A DSVL-format pytorch_model.bin with the preset's shapes, random fp16 weights, written
    tensor by tensor (dsvl/checkpoint_writer.py)."""
    import torch

    from dsvl.checkpoint_writer import write_dsvl_checkpoint
    from dsvl.lazy_weights import open_decoder_weights
    from dsvl.loading import WeightSource, load_vision
    from export.decoder_stream import load_tokenizer_for

    src = WeightSource(preset=preset, seed=7, preset_layers=layers)
    vision, _ = load_vision(src)
    weights = open_decoder_weights(src, len(load_tokenizer_for(src)))

    def tensors():
        for prefix, module in (("vis_encoder.", vision.vis_encoder), ("projection.", vision.projection)):
            for name, tensor in module.state_dict().items():
                yield prefix + name, tensor.to(torch.float16)
        yield "lang_embed.weight", weights.prompt_embedding(torch.float16)
        for name in weights.names():
            yield "lang_decoder." + name, weights.get(name, torch.float16)

    start = time.perf_counter()
    path.parent.mkdir(parents=True, exist_ok=True)
    write_dsvl_checkpoint(path, tensors())
    return {"path": str(path), "gb": round(path.stat().st_size / 1e9, 2),
            "seconds": round(time.perf_counter() - start, 1), "vis_proj": vision.vis_proj}


def markdown(rows: list[dict]) -> str:
    lines = ["| path | layers | flags | exit | wall (s) | peak RSS (GB) | decoder-stage peak (GB) | output (GB) | load before |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['path']} | {r['layers']} | {r['flags']} | {r['exit_code']} | {r['seconds']} | "
                     f"{r['peak_rss_gb']} | {decoder_peak(r) or '-'} | {r['output_gb']} | "
                     f"{r['load_before'][0]} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python scripts/bench_export.py", description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="dsvl-7b")
    parser.add_argument("--layers", type=int, nargs="+", default=[4, 8, 16, 32])
    parser.add_argument("--precision", choices=("fp32", "fp16"), default="fp16")
    parser.add_argument("--weights", choices=("float", "int4", "int8"), default="float")
    parser.add_argument("--old", action="store_true", help="also run the tracer (--decoder-graph traced)")
    parser.add_argument("--old-max-layers", type=int, default=4,
                        help="deepest decoder the old path is tried on (it holds 2-4x the model)")
    parser.add_argument("--checkpoint", action="store_true",
                        help="export from a DSVL-format checkpoint written first (--checkpoint-path)")
    parser.add_argument("--decoder-only", action="store_true",
                        help="run export.decoder (the decoder stage alone, no vision export)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench_export"))
    parser.add_argument("--keep", action="store_true", help="keep the exports")
    parser.add_argument("--json", type=Path)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rows = []
    for layers in args.layers:
        base = ["--preset", args.preset, "--preset-layers", str(layers), "--precision", args.precision]
        runs = [("streamed", base + ["--weights", args.weights])]
        if args.old and layers <= args.old_max_layers and args.weights == "float":
            runs.append(("traced (old)", base + ["--decoder-graph", c.GRAPH_TRACED, "--kv-cache", c.KV_FLAG_CONCAT]))
        checkpoint = None
        if args.checkpoint:
            path = args.work / f"checkpoint-{layers}" / "pytorch_model.bin"
            checkpoint = write_checkpoint(args.preset, layers, path)
            print(f"wrote {checkpoint}", file=sys.stderr)
            runs = [("streamed, --checkpoint-path",
                     base + ["--checkpoint-path", str(path), "--weights", args.weights])]
        for label, flags in runs:
            out = args.work / f"out-{layers}-{label.split()[0]}"
            result = run_export(flags, out, "export.decoder" if args.decoder_only else "export.all")
            result.update(path=label, layers=layers, flags=" ".join(flags[4:]),
                          checkpoint=checkpoint)
            rows.append(result)
            if not args.keep:
                shutil.rmtree(out, ignore_errors=True)
        if checkpoint and not args.keep:
            shutil.rmtree(Path(checkpoint["path"]).parent, ignore_errors=True)
    table = markdown(rows)
    print(table)
    if args.json:
        args.json.write_text(json.dumps({"machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                                                     "machine": platform.machine()},
                                         "runs": rows, "table": table}, indent=2))
    return 0 if all(r["exit_code"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
