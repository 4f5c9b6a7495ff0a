"""Command-line plumbing shared by the exporters: flags, errors, timed progress steps and
staged atomic writes. Deliberately light (no torch, transformers or onnx import), so that
``--help`` and argument errors answer at once; the heavy machinery is in export/common.py."""

from __future__ import annotations

import argparse
import contextlib
import errno
import gc
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

from dsvl.presets import PRESETS, VIS_PROJS, VISION_ENCODERS
from export import publish as publishing
from export.publish import PublishError, staged  # noqa: F401  (re-exported)
from runtime.errors import DsvlEdgeError
from runtime.manifest import Manifest

DEFAULT_OPSET = 18  # LayerNormalization is one op (TensorRT's normalization layer)
MIN_OPSET = 17  # LayerNormalization arrived in opset 17
MAX_OPSET = 20  # the newest torch.onnx's TorchScript exporter (dynamo=False) writes
DISK_FULL = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
             errno.EROFS: "read-only file system"}


class ExportError(DsvlEdgeError, RuntimeError):
    """An export that cannot proceed; the message names the problem and the fix."""


USER_ERRORS = (DsvlEdgeError,)


def opset_arg(text: str) -> int:
    """argparse type: an opset the exporter supports, refused before any loading."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if not MIN_OPSET <= value <= MAX_OPSET:
        raise argparse.ArgumentTypeError(f"{value} is not supported: use {MIN_OPSET} to {MAX_OPSET} "
                                         f"(default {DEFAULT_OPSET})")
    return value


def seed_arg(text: str) -> int:
    """argparse type: a seed numpy and torch both accept (0 to 2**32 - 1)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"{value} is out of range: use 0 to {2**32 - 1}")
    return value


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
    group.add_argument("--seed", type=seed_arg, default=0, help="seed for random weights and inputs (default 0)")
    group.add_argument("--preset-layers", type=layers_arg, metavar="N",
                       help="with a preset: a decoder of N layers at the preset's widths (try or "
                            "measure a real-size export quickly)")


def layers_arg(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of layers") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: at least 1 layer")
    return value


def add_output_flags(parser: argparse.ArgumentParser, default_out: str) -> None:
    parser.add_argument("--out", type=Path, default=Path(default_out), metavar="DIR",
                        help=f"artefact directory (default: {default_out})")
    parser.add_argument("--precision", choices=("fp32", "fp16"), default="fp32",
                        help="ONNX weight/activation type; fp16 keeps norms, softmax and masks in "
                             "fp32 (default fp32)")
    parser.add_argument("--opset", type=opset_arg, default=DEFAULT_OPSET,
                        help=f"ONNX opset (default {DEFAULT_OPSET}; {MIN_OPSET} to {MAX_OPSET})")


def publish(stage: Path, out: Path, names: list[str], sections: Manifest | dict) -> dict:
    """Check what this export wrote against the contract (export/checks.py), then publish it
    crash-safely (export/publish.py): the sections set in ``sections`` replace the old ones,
    the others are kept. Returns the published manifest."""
    from export.checks import checked_manifest

    given = sections.to_dict() if isinstance(sections, Manifest) else sections
    given = {name: value for name, value in given.items() if name not in ("format", "format_version")}
    manifest = checked_manifest(stage, given, names)
    new = {name: value for name, value in manifest.to_dict().items() if name in given}
    return publishing.publish(stage, out, names, new)


def weight_source(args: argparse.Namespace):
    """The ``dsvl.loading.WeightSource`` the weight flags describe."""
    from dsvl.loading import WeightSource

    if getattr(args, "preset_layers", None) and args.lm_model_name_or_path:
        raise ExportError("--preset-layers shrinks a preset's random decoder; with "
                          "--lm-model-name-or-path the LLaMA directory sets the depth: drop one")
    return WeightSource(preset=args.preset, vision_model=args.vision_model_name_or_path,
                        lm_model=args.lm_model_name_or_path, checkpoint=args.checkpoint_path,
                        vis_proj=args.vis_proj, enable_mmca_attention=args.enable_mmca_attention,
                        seed=args.seed, vision_encoder=args.vision_encoder,
                        preset_layers=getattr(args, "preset_layers", None))


