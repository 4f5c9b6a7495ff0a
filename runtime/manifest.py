"""manifest.json as typed sections: what every writer fills and every reader gets.

Each section is a dataclass (runtime/sections.py): exporters build them, ``read_manifest``
checks every field of every section present and names the first bad one, with the file, in
one line. Fields with defaults are the ones older exports of this format version lack.

``format_version``: the layout this package writes is version 1. A manifest without the key
is read as version 1 (the layout never changed); an older number is refused with "re-export",
a newer one with "upgrade dsvl-edge", since a newer writer may mean fields differently.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from runtime import contract as c
from runtime.errors import ArtifactError
from runtime.hashing import fingerprint_file, sha256_file
from runtime.sections import FieldError, RelPath, Section

IoDtype = Literal[tuple(c.IO_DTYPES.values())]  # type: ignore[misc]  # float32, float16
Precision = Literal[c.PRECISIONS]  # type: ignore[misc]  # fp32, fp16
KvCache = Literal[c.KV_CACHE_MODES]  # type: ignore[misc]  # concat, shared-buffer
KvCacheDtype = Literal[c.KV_CACHE_DTYPES]  # type: ignore[misc]  # int8
DecoderGraph = Literal[c.DECODER_GRAPHS]  # type: ignore[misc]  # fused, standard, traced
VisProj = Literal["baseline", "vit", "perceiver"]
VisionEncoder = Literal["clip", "qwen"]
HardwareLevel = Literal["none", "ampere_plus"]
SECTIONS = ("vision", "decoder", "tokenizer")  # what the runtime opens


@dataclass
class FileEntry(Section):
    """One artefact file as the exporter wrote it."""

    path: RelPath
    bytes: int
    sha256: str
    fingerprint: str | None = None  # runtime/hashing.py; absent in the oldest exports
    external_data: FileEntry | None = None  # ONNX external data beside a large graph

    @classmethod
    def describe(cls, root: Path, rel: str) -> FileEntry:
        """Size, sha256 and fingerprint of ``root/rel``, with its ONNX external data if any."""
        def one(name: str) -> FileEntry:
            path = root / name
            return cls(name, path.stat().st_size, sha256_file(path), fingerprint_file(path))

        entry = one(rel)
        if (root / (rel + c.EXTERNAL_DATA_SUFFIX)).exists():
            entry.external_data = one(rel + c.EXTERNAL_DATA_SUFFIX)
        return entry

    def with_data(self) -> list[FileEntry]:
        """This file and its external data file."""
        return [self] + ([self.external_data] if self.external_data else [])


def describe_dir(root: Path, directory: str) -> dict[str, FileEntry]:
    """``FileEntry`` of every file under ``root/directory``, keyed by its relative path."""
    files = sorted(p for p in (root / directory).rglob("*") if p.is_file())
    return {p.relative_to(root).as_posix(): FileEntry.describe(root, p.relative_to(root).as_posix())
            for p in files}


@dataclass
class Comparison(Section):
    """One output compared with its reference: errors, the reference's scale, finiteness."""

    name: str
    shape: list[int]
    max_abs_err: float
    max_rel_err: float  # max_abs_err / ref_max_abs
    ref_max_abs: float
    finite: bool
    top1_agreement: float | None = None  # export.quantize: argmax equal, per position

    def within(self, tolerance_rel: float) -> bool:
        return self.finite and self.max_rel_err <= tolerance_rel


@dataclass
class Parity(Section):
    """The exporter's check against PyTorch: max relative error allowed, and each comparison."""

    tolerance_rel: float
    results: list[Comparison] = field(default_factory=list)
    check: str | None = None  # the decoder's: "full" (whole graph) or "layers" (one at a time)


@dataclass
class VisionSection(Section):
    file: FileEntry
    preprocessor: RelPath  # preprocessor_config.json
    vis_proj: VisProj
    image_size: int
    patch_size: int
    image_tokens: int  # per image, at image_size
    vis_dim: int
    lang_dim: int
    precision: Precision
    io_dtype: IoDtype
    random_weights: bool
    preprocessor_file: FileEntry | None = None  # absent before the manifest hashed it
    vision_encoder: VisionEncoder = "clip"
    dynamic_resolution: bool = False
    weights: str | None = None  # where the weights came from, in words
    parity: Parity | None = None

    def runtime_files(self) -> list[FileEntry]:
        return self.file.with_data() + ([self.preprocessor_file] if self.preprocessor_file else [])

    @property
    def fixed_tokens(self) -> bool:
        """The token count stays image_tokens at any resolution (perceiver, Qwen's resampler)."""
        return self.vis_proj == "perceiver" or self.vision_encoder == "qwen"


