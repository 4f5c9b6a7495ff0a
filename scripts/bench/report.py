"""The bench's report: the decode step's bandwidth floor, the top-level ratios, the targets
they are held to, and the markdown tables."""

from __future__ import annotations

from runtime import contract as c
from scripts.bench.exports import decoder_weight_bytes
from scripts.bench.settings import CONTEXTS, QUANTIZED

TARGETS = {  # name -> (ratio key, comparison, threshold, what it means)
    "vision": ("vision_latency_ratio", "<=", 0.7, "ORT vision latency <= 0.7x PyTorch (1 image, perceiver)"),
    "decode": ("decode_speedup", ">=", 1.5, "ORT decode tok/s >= 1.5x PyTorch (ctx 64)"),
    "int4_speed": ("int4_speedup", ">=", 3.0, "int4 tok/s >= 3x fp32 ORT (ctx 64)"),
    "int4_agreement": ("int4_top1_agreement", ">=", 0.95, "int4 top-1 agreement >= 95% (teacher forcing)"),
    "context": ("ctx1024_over_ctx64", "<=", 1.3, "ORT decode step at ctx 1024 <= 1.3x ctx 64"),
    "python": ("python_overhead_fraction", "<=", 0.05, "Python outside the session <= 5% of a decode step"),
}


def bandwidth_floor(report: dict, exports: dict) -> dict:
    """Decode step floor: weight bytes read per token over the measured memory bandwidth."""
    bandwidth = report["bandwidth"]["gb_per_s"] * 1e9
    decode = report["decode"]["ctx64"]
    floor = {}
    for name in ["fp32", *QUANTIZED]:
        weight = decoder_weight_bytes(exports["dirs"][name] / c.DECODER_FILE)
        floor[name] = {"weight_mb": weight / 1e6, "floor_ms": 1e3 * weight / bandwidth,
                       "bandwidth_fraction": 1e3 * weight / bandwidth / decode[name]["median_ms"]}
    floor["pytorch"] = dict(floor["fp32"], bandwidth_fraction=floor["fp32"]["floor_ms"]
                            / decode["pytorch"]["median_ms"])
    return floor


def ratios(report: dict) -> dict:
    decode64 = report["decode"]["ctx64"]
    ctx1024 = report["decode"]["ctx1024"]["fp32"]["median_ms"] / decode64["fp32"]["median_ms"]
    return {
        "vision_latency_ratio": report["vision"]["perceiver"]["1"]["ratio"],
        "decode_speedup": decode64["fp32"]["tokens_per_s"] / decode64["pytorch"]["tokens_per_s"],
        "int4_speedup": decode64["int4"]["tokens_per_s"] / decode64["fp32"]["tokens_per_s"],
        "int4_top1_agreement": report["agreement"]["int4"]["top1_agreement"],
        "ctx1024_over_ctx64": ctx1024,
        "python_overhead_fraction": decode64["fp32"]["python_overhead_fraction"],
        "bandwidth_fraction": report["floor"]["fp32"]["bandwidth_fraction"],
    }


def target_rows(report: dict) -> dict:
    rows = {}
    for name, (key, op, threshold, text) in TARGETS.items():
        value = report[key]
        met = value <= threshold if op == "<=" else value >= threshold
        rows[name] = {"target": text, "ratio_key": key, "value": value, "threshold": threshold, "met": met}
    return rows


def _ms(entry: dict) -> str:
    return f"{entry['median_ms']:.1f} [{entry['p10_ms']:.1f}–{entry['p90_ms']:.1f}]"


