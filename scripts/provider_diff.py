"""Where two ONNX Runtime execution providers part on an export's decoder.onnx: every node's
output becomes a graph output, one prompt pass runs on each provider with the same inputs, and
the nodes are listed in graph order with their error. The first node past the tolerance is where
to look (an op one provider computes differently, a dtype, a length input). Plain
``session.run``, no IO binding: if this agrees and the runtime does not, the binding is at fault.

    python scripts/provider_diff.py --artifacts DIR [--providers cpu,cuda] [--seq 8] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from runtime import contract as c  # noqa: E402
from runtime.artifacts import open_artifacts  # noqa: E402

PROVIDERS = {"cpu": ["CPUExecutionProvider"], "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"]}


def every_output_model(path: Path, work: Path) -> tuple[Path, list[tuple[str, str, str]]]:
    """``path``'s graph with each node's outputs also graph outputs (untyped: ONNX Runtime infers
    them), saved under ``work``; and (output, op, node) in graph order."""
    import onnx
    from onnx import helper

    model = onnx.load(str(path))  # the weights too: saved again beside the copy
    graph = model.graph
    listed = {o.name for o in graph.output}
    order = []
    for node in graph.node:
        for name in node.output:
            if name and name not in listed:
                graph.output.append(helper.make_empty_tensor_value_info(name))
                listed.add(name)
            if name:
                order.append((name, node.op_type, node.name))
    out = work / "every_output.onnx"
    onnx.save(model, str(out), save_as_external_data=True, all_tensors_to_one_file=True,
              location="every_output.data")
    return out, order


def feeds_for(session, spec, seq: int, seed: int) -> dict[str, np.ndarray]:
    """One prompt pass of ``seq`` positions from an empty cache, as the export's own checks feed
    it (``CacheFeed``): an in-place cache's past inputs span the pass, a concat cache's are empty."""
    from export.cache_feed import CacheFeed

    length = seq if spec.kv_cache != c.KV_CONCAT else 0
    feed = CacheFeed(session, spec.num_kv_heads, spec.head_dim, length)
    mask = np.ones((1, seq), np.int64)
    if spec.enable_mmca_attention:
        mask[0, 1:seq // 2] = 2  # image positions: MMCA's second softmax
    embeds = np.random.default_rng(seed).standard_normal((1, seq, spec.hidden_size)) * 0.5
    return feed.feeds(embeds, mask)


def compare(order, want: dict, got: dict, tolerance: float) -> list[dict]:
    rows = []
    for name, op, node in order:
        a, b = want.get(name), got.get(name)
        if not isinstance(a, np.ndarray) or not isinstance(b, np.ndarray):
            continue
        row = {"output": name, "op": op, "node": node, "shape": list(a.shape), "dtype": str(a.dtype)}
        if a.shape != b.shape:
            row |= {"error": f"shapes {list(a.shape)} and {list(b.shape)}", "bad": True}
        else:
            a64, b64 = np.atleast_1d(a.astype(np.float64)), np.atleast_1d(b.astype(np.float64))
            scale = float(np.abs(a64[np.isfinite(a64)]).max()) if np.isfinite(a64).any() else 0.0
            diff = np.abs(a64 - b64)
            diff[np.isnan(a64) & np.isnan(b64)] = 0
            err = float(np.nanmax(diff)) if diff.size else 0.0
            if np.isnan(diff).any():
                err = float("inf")
            row |= {"max_abs_err": err, "scale": scale, "rel": err / max(scale, 1e-6),
                    "finite": bool(np.isfinite(b64).all())}
            row["bad"] = not (row["rel"] <= tolerance) or (row["finite"] is False and bool(np.isfinite(a64).all()))
            if a.size <= 8:
                row |= {"want": a.ravel().tolist(), "got": b.ravel().tolist()}
        rows.append(row)
    return rows


def run(args: argparse.Namespace) -> dict:
    import onnxruntime as ort

    art = open_artifacts(args.artifacts)
    spec = art.decoder
    report = {"artifacts": str(args.artifacts), "providers": args.providers, "seq": args.seq}
    with tempfile.TemporaryDirectory() as work:
        path, order = every_output_model(art.root / spec.file.path, Path(work))
        results = []
        for name in args.providers.split(","):
            session = ort.InferenceSession(str(path), providers=PROVIDERS[name])
            feeds = feeds_for(session, spec, args.seq, args.seed)
            names = [o.name for o in session.get_outputs()]
            results.append(dict(zip(names, session.run(names, feeds), strict=True)))
            del session
    rows = compare(order, *results, args.tolerance)
    bad = [r for r in rows if r["bad"]]
    report |= {"nodes": len(rows), "bad": len(bad), "first_bad": bad[: args.top],
               "small_outputs": [r for r in rows if "want" in r][: args.top]}
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python scripts/provider_diff.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--artifacts", required=True, type=Path, help="an export folder (python -m export.all --out)")
    p.add_argument("--providers", default="cpu,cuda", help="two of cpu, cuda: the first is the reference")
    p.add_argument("--seq", type=int, default=8, help="prompt positions (default 8)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tolerance", type=float, default=1e-2, help="relative error that marks a node (default 0.01)")
    p.add_argument("--top", type=int, default=12, help="nodes listed (default 12)")
    p.add_argument("--json", type=Path, help="also write the report here")
    args = p.parse_args(argv)
    names = args.providers.split(",")
    if len(names) != 2 or not set(names) <= set(PROVIDERS):
        p.error(f"--providers: two of {', '.join(PROVIDERS)}, comma-separated")
    report = run(args)
    text = json.dumps(report, indent=1)
    if args.json:
        args.json.write_text(text)
    print(f"{args.artifacts}: {report['bad']} of {report['nodes']} node outputs differ beyond "
          f"{args.tolerance} ({args.providers})")
    for row in report["first_bad"]:
        verdict = row.get("error") or f"rel {row['rel']:.3g} finite {row['finite']}"
        print(f"  {row['op']:<32} {row['node']:<48} {verdict}")
    for row in report["small_outputs"]:
        print(f"  small {row['op']:<26} {row['output']:<40} want {row['want']} got {row['got']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