@dataclass
class QuantizationSection(Section):
    """export.quantize's record: weight-only MatMulNBits of the source decoder."""

    bits: int
    block_size: int
    method: str
    symmetric: bool
    accuracy_level: int
    quantized_matmuls: int | None = None  # export.quantize: how many MatMuls it replaced
    source_sha256: str | None = None  # export.quantize: the unquantized decoder.onnx
    check: Comparison | None = None  # logits error and top-1 agreement against the source
    streamed: bool = False  # quantized while the export streamed the weights (--weights)
    lm_head_bits: int | None = None  # the LM head's bits where they differ from ``bits``
    # a 4-bit head's best logits rescored at 8 bits: how many per position (export/head_rescore.py)
    lm_head_rescore_top_k: int | None = None


@dataclass
class KvCacheQuantization(Section):
    """An int8 KV cache's record (export/kv_quant.py): how its fixed scales were made."""

    bits: int
    scales: str  # "per-tensor" or "per-channel"
    calibrated_on: str  # the decoder whose cache gave the scales: "float" or "int4" weights...
    calibration: str  # what it answered, in words


@dataclass
class DecoderSection(Section):
    file: FileEntry
    prompt_embeddings: FileEntry  # lang_embed.npy
    decoder_embeddings: FileEntry  # embed_tokens.npy
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int
    enable_mmca_attention: bool
    precision: Precision
    io_dtype: IoDtype
    random_weights: bool
    kv_cache: KvCache = c.KV_CONCAT
    # the cache tensors' type where it is not io_dtype: "int8" (export/kv_quant.py)
    kv_cache_dtype: KvCacheDtype | None = None
    kv_cache_quantization: KvCacheQuantization | None = None
    graph: DecoderGraph = c.GRAPH_TRACED  # manifests from before the graph builder: traced
    weights: str | None = None
    generation_defaults: dict | None = None  # the LLaMA directory's generation_config.json
    parity: Parity | None = None
    quantization: QuantizationSection | None = None

    def runtime_files(self) -> list[FileEntry]:
        return self.file.with_data() + [self.prompt_embeddings, self.decoder_embeddings]

    @property
    def cache_dtype(self) -> str:
        """The KV cache tensors' dtype name: kv_cache_dtype, else the float I/O type."""
        return self.kv_cache_dtype or self.io_dtype


@dataclass
class TokenizerSection(Section):
    dir: RelPath
    bos_token_id: int
    eos_token_id: int
    image_token_id: int
    pad_token_id: int | None = None
    image_pretoken_id: int | None = None
    vocab_size: int | None = None
    files: dict[str, FileEntry] = field(default_factory=dict)  # absent before it was hashed
    source: str | None = None  # tokenizer.json, tokenizer.model or the preset's


@dataclass
class GpuRecord(Section):
    name: str
    compute_capability: str
    total_memory_bytes: int | None = None


@dataclass
class ShapeRange(Section):
    """One input's min/opt/max shapes in a TensorRT optimization profile."""

    min: list[int]
    opt: list[int]
    max: list[int]


@dataclass
class ProfileRecord(Section):
    """One optimization profile: its named axes' [min, opt, max] and the inputs' shapes."""

    name: str
    axes: dict[str, list[int]]
    shapes: dict[str, ShapeRange] = field(default_factory=dict)  # past_key_values.* for all layers
    device_memory_bytes: int | None = None  # TensorRT's own figure, when it reports one


@dataclass
class MemoryEstimate(Section):
    """What the decoder engine needs, computed from shapes (export/engine_memory.py)."""

    weights_bytes: int
    kv_cache_bytes: int
    activation_bytes: dict[str, int]  # per profile
    static_total_bytes: int
    computed_from_shapes: bool = True


@dataclass
class EngineEntry(Section):
    """One TensorRT plan as export/engine.py built it."""

    file: RelPath
    bytes: int
    sha256: str
    precision: str
    tensorrt_version: str
    gpu: GpuRecord
    version_compatible: bool = False
    hardware_compatibility: HardwareLevel = "none"
    strongly_typed: bool = True
    built_at: str | None = None
    build_seconds: float | None = None
    onnx_sha256: str | None = None  # the ONNX it was built from: catches a later re-export
    io_dtypes: dict[str, str] = field(default_factory=dict)
    profiles: list[ProfileRecord] = field(default_factory=list)
    max_context: int | None = None  # decoder: past + new positions
    max_prompt: int | None = None
    memory_estimate: MemoryEstimate | None = None


