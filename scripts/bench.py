"""PyTorch eager fp32 vs the ONNX Runtime CPU runtime (fp32, int4, int8): one run, same weights
and inputs.

    python scripts/bench.py --preset small --json /tmp/bench_small.json
    python scripts/bench.py --quick            # tiny preset, few repeats: a smoke run
    python scripts/bench.py --preset small --peers --json PATH   # + ONNX Runtime GenAI and llama.cpp

PyTorch is the dsvl/ reference (``model.encode_images``; the decoder with its own KV cache,
stepped as dsvl/generate.py does). ONNX Runtime is ``runtime.pipeline.Pipeline`` on an
``export.all`` export written to a temporary directory (export time measured), and on the
``export.quantize`` copies of it; the runtime is measured through its own seams (decode's
``on_step``/``sampler``/``stop_ids``, the runners' ``last_inference_time()``), never patched.
Both sides use the same thread count (all cores): the bench sets ``torch.set_num_threads`` and
ORT's ``intra_op_num_threads`` to it. Timed repeats of the two sides are interleaved, so a
change in background load hits both alike. Progress goes to stderr; the markdown tables go to
stdout; ``--json`` writes every raw figure and the top-level ratios. The parts live in
scripts/bench/ (one module per measure); this file parses the flags and runs them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from dsvl.config import PRESETS  # noqa: E402
from runtime import contract as c  # noqa: E402
from scripts.bench.profiles import profile_markdown  # noqa: E402
from scripts.bench.report import markdown  # noqa: E402
from scripts.bench.runs import run  # noqa: E402
from scripts.bench.settings import Settings  # noqa: E402
from scripts.bench.timing import log  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python scripts/bench.py",
        description="PyTorch eager fp32 vs the ONNX Runtime CPU runtime (fp32 and quantized "
                    "decoders) on one preset's seeded random weights: vision latency, time to "
                    "first token, decode tokens/s at two contexts, memory, sizes, export times, "
                    "the bandwidth floor and int4 agreement. Markdown on stdout.")
    parser.add_argument("--preset", choices=sorted(PRESETS),
                        help="model shapes (default: small; tiny with --quick)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write every figure as JSON")
    parser.add_argument("--repeats", type=int, help="timed repeats for latencies (default 10; 3 with --quick)")
    parser.add_argument("--decode-steps", type=int, help="decode steps per run (default 64; 8 with --quick)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(),
                        help="threads for both PyTorch and ONNX Runtime (default: all cores)")
    parser.add_argument("--quick", action="store_true", help="fast smoke run: tiny preset, few repeats")
    parser.add_argument("--kv-cache", choices=sorted(c.KV_CACHE_FLAGS), default=c.KV_FLAG_CONCAT,
                        help="decoder export's KV cache (see export.decoder --help; default concat)")
    parser.add_argument("--profile", action="store_true",
                        help="also profile decode steps and the prompt pass per op (ORT profiler, "
                             "torch.profiler) and add the breakdown to the output")
    parser.add_argument("--peers", action="store_true",
                        help="then run scripts/bench_peers.py (same preset, threads and --profile): our "
                             "decoder against ONNX Runtime GenAI and llama.cpp on identical weights; "
                             "adds \"peers\" to the JSON")
    parser.add_argument("--peers-args", default="", metavar="ARGS",
                        help="more arguments for bench_peers.py, one string (e.g. \"--llama-cpp-convert "
                             "PATH --peers-python PY\"; see python scripts/bench_peers.py --help)")
    return parser.parse_args(argv)


def run_peers(args: argparse.Namespace, preset: str) -> tuple[dict, str]:
    """scripts/bench_peers.py in this process, after the main bench (nothing else running):
    its report and markdown."""
    import shlex

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import bench_peers

    peer_args = ["--preset", preset, "--threads", str(args.threads), *shlex.split(args.peers_args)]
    if args.profile:
        peer_args.append("--profile")
    report = bench_peers.run(bench_peers.options_from(bench_peers.parse_args(peer_args)))
    return report, bench_peers.markdown(report)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quick = args.quick
    settings = Settings(preset=args.preset or ("tiny" if quick else "small"),
                        repeats=args.repeats or (3 if quick else 10), warmup=1 if quick else 2,
                        decode_runs=1 if quick else 3, decode_steps=args.decode_steps or (8 if quick else 64),
                        agreement_tokens=16 if quick else 256, bandwidth_mb=64 if quick else 512,
                        threads=args.threads, profile=args.profile, kv_cache=args.kv_cache)
    start = time.perf_counter()
    report = run(settings)
    table = markdown(report) + (profile_markdown(report["profiles"]) if "profiles" in report else "")
    if args.peers:
        log("== against ONNX Runtime GenAI and llama.cpp (scripts/bench_peers.py)")
        peers, peers_table = run_peers(args, settings.preset)
        report["peers"] = peers.pop("peers")
        report["peers_run"] = peers  # options, load, builds, skipped engines, ratios, profiles
        table += "\n\n" + peers_table
    report["bench_s"] = time.perf_counter() - start
    print(table)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report | {"markdown": table}, indent=2))
        log(f"wrote {args.json}")
    log(f"bench took {report['bench_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
