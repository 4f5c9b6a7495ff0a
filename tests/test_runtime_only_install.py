"""The runtime installs and runs alone: `pip install -e ".[ort]"` in a fresh venv (no PyTorch,
no transformers), then `runtime.generate` on an export, as on an edge box."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_runtime_only_install_generates_without_torch(tmp_path, exported):
    artifacts = exported()
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = str(venv / "bin" / "python")
    install = subprocess.run([python, "-m", "pip", "install", "-q", "--disable-pip-version-check",
                              "-e", f"{REPO}[ort]"], capture_output=True, text=True, timeout=900)
    if install.returncode and ("No matching distribution" in install.stderr
                               or "Could not fetch" in install.stderr):
        pytest.skip(f"the package index is unreachable: {install.stderr.strip().splitlines()[-1]}")
    assert install.returncode == 0, install.stderr
    for module in ("torch", "transformers", "onnx"):
        probe = subprocess.run([python, "-c", f"import {module}"], capture_output=True, timeout=120)
        assert probe.returncode != 0, f"{module} is importable in the runtime-only install"
    image = tmp_path / "image.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(image)
    run = subprocess.run([python, "-m", "runtime.generate", "--artifacts", str(artifacts), "--image",
                          str(image), "--prompt", "What is it?", "--max-new-tokens", "4", "--json"],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    assert len(result["generated_ids"]) >= 1 and result["backend"] == "ort-cpu"