@dataclass
class EnginesSection(Section):
    vision: EngineEntry | None = None
    decoder: EngineEntry | None = None
    timing_cache: RelPath | None = None


@dataclass
class Manifest(Section):
    format: Literal["dsvl-edge"] = c.FORMAT
    format_version: int = c.FORMAT_VERSION
    vision: VisionSection | None = None
    decoder: DecoderSection | None = None
    tokenizer: TokenizerSection | None = None
    engines: EnginesSection | None = None
    precision: Precision | None = None  # export.all: both graphs' precision
    versions: dict | None = None  # package versions of the last export

    def runtime_files(self) -> list[FileEntry]:
        """Every file the runtime reads, as the manifest lists them (external data included)."""
        assert self.vision and self.decoder and self.tokenizer  # noqa: S101 - require() first
        return (self.vision.runtime_files() + self.decoder.runtime_files()
                + list(self.tokenizer.files.values()))

    def require(self, *sections: str, root: Path | str = ".") -> Manifest:
        """Stop with one line when a section the caller needs is absent."""
        for name in sections:
            if getattr(self, name) is None:
                raise ArtifactError(
                    f"{Path(root) / c.MANIFEST_NAME} has no '{name}' section: this directory was "
                    f"made by another exporter; run `python -m export.all --out {root}`")
        return self

    @classmethod
    def from_sections(cls, sections: dict[str, Any]) -> Manifest:
        """A manifest of ``sections`` (typed, or dicts as some exporters build them), checked as
        a reader will check it; a bad field is the writer's bug, named in one line."""
        data = {name: value.to_dict() if isinstance(value, Section) else value
                for name, value in sections.items()}
        try:
            return cls.from_dict(data | {"format": c.FORMAT, "format_version": c.FORMAT_VERSION}, "manifest")
        except FieldError as err:
            raise ArtifactError(f"the exporter wrote {err.where.removeprefix('manifest.')} "
                                f"{err.problem}: a bug, please report it") from None

    def dumps(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"


def _hint(where: str, root: Path | str) -> str:
    section = where.split(".")[1] if where.count(".") else ""
    if section == "engines":
        return f"rebuild with `python -m export.engine --artifacts {root}`"
    if where.startswith("manifest.decoder.quantization"):
        return "re-run `python -m export.quantize` on the unquantized export"
    return f"re-run `python -m export.all --out {root}`"


def parse_manifest(data: Any, path: Path, root: Path | str) -> Manifest:
    """A parsed manifest.json object, checked: format, format_version, every field."""
    if not isinstance(data, dict):
        raise ArtifactError(f"{path} holds a JSON {type(data).__name__}, not an object: it is not "
                            f"a {c.FORMAT} manifest; re-run the export")
    if data.get("format") != c.FORMAT:
        raise ArtifactError(f"{path} is not a {c.FORMAT} manifest")
    version = data.get("format_version", c.FORMAT_VERSION)  # none: the layout of version 1
    if not isinstance(version, int) or isinstance(version, bool):
        raise ArtifactError(f"{path}: format_version is {version!r}, not a number; re-export with "
                            f"`python -m export.all --out {root}`")
    if version < c.FORMAT_VERSION:
        raise ArtifactError(f"{path} has format_version {version!r}, older than the {c.FORMAT_VERSION} "
                            f"this runtime reads: re-export with `python -m export.all --out {root}`")
    if version > c.FORMAT_VERSION:
        raise ArtifactError(f"{path} has format_version {version}, written by a newer dsvl-edge; this "
                            f"one reads {c.FORMAT_VERSION}: upgrade dsvl-edge, or re-export with this one")
    try:
        return Manifest.from_dict(data, "manifest")
    except FieldError as err:
        where = err.where.removeprefix("manifest.")
        raise ArtifactError(f"{path}: {where} {err.problem}; {_hint(err.where, root)}") from None


def read_manifest(artifacts: Path | str) -> Manifest:
    """``artifacts/manifest.json``, typed and checked; every problem is one ArtifactError line."""
    path = Path(artifacts) / c.MANIFEST_NAME
    if not path.is_file():
        raise ArtifactError(f"{path} not found: export first with `python -m export.all --out {artifacts}`")
    try:
        data = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ArtifactError(f"{path} is not valid JSON ({err}); re-run the export") from None
    except OSError as err:
        raise ArtifactError(f"{path} cannot be read ({err.strerror}); check its permissions") from None
    return parse_manifest(data, path, artifacts)
