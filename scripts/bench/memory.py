"""Peak resident memory of a fresh process that loads one backend and answers a one-image
prompt (VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent across fork + exec)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

HIGH_WATER = """
def peak_rss_mb():
    status = open("/proc/self/status").read().split("VmHWM:")[1]
    return int(status.split()[0]) / 1024
"""
PEAK_RSS_ORT = HIGH_WATER + """
import json, sys
import numpy as np
from runtime.pipeline import Pipeline
from runtime.sampling import SamplingOptions
with Pipeline.from_artifacts(sys.argv[1], threads=int(sys.argv[2])) as pipe:
    size = pipe.artifacts.vision.image_size
    image = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    pipe.generate([image], sys.argv[3], SamplingOptions(max_new_tokens=32))
print(json.dumps({"peak_rss_mb": peak_rss_mb(), "torch_imported": "torch" in sys.modules}))
"""
PEAK_RSS_TORCH = HIGH_WATER + """
import json, sys
import torch
torch.set_num_threads(int(sys.argv[2]))
from dsvl.generate import generate
from dsvl.loading import WeightSource, load_model
from runtime.prompt import format_round
from runtime.sampling import SamplingOptions
model, tokenizer, loaded = load_model(WeightSource(preset=sys.argv[1]))
ids = torch.tensor(tokenizer(format_round(sys.argv[3], 1)).input_ids)
size = loaded.config.image_size
generate(model, ids, torch.randn(1, 3, size, size), SamplingOptions(max_new_tokens=32))
print(json.dumps({"peak_rss_mb": peak_rss_mb()}))
"""


def peak_rss(script: str, *args: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"peak RSS child failed: {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
