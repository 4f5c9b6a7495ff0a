"""Backend errors, and the engine-compatibility check that raises them.

This module imports nothing heavy, so a CLI can catch ``BackendUnavailable`` (and fall back to
ONNX Runtime) and tests can exercise the compatibility rules on machines without TensorRT.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from runtime.errors import BackendError

if TYPE_CHECKING:
    from runtime.manifest import EngineEntry


class BackendUnavailable(BackendError):
    """This backend cannot run here: a library, a GPU or a matching engine is missing."""


class EngineMismatch(BackendUnavailable):
    """A TensorRT engine was built for another TensorRT version or GPU than this machine's."""


class EngineCallError(BackendError):
    """A TensorRT call on a loaded engine failed: a profile switch, a tensor address, an
    execution. The message names the tensor, profile or shapes."""


def rebuild_command(artifacts: Path | str) -> str:
    return f"python -m export.engine --artifacts {artifacts}"


def _version_tuple(version: str) -> tuple[int, ...]:
    """'10.3.0.26' -> (10, 3, 0): TensorRT checks plans against major.minor.patch."""
    parts = []
    for piece in str(version).split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def _cc_tuple(capability: str) -> tuple[int, int]:
    major, _, minor = str(capability).partition(".")
    return int(major), int(minor or 0)


# Major versions whose version-compatible plans a later major runs: TensorRT 11.4's support
# matrix, "Engine Portability": "TensorRT 10 version-compatible engines can run with a TensorRT
# 11 runtime, and TensorRT 8 version-compatible engines can run with a TensorRT 10 runtime. No
# other combination across major versions is supported."
CROSS_MAJOR_COMPATIBLE = {(8, 10), (10, 11)}


def _version_ok(built: str, installed: str, version_compatible: bool) -> bool:
    """Plain plans need the same release (major.minor.patch). Version-compatible plans run on
    the same or a later release of the same major, and 10.x ones on 11.x (TensorRT's documented
    rules, Engine Compatibility, 11.1)."""
    b, i = _version_tuple(built), _version_tuple(installed)
    if version_compatible:
        return (b[0] == i[0] and i >= b) or (b[0], i[0]) in CROSS_MAJOR_COMPATIBLE
    return b == i


def _gpu_ok(built_cc: str, installed_cc: str, hardware_level: str) -> bool:
    """Plain plans hold kernels for one SM version; AMPERE_PLUS plans run on any sm_80+ GPU."""
    if hardware_level.lower() == "ampere_plus":
        return _cc_tuple(installed_cc) >= (8, 0)
    return _cc_tuple(built_cc) == _cc_tuple(installed_cc)


def check_engine_metadata(meta: EngineEntry, *, name: str, artifacts: Path | str,
                          tensorrt_version: str, gpu_name: str, compute_capability: str,
                          onnx_sha256: str | None = None) -> list[str]:
    """Stop (EngineMismatch) when an engine cannot run on this TensorRT/GPU; return warnings.

    ``meta`` is the manifest's engine entry as export/engine.py writes it; ``onnx_sha256`` is
    the manifest's current hash of the ONNX file, which catches an engine built from an older
    export. A different GPU model with the same compute capability loads but may run slower
    tactics: a warning.
    """
    built_from = meta.onnx_sha256
    if onnx_sha256 and built_from and built_from != onnx_sha256:
        raise EngineMismatch(f"{name}.onnx was re-exported after the {name} engine was built: "
                             f"rebuild with `{rebuild_command(artifacts)}`")
    built_trt = meta.tensorrt_version
    built_gpu, built_cc = meta.gpu.name, meta.gpu.compute_capability
    hardware_level = meta.hardware_compatibility
    here = f"TensorRT {tensorrt_version} on '{gpu_name}' (sm {compute_capability})"
    there = f"TensorRT {built_trt} on '{built_gpu}' (sm {built_cc})"
    problems = []
    if not _version_ok(built_trt, tensorrt_version, meta.version_compatible):
        problems.append("TensorRT version")
    if not _gpu_ok(built_cc, compute_capability, hardware_level):
        problems.append("GPU")
    if problems:
        rule = (" (a version-compatible plan runs on the same or a later release of its major, "
                "and 10.x plans on 11.x)" if meta.version_compatible else "")
        raise EngineMismatch(
            f"{name} engine was built with {there}, this machine has {here} "
            f"({' and '.join(problems)} differ{rule}): rebuild with "
            f"`{rebuild_command(artifacts)}`")
    if built_gpu != gpu_name and hardware_level.lower() != "ampere_plus":
        return [f"{name} engine was built on '{built_gpu}', running on '{gpu_name}' (same sm "
                f"{compute_capability}): it works, but `{rebuild_command(artifacts)}` tunes it "
                "for this GPU"]
    return []
