"""One bench run, in order: bandwidth, exports, then each measure on the same weights and
inputs, then peak memory in fresh processes; returns every figure."""

from __future__ import annotations

import contextlib
import os
import resource
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from dsvl.loading import WeightSource, load_model
from runtime.pipeline import Pipeline
from runtime.prompt import format_round
from scripts.bench.agreement import bench_agreement
from scripts.bench.decode import bench_decode
from scripts.bench.exports import make_exports, sizes_mb
from scripts.bench.latency import bench_first_token, bench_vision
from scripts.bench.machine import machine_info, memory_bandwidth
from scripts.bench.memory import PEAK_RSS_ORT, PEAK_RSS_TORCH, peak_rss
from scripts.bench.profiles import bench_profiles
from scripts.bench.report import bandwidth_floor, ratios, target_rows
from scripts.bench.settings import QUANTIZED, QUESTION, Settings
from scripts.bench.timing import log


def run(settings: Settings) -> dict:
    torch.set_num_threads(settings.threads)
    report: dict = {"settings": asdict(settings), "machine": machine_info(settings.threads)}
    if report["machine"]["load_average_start"] > 0.5 * (os.cpu_count() or 1):
        log(f"warning: load average {report['machine']['load_average_start']:.1f} on "
            f"{os.cpu_count()} cores: other processes compete for the CPU; timings will be noisy")
    log("== memory bandwidth")
    report["bandwidth"] = memory_bandwidth(settings.bandwidth_mb)
    with tempfile.TemporaryDirectory(prefix="dsvl-bench-") as tmp:
        log("== exports")
        with contextlib.redirect_stdout(sys.stderr):
            exports = make_exports(settings, Path(tmp))
        report["export_s"] = exports["export_s"]
        report["sizes_mb"] = sizes_mb(exports)
        log("== loading PyTorch reference and ONNX Runtime pipelines")
        model, _tokenizer, loaded = load_model(WeightSource(preset=settings.preset))
        with contextlib.ExitStack() as stack:
            pipes = {name: stack.enter_context(Pipeline.from_artifacts(path, threads=settings.threads))
                     for name, path in exports["dirs"].items()}
            measure(settings, report, exports, model, pipes, loaded.config.image_size)
        log("== peak RSS (fresh processes)")
        threads = str(settings.threads)
        report["memory"] = {
            "pytorch": peak_rss(PEAK_RSS_TORCH, settings.preset, threads, QUESTION),
            "fp32": peak_rss(PEAK_RSS_ORT, str(exports["dirs"]["fp32"]), threads, QUESTION),
            "int4": peak_rss(PEAK_RSS_ORT, str(exports["dirs"]["int4"]), threads, QUESTION),
            "bench_process_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    report["machine"]["load_average_end"] = os.getloadavg()[0]
    report.update(ratios(report))
    report["targets"] = target_rows(report)
    return report


def measure(settings: Settings, report: dict, exports: dict, model, pipes: dict[str, Pipeline],
            size: int) -> None:
    """Every in-process measure, into ``report``: vision, first token, decode, agreement."""
    pixels = np.random.default_rng(1).standard_normal((1, 3, size, size)).astype(np.float32)
    ids = pipes["fp32"].tokenizer.encode(format_round(QUESTION, 1))
    log("== vision + projector latency")
    report["vision"] = bench_vision(settings, exports, model, pipes["fp32"], size)
    log("== time to first token")
    report["ttft"] = bench_first_token(settings, model, {k: pipes[k] for k in ("fp32", "int4")}, ids, pixels)
    log("== decode")
    report["decode"] = {
        "ctx64": bench_decode(settings, model, pipes, 64, ["pytorch", "fp32", *QUANTIZED]),
        "ctx1024": bench_decode(settings, model, pipes, 1024, ["pytorch", "fp32", "int4"])}
    log("== teacher-forced agreement with the PyTorch reference")
    report["agreement"] = bench_agreement(settings, model, pipes, ids, pixels)
    report["floor"] = bandwidth_floor(report, exports)
    if settings.profile:
        log("== op profiles (ONNX Runtime profiler, torch.profiler)")
        report["profiles"] = bench_profiles(settings, model, exports, pipes,
                                            report["ttft"]["prompt_positions"])
