"""python -m export.vision as a user meets it: bad inputs end with one ``error:`` line, a
non-zero exit code, no traceback and no half-written artefacts.

Every case is one real subprocess. They are all started at once by a session fixture (each
spends most of its time importing torch and transformers), then checked one test per case.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from dsvl.loading import CHECKPOINT_FILE, WeightSource, load_vision

ROOT = Path(__file__).resolve().parents[1]
PARTIAL = ("vision.onnx", "vision.onnx.data", "manifest.json", "manifest.json.tmp",
           "preprocessor_config.json", ".partial-*", "vision.graph.onnx")
FLAGS = ("--help", "--preset", "--vision-model-name-or-path", "--lm-model-name-or-path",
         "--checkpoint-path", "--vis-proj", "--enable-mmca-attention", "--seed", "--out",
         "--precision", "--opset", "--dynamic-resolution")


@dataclass
class Run:
    argv: list[str]
    out: Path | None
    returncode: int = -1
    stdout: str = ""
    stderr: str = ""

    @property
    def last_line(self) -> str:
        lines = [line for line in self.stderr.splitlines() if line.strip()]
        return lines[-1] if lines else ""


def write_checkpoint(path: Path) -> None:
    """A real DSVL-format checkpoint for the tiny preset (old vis_encoder.vision_model.* keys)."""
    model, _ = load_vision(WeightSource(preset="tiny", vis_proj="perceiver"))
    state = {"vis_encoder.vision_model." + k: v for k, v in model.vis_encoder.state_dict().items()}
    state |= {"projection." + k: v for k, v in model.projection.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)


@pytest.fixture(scope="session")
def runs(tmp_path_factory) -> dict[str, Run]:
    tmp = tmp_path_factory.mktemp("cli-errors")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cases: dict[str, Run] = {}
    procs: dict[str, subprocess.Popen] = {}

    def launch(name: str, run: Run) -> None:
        argv = [sys.executable, "-m", "export.vision", *run.argv]
        if run.out is not None:
            argv += ["--out", str(run.out)]
        cases[name] = run
        procs[name] = subprocess.Popen(argv, cwd=ROOT, env=env, text=True,
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    corrupt = tmp / "corrupt" / CHECKPOINT_FILE
    corrupt.parent.mkdir()
    # fixed garbage (seed 17 makes torch.load raise IndexError), not os.urandom: never flaky
    corrupt.write_bytes(np.random.default_rng(17).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    blocker = tmp / "file.txt"
    blocker.write_text("a regular file\n")
    launch("missing-vision-dir", Run(["--vision-model-name-or-path", str(tmp / "no-such-clip")],
                                     tmp / "out-missing"))
    launch("corrupt-bin", Run(["--checkpoint-path", str(corrupt)], tmp / "out-corrupt"))
    launch("unknown-preset", Run(["--preset", "nope"], tmp / "out-preset"))
    launch("unwritable-out", Run([], blocker / "out"))
    launch("help", Run(["--help"], None))

    # while those import torch: a real checkpoint, checked whole, then cut in half
    good = tmp / "good" / CHECKPOINT_FILE
    write_checkpoint(good)
    load_vision(WeightSource(preset="tiny", checkpoint=good))  # control: the whole file loads
    truncated = tmp / "truncated" / CHECKPOINT_FILE
    truncated.parent.mkdir()
    data = good.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    launch("truncated-bin", Run(["--checkpoint-path", str(truncated.parent)], tmp / "out-truncated"))

    for name, proc in procs.items():
        try:
            cases[name].stdout, cases[name].stderr = proc.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            proc.kill()
            cases[name].stdout, cases[name].stderr = proc.communicate()
        cases[name].returncode = proc.returncode
    return cases


def leftovers(out: Path) -> list[str]:
    if not out.exists():
        return []
    return sorted(p.name for pattern in PARTIAL for p in out.glob(pattern))


ERROR_CASES = {
    # case: fragments the error line must contain
    "missing-vision-dir": ("--vision-model-name-or-path", "no-such-clip", "not found"),
    "corrupt-bin": ("corrupt", CHECKPOINT_FILE),
    "truncated-bin": ("corrupt or truncated", CHECKPOINT_FILE),
    "unwritable-out": ("--out", "not writable"),
}


@pytest.mark.parametrize("case", sorted(ERROR_CASES))
def test_user_error_is_one_line(case, runs):
    run = runs[case]
    assert run.returncode == 2, run.stderr
    assert "Traceback" not in run.stderr
    assert run.last_line.startswith("error: "), run.stderr
    for fragment in ERROR_CASES[case]:
        assert fragment in run.last_line, run.last_line
    # a user error is reported once, on one line
    assert sum(line.startswith("error:") for line in run.stderr.splitlines()) == 1
    assert not leftovers(run.out), leftovers(run.out)
    assert "wrote" not in run.stdout


def test_unknown_preset_is_argparse_error(runs):
    run = runs["unknown-preset"]
    assert run.returncode == 2
    assert "Traceback" not in run.stderr
    assert run.stderr.lstrip().startswith("usage:")
    assert ": error: " in run.last_line and "nope" in run.last_line
    assert "tiny" in run.last_line  # it lists the valid choices
    assert not run.out.exists()


def test_unwritable_out_leaves_the_blocking_file_alone(runs):
    run = runs["unwritable-out"]
    blocker = run.out.parent
    assert blocker.is_file() and blocker.read_text() == "a regular file\n"
    assert sorted(p.name for p in blocker.parent.glob("*.partial*")) == []


def test_checkpoint_errors_name_the_file(runs):
    for case in ("corrupt-bin", "truncated-bin"):
        run = runs[case]
        assert str(Path(run.argv[1])) in run.last_line  # the file, or the dir holding it


def test_help_mentions_every_flag(runs):
    run = runs["help"]
    assert run.returncode == 0, run.stderr
    assert run.stderr.strip() == ""
    for flag in FLAGS:
        assert flag in run.stdout, flag
    for choice in ("baseline", "vit", "perceiver", "fp32", "fp16", "tiny", "small", "dsvl-7b"):
        assert choice in run.stdout, choice
