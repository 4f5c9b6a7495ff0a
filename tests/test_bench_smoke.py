"""scripts/bench.py --quick runs end to end and writes the JSON the docs quote.

No timing thresholds: the figures depend on the machine (and on what else runs on it); this
only checks that every figure is there and positive.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RATIOS = ("vision_latency_ratio", "decode_speedup", "int4_speedup", "int4_top1_agreement",
          "ctx1024_over_ctx64", "python_overhead_fraction", "bandwidth_fraction")


def positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_quick_bench_writes_json(tmp_path: Path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "scripts/bench.py", "--quick", "--json", str(out)],
                          capture_output=True, text=True, cwd=REPO, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    for key in RATIOS:
        assert positive(report[key]), (key, report.get(key))
    assert 0 < report["int4_top1_agreement"] <= 1 and 0 < report["python_overhead_fraction"] < 1
    assert set(report["targets"]) and all(isinstance(t["met"], bool) for t in report["targets"].values())

    machine = report["machine"]
    assert machine["cpu"] and machine["cores"] >= 1 and machine["threads"] >= 1
    assert machine["torch"] and machine["onnxruntime"]
    assert positive(report["bandwidth"]["gb_per_s"])

    for vis_proj in ("baseline", "vit", "perceiver"):
        for images in ("1", "4"):
            entry = report["vision"][vis_proj][images]
            for side in ("pytorch", "ort"):
                assert all(positive(entry[side][k]) for k in ("median_ms", "p10_ms", "p90_ms"))
    for backend in ("pytorch", "fp32", "int4"):
        assert positive(report["ttft"][backend]["median_ms"])
        assert positive(report["memory"][backend]["peak_rss_mb"])
        for ctx in ("ctx64", "ctx1024"):
            assert positive(report["decode"][ctx][backend]["tokens_per_s"])
    assert report["memory"]["fp32"]["torch_imported"] is False  # the runtime runs without torch
    for name in ("fp32", "int4"):
        assert positive(report["floor"][name]["weight_mb"]) and positive(report["floor"][name]["floor_ms"])
        assert 0 < report["agreement"][name]["top1_agreement"] <= 1
    assert report["floor"]["int4"]["weight_mb"] < report["floor"]["fp32"]["weight_mb"]
    assert report["agreement"]["fp32"]["top1_agreement"] >= 0.9  # fp32: exact but for near-ties
    assert all(positive(s) for s in report["export_s"].values())
    assert all(positive(s) for s in report["sizes_mb"].values())

    table = proc.stdout
    assert table.startswith("Machine:") and "| measure |" in table and "| target |" in table