EXPORT_DISK_HINT = "free space or choose another --out, then re-run; the previous export is untouched"


def run_cli(main: Callable[[], int]) -> None:
    """Run an exporter's entry point: user errors become one line on stderr and exit code 2."""
    sys.exit(cli_status(main))


def cli_status(main: Callable[[], int], interrupted: str = "interrupted: nothing was written",
               disk_hint: str = EXPORT_DISK_HINT) -> int:
    """``run_cli``'s exit status, returned (export.engine's ``main(argv)`` returns it)."""
    from runtime.cli import exit_status

    warnings.filterwarnings("ignore")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # read when transformers loads
    return exit_status(lambda: disk_errors_are_user_errors(main, disk_hint), USER_ERRORS, interrupted)


def disk_errors_are_user_errors(main: Callable[[], int], hint: str = EXPORT_DISK_HINT) -> int:
    """A full disk (or a quota, or a read-only mount) is the user's to fix: one line, exit 2.
    Every writer here writes a temporary file or directory first, so what was there stays."""
    try:
        return main()
    except OSError as err:
        if err.errno not in DISK_FULL:
            raise
        where = f" writing {err.filename}" if err.filename else ""
        raise ExportError(f"{DISK_FULL[err.errno]}{where}: {hint}") from None


class Progress:
    """Numbered, timed steps: ``[2/5] exporting ONNX ... done in 3.1 s, peak RSS 1.2 GB``.

    Each step's peak resident memory is its own (Linux resets the process's high-water mark
    when ``5`` is written to /proc/self/clear_refs), so a user sees which stage needs the RAM."""

    def __init__(self, total: int):
        self.total, self.index, self.started = total, 0, time.perf_counter()
        self.peaks: dict[str, float] = {}  # step -> peak RSS in bytes (where Linux tells)
        return_freed_memory()

    @contextlib.contextmanager
    def step(self, what: str) -> Iterator[None]:
        self.index += 1
        print(f"[{self.index}/{self.total}] {what} ...", flush=True)
        gc.collect()  # what the last step dropped may sit in reference cycles (a freed vision tower)
        trim_heap()
        reset_peak_rss()
        start = time.perf_counter()
        yield
        peak = peak_rss()
        memory = ""
        if peak is not None:
            self.peaks[what] = peak
            memory = f", peak RSS {peak / 1e9:.2f} GB"
        print(f"      done in {time.perf_counter() - start:.1f} s{memory}", flush=True)

    def elapsed(self) -> float:
        return time.perf_counter() - self.started


def _libc():
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    return ctypes.CDLL(name) if name and sys.platform.startswith("linux") else None


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def return_freed_memory() -> None:
    """Make glibc give large freed buffers back to the system. By default it raises its mmap
    threshold after a large free, so later tensors come from the heap and a freed model (the
    vision tower, one decoder layer) stays resident: a fixed 1 MiB threshold keeps each stage's
    memory its own."""
    try:
        libc = _libc()
        if libc is not None:
            libc.mallopt(M_MMAP_THRESHOLD, 1 << 20)
    except (OSError, AttributeError):
        pass


def trim_heap() -> None:
    try:
        libc = _libc()
        if libc is not None:
            libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def reset_peak_rss() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:  # not Linux, or not permitted: peaks then count from the process start
        pass


def peak_rss() -> float | None:
    """VmHWM of this process in bytes, or None where /proc does not say."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return float(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_writable(out: Path) -> None:
    """``out`` and its parent (where the new export is staged) must take new files."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".probe-"):
            pass
    except OSError as err:
        raise ExportError(f"--out {out} is not writable ({err.strerror}); choose another directory") from None
    parent = Path(os.path.realpath(out)).parent
    try:
        with tempfile.NamedTemporaryFile(dir=parent, prefix=".probe-"):
            pass
    except OSError as err:
        raise ExportError(f"--out {out}: its parent {parent} is not writable ({err.strerror}), and the "
                          "new export is staged there to replace the old one atomically; choose a "
                          "--out inside a writable directory") from None
