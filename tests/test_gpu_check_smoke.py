"""scripts/gpu_check.py's dry run on the CPU: every step of the GPU check runs (exports, the
PyTorch references, accuracy, speed, the JSON and the table), so a GPU session spends its
minutes measuring, not debugging. No timing thresholds; the figures mean nothing here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run_on_the_cpu(tmp_path: Path):
    proc = subprocess.run([sys.executable, "scripts/gpu_check.py", "--device", "cpu", "--quick",
                           "--projectors", "baseline", "--jobs", "1", "--out", str(tmp_path)],
                          capture_output=True, text=True, cwd=REPO, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert set(report["accuracy"]) == {"baseline", "baseline-mmca"}  # one projector: every code path
    for entry in report["accuracy"].values():  # fp32 on the CPU: the parity tests' accuracy
        assert entry["met"] and entry["greedy_equal"] and entry["finite"]
        assert entry["vision_cosine_fp32"] > 0.999999 and entry["top1_agreement"] == 1.0
    for name in ("baseline", "baseline-mmca"):
        speed = report["speed"][name]
        assert {"1", "4"} == set(speed["vision"]) and speed["first_token"]["ratio"] > 0
        for ctx in ("ctx64", "ctx1024"):
            assert {"pytorch", "ort", "ort-concat"} == set(speed["decode"][ctx])
            assert speed["decode"][ctx]["ort"]["floor_ms"] > 0
            assert 0 < speed["decode"][ctx]["ort"]["session_ms_mean"]
        for images in ("1", "4"):  # the CUDA-graph path's bookkeeping, on host buffers here
            assert speed["vision"][images]["graph_max_abs_diff"] == 0 and speed["vision"][images]["graph_ratio"] > 0
        assert speed["vision_placement"]["memcpy"] == []
        breakdown = speed["vision_breakdown"]
        assert {"encode", "session", "graph_on_device"} <= set(breakdown)
        assert breakdown["ops_ms_per_run"] and all(ms > 0 for ms in breakdown["ops_ms_per_run"].values())
    kv8 = report["kv8"]  # the int8 cache: export.quantize_kv, then the export's checks
    assert kv8["accuracy"]["finite"] and not kv8["placement"]["cpu_nodes"]
    assert {"ort", "ort-kv8", "pytorch"} == set(kv8["decode"]["ctx64"])
    assert report["argmax_ties"]["first_index"] == report["argmax_ties"]["rows"]  # numpy's rule
    assert set(report["export_s"]) >= {"baseline", "baseline-concat", "baseline-mmca", "baseline-kv8"}
    assert report["bandwidth"]["gb_per_s"] > 0 and report["machine"]["device"] == "cpu"
    assert all(set(p["nodes_by_provider"]) == {"CPUExecutionProvider"} and not p["cpu_nodes"] and p["memcpy"] == []
               for p in report["placement"].values()) and len(report["placement"]) == 2
    table = (tmp_path / "gpu_check.md").read_text()
    assert "| baseline-mmca |" in table and "decode step ctx1024 (ort-concat" in table
    assert "vision x4, CUDA graphs" in table and "int8 KV cache (`python -m export.quantize_kv`)" in table
    assert all(case["same_bits"] for case in report["host_casts"]["cases"])
    assert "Host fp16 conversions on this machine's CPU" in table
    assert "ORT vision x4 by op type" in table and "fp16 ArgMax ties on CPUExecutionProvider" in table


def test_gpu_check_refuses_cuda_without_a_gpu_in_one_line(tmp_path: Path, capsys):
    import torch

    if torch.cuda.is_available():
        import pytest

        pytest.skip("a CUDA GPU is here: the refusal is for machines without one")
    sys.path.insert(0, str(REPO))
    from scripts.gpu_check import main

    assert main(["--out", str(tmp_path)]) == 2  # in-process: the dry run above covers the script
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: --device cuda needs a CUDA GPU that PyTorch sees; use --device cpu for a dry run"]


def test_node_placement_is_read_from_the_session_log():
    sys.path.insert(0, str(REPO))
    from scripts.gpu_check import placement_from_log

    tag = "[V:onnxruntime:, session_state.cc:1598 VerifyEachNodeIsAssignedToAnEp]"
    log = "\n".join([
        f"2026-11-30 07:47:16.3 {tag} Node placements",
        f"2026-11-30 07:47:16.3 {tag}  Node(s) placed on [CUDAExecutionProvider]. Number of nodes: 95",
        f"2026-11-30 07:47:16.3 {tag}   MatMulNBits (/lm_head/MatMul)",
        f"2026-11-30 07:47:16.3 {tag}  Node(s) placed on [CPUExecutionProvider]. Number of nodes: 2",
        f"2026-11-30 07:47:16.3 {tag}   Shape (/Shape_8)",
        f"2026-11-30 07:47:16.3 {tag}   Cast (/Cast_9)",
        "2026-11-30 07:47:16.3 [V:onnxruntime:, session_state.cc:196 CreateGraphInfo] SaveMLValueNameIndexMapping"])
    assert placement_from_log(log) == {"nodes_by_provider": {"CUDAExecutionProvider": 95, "CPUExecutionProvider": 2},
                                       "cpu_nodes": ["Shape (/Shape_8)", "Cast (/Cast_9)"]}
    only_cpu = f"x {tag}  All nodes placed on [CPUExecutionProvider]. Number of nodes: 98"
    assert placement_from_log(only_cpu) == {"nodes_by_provider": {"CPUExecutionProvider": 98}, "cpu_nodes": []}


def test_a_failed_section_is_recorded_and_reported(capsys):
    """A GPU session's one run goes on past a failure: the section's entry holds the error, and
    the table says so."""
    sys.path.insert(0, str(REPO))
    from scripts.gpu_check import attempt, markdown

    def broken():
        raise RuntimeError("export.all --preset small failed")

    failed = attempt("small accuracy", broken)
    assert failed == {"error": "RuntimeError: export.all --preset small failed"}
    assert "FAILED small accuracy" in capsys.readouterr().err
    assert attempt("fine", lambda: {"x": 1}) == {"x": 1}
    report = {"machine": {"device": "cpu", "torch": "2", "onnxruntime": "1"},
              "bandwidth": {"gb_per_s": 10.0}, "accuracy": {"baseline": failed},
              "placement": {"baseline": failed}, "speed": {"baseline": failed}, "big": failed}
    table = markdown(report)
    assert "| baseline | failed: RuntimeError: export.all --preset small failed |" in table
    assert "Speed, baseline: failed" in table and "Big decoder: failed" in table


def test_exports_run_side_by_side_and_a_failed_one_is_left_to_its_section(tmp_path, monkeypatch, capsys):
    """``--jobs``: each planned export in its own process on its own cores, its messages in
    NAME.log; one that fails leaves no time in the report (its section makes it again and
    records why). Two exports that argparse refuses at once stand in for real ones."""
    sys.path.insert(0, str(REPO))
    import argparse

    from scripts import gpu_check

    monkeypatch.setattr(gpu_check, "planned_exports", lambda args, device: {
        name: ["--preset", "no-such-preset"] for name in ("first", "second")})
    args = argparse.Namespace(exports=str(tmp_path), jobs=2)
    report: dict = {"export_s": {}}
    gpu_check.export_in_parallel(args, gpu_check.Device("cpu"), report)
    assert report["export_s"] == {}
    for name in ("first", "second"):
        assert "invalid choice: 'no-such-preset'" in (tmp_path / f"{name}.log").read_text()
    err = capsys.readouterr().err
    assert "2 exports, 2 at a time" in err and err.count("FAILED (its section retries)") == 2
