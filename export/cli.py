"""Command-line plumbing shared by the exporters: flags, errors, timed progress steps and
staged atomic writes. Deliberately light (no torch, transformers or onnx import), so that
``--help`` and argument errors answer at once; the heavy machinery is in export/common.py."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

from dsvl.errors import ConfigError, LoadError
from dsvl.presets import PRESETS, VIS_PROJS, VISION_ENCODERS
from runtime.contract import FORMAT, FORMAT_VERSION, MANIFEST_NAME, ArtifactError
from runtime.prompt import PromptError

DEFAULT_OPSET = 18  # LayerNormalization is one op (TensorRT's normalization layer)


class ExportError(RuntimeError):
    """An export that cannot proceed; the message names the problem and the fix."""


USER_ERRORS = (ExportError, LoadError, ConfigError, ArtifactError, PromptError)


def add_weight_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("weights (none given: the preset's seeded random weights)")
    group.add_argument("--preset", default="tiny", choices=sorted(PRESETS), metavar="NAME",
                       help=f"shapes to use when no weight paths are given: {', '.join(PRESETS)} (default: tiny)")
    group.add_argument("--vision-model-name-or-path", type=Path, metavar="DIR",
                       help="Hugging Face CLIP directory (config, weights, preprocessor_config.json), "
                            "or DSVL's qwen-clip directory (detected, as DSVL does, by 'qwen' in the path)")
    group.add_argument("--vision-encoder", choices=VISION_ENCODERS,
                       help="clip or qwen (Qwen-VL's ViT-bigG); overrides the detection from the "
                            "vision path (default: 'qwen' in the path means qwen, else clip; the "
                            "preset's encoder without a path)")
    group.add_argument("--lm-model-name-or-path", type=Path, metavar="DIR",
                       help="LLaMA directory with its tokenizer")
    group.add_argument("--checkpoint-path", type=Path, metavar="PATH",
                       help="DSVL checkpoint: a directory with pytorch_model.bin, or the file; "
                            "overrides the two directories' weights, loaded non-strictly as in DSVL")
    group.add_argument("--vis-proj", choices=VIS_PROJS,
                       help="projector type (default: inferred from --checkpoint-path, else perceiver; "
                            "baseline for qwen, which cannot take perceiver)")
    group.add_argument("--enable-mmca-attention", action="store_true",
                       help="the decoder uses DSVL's multi-modal causal attention")
    group.add_argument("--seed", type=int, default=0, help="seed for random weights and inputs (default 0)")


def add_output_flags(parser: argparse.ArgumentParser, default_out: str) -> None:
    parser.add_argument("--out", type=Path, default=Path(default_out), metavar="DIR",
                        help=f"artefact directory (default: {default_out})")
    parser.add_argument("--precision", choices=("fp32", "fp16"), default="fp32",
                        help="ONNX weight/activation type; fp16 keeps norms, softmax and masks in "
                             "fp32 (default fp32)")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET,
                        help=f"ONNX opset (default {DEFAULT_OPSET}; 17 or newer)")


def weight_source(args: argparse.Namespace):
    """The ``dsvl.loading.WeightSource`` the weight flags describe."""
    from dsvl.loading import WeightSource

    return WeightSource(preset=args.preset, vision_model=args.vision_model_name_or_path,
                        lm_model=args.lm_model_name_or_path, checkpoint=args.checkpoint_path,
                        vis_proj=args.vis_proj, enable_mmca_attention=args.enable_mmca_attention,
                        seed=args.seed, vision_encoder=args.vision_encoder)


def run_cli(main: Callable[[], int]) -> None:
    """Run an entry point: user errors become one line on stderr and exit code 2."""
    from runtime.cli import run_cli as run_entry_point

    warnings.filterwarnings("ignore")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # read when transformers loads
    run_entry_point(main, USER_ERRORS, "interrupted: nothing was written")


class Progress:
    """Numbered, timed steps: ``[2/5] exporting ONNX ... 3.1 s``."""

    def __init__(self, total: int):
        self.total, self.index, self.started = total, 0, time.perf_counter()

    @contextlib.contextmanager
    def step(self, what: str) -> Iterator[None]:
        self.index += 1
        print(f"[{self.index}/{self.total}] {what} ...", flush=True)
        start = time.perf_counter()
        yield
        print(f"      done in {time.perf_counter() - start:.1f} s", flush=True)

    def elapsed(self) -> float:
        return time.perf_counter() - self.started


def check_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".probe-"):
            pass
    except OSError as err:
        raise ExportError(f"--out {out} is not writable ({err.strerror}); choose another directory") from None


@contextlib.contextmanager
def staged(out: Path) -> Iterator[Path]:
    """A private staging directory inside ``out``; files move into ``out`` only via ``publish``.
    On any failure the staging directory is removed, so nothing half-written remains."""
    check_writable(out)
    stage = Path(tempfile.mkdtemp(prefix=".partial-", dir=out))
    try:
        yield stage
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def publish(stage: Path, out: Path, names: list[str]) -> None:
    """Move staged files into place with atomic renames (same filesystem)."""
    umask = os.umask(0)
    os.umask(umask)
    for name in names:
        target = out / name
        source = stage / name
        if source.is_dir():
            if target.exists():
                shutil.rmtree(target)
        else:
            os.chmod(source, 0o666 & ~umask)  # some writers create 0600 files
        os.replace(source, target)


def update_manifest(out: Path, sections: dict) -> dict:
    """Merge ``sections`` into out/manifest.json, written last and atomically."""
    path = out / MANIFEST_NAME
    manifest = {}
    if path.is_file():
        with contextlib.suppress(json.JSONDecodeError):
            manifest = json.loads(path.read_text())
    if manifest.get("format_version") != FORMAT_VERSION:
        manifest = {}
    manifest.update({"format": FORMAT, "format_version": FORMAT_VERSION, **sections})
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True))
    os.replace(tmp, path)
    return manifest