def markdown(report: dict) -> str:
    m, s = report["machine"], report["settings"]
    backends = ["pytorch", "fp32", "int4"]
    head = ["| measure | PyTorch eager fp32 | ORT CPU fp32 | ORT CPU int4 | ORT fp32 / PyTorch |",
            "|---|---|---|---|---|"]
    lines = [f"Machine: {m['cpu']}, {m['cores']} cores ({', '.join(m['simd'])}), {m['memory_gb']} GB; "
             f"Python {m['python']}, torch {m['torch']}, onnxruntime {m['onnxruntime']}, numpy {m['numpy']}.",
             f"Threads: {m['thread_note']}. Load average {m['load_average_start']:.2f} at start, "
             f"{m['load_average_end']:.2f} at end.",
             f"Preset `{s['preset']}` (seeded random weights); times in ms: median [p10–p90] over "
             f"{s['repeats']} repeats after {s['warmup']} warm-up (decode: {s['decode_runs']} runs x "
             f"{s['decode_steps']} steps). Decoder KV cache: `{s['kv_cache']}`.", ""] + head
    for vis_proj, sizes in report["vision"].items():
        for images, entry in sizes.items():
            lines.append(f"| vision + projector `{vis_proj}`, {images} image(s) | {_ms(entry['pytorch'])} | "
                         f"{_ms(entry['ort'])} | (same vision.onnx) | {entry['ratio']:.2f}x |")
    ttft = report["ttft"]
    lines.append(f"| time to first token, 1 image ({ttft['prompt_positions']} positions) | "
                 + " | ".join(_ms(ttft[b]) for b in backends)
                 + f" | {ttft['fp32']['median_ms'] / ttft['pytorch']['median_ms']:.2f}x |")
    for context in CONTEXTS:
        d = report["decode"][f"ctx{context}"]
        cells = [f"{d[b]['median_ms']:.1f} ms = {d[b]['tokens_per_s']:.1f} tok/s" if b in d else "—"
                 for b in backends]
        lines.append(f"| decode step, context {context} | " + " | ".join(cells)
                     + f" | {d['fp32']['tokens_per_s'] / d['pytorch']['tokens_per_s']:.2f}x tok/s |")
    d64 = report["decode"]["ctx64"]
    lines.append("| Python outside the session, ctx 64 decode step | — | "
                 f"{d64['fp32']['python_overhead_fraction']:.1%} | {d64['int4']['python_overhead_fraction']:.1%} | |")
    floor = report["floor"]
    lines.append(f"| decoder weights read per token (MB) | {floor['fp32']['weight_mb']:.1f} | "
                 f"{floor['fp32']['weight_mb']:.1f} | {floor['int4']['weight_mb']:.1f} | |")
    lines.append(f"| bandwidth floor per token (ms) at {report['bandwidth']['gb_per_s']:.1f} GB/s | "
                 f"{floor['fp32']['floor_ms']:.2f} | {floor['fp32']['floor_ms']:.2f} | {floor['int4']['floor_ms']:.2f} | |")
    lines.append(f"| floor / measured step (ctx 64) | {floor['pytorch']['bandwidth_fraction']:.1%} | "
                 f"{floor['fp32']['bandwidth_fraction']:.1%} | {floor['int4']['bandwidth_fraction']:.1%} | |")
    agree = report["agreement"]
    lines.append(f"| top-1 agreement with PyTorch, {agree['int4']['tokens']} teacher-forced tokens | "
                 f"(reference) | {agree['fp32']['top1_agreement']:.1%} | {agree['int4']['top1_agreement']:.1%} | |")
    lines.append(f"| logits max abs error vs PyTorch | — | {agree['fp32']['logits_max_abs_err']:.2g} | "
                 f"{agree['int4']['logits_max_abs_err']:.2g} | |")
    mem = report["memory"]
    lines.append(f"| peak RSS, fresh process, 1-image prompt + 32 tokens (MB) | {mem['pytorch']['peak_rss_mb']:.0f} | "
                 f"{mem['fp32']['peak_rss_mb']:.0f} | {mem['int4']['peak_rss_mb']:.0f} | |")
    sizes = report["sizes_mb"]
    lines.append(f"| decoder.onnx (MB) | — | {sizes['decoder.onnx (fp32)']:.1f} | {sizes['decoder.onnx (int4)']:.1f} | |")
    lines += ["", "| quantized decoder | tok/s ctx 64 | speedup vs ORT fp32 | top-1 agreement | logits max abs err | decoder.onnx MB |",
              "|---|---|---|---|---|---|"]
    for name in QUANTIZED:
        entry = d64[name]
        lines.append(f"| {name} (accuracy_level {QUANTIZED[name][1]}) | {entry['tokens_per_s']:.1f} | "
                     f"{entry['tokens_per_s'] / d64['fp32']['tokens_per_s']:.2f}x | "
                     f"{agree[name]['top1_agreement']:.1%} | {agree[name]['logits_max_abs_err']:.3g} | "
                     f"{sizes[f'decoder.onnx ({name})']:.1f} |")
    lines += ["", "| other | value |", "|---|---|",
              f"| memory bandwidth (numpy copy, read+write) | {report['bandwidth']['gb_per_s']:.1f} GB/s |",
              f"| reference top-1 margin (median top1 − top2 logit) | {agree['reference_top1_margin_median']:.3f} |",
              f"| peak RSS of this bench process | {mem['bench_process_peak_rss_mb']:.0f} MB |"]
    for what, seconds in report["export_s"].items():
        lines.append(f"| {what} | {seconds:.1f} s |")
    for name, mb in sizes.items():
        if not name.startswith("decoder.onnx"):
            lines.append(f"| {name} | {mb:.1f} MB |")
    lines += ["", "| target | measured | met |", "|---|---|---|"]
    for row in report["targets"].values():
        lines.append(f"| {row['target']} | `{row['ratio_key']}` = {row['value']:.3g} | "
                     f"{'yes' if row['met'] else '**no**'} |")
    lines.append(f"| (reported) decode step floor / measured, ORT fp32 ctx 64 | "
                 f"`bandwidth_fraction` = {report['bandwidth_fraction']:.3g} | |")
    return "\n".join(lines)
