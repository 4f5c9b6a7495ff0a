"""What every exporter checks before it publishes: the manifest sections it wrote parse as the
runtime will read them, and every ONNX file it wrote has the contract's inputs and outputs
(names, types, ranks, dynamic axes by name, fixed sizes; runtime/graphs.py). Either failing is
an exporter bug, stopped before anything is published. onnx loads only when a check runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from runtime import contract as c
from runtime import graphs as g
from runtime.errors import DsvlEdgeError
from runtime.manifest import Manifest


class ContractError(DsvlEdgeError, RuntimeError):
    """An export that departs from the artefact contract (a bug in the exporter)."""


def onnx_io(path: Path) -> tuple[list[g.TensorInfo], list[g.TensorInfo]]:
    """The inputs and outputs an ONNX file declares (its weights are not read)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph

    def info(value: Any) -> g.TensorInfo:
        tensor = value.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                     for d in tensor.shape.dim)
        return g.TensorInfo(value.name, c.ONNX_DTYPES.get(tensor.elem_type, str(tensor.elem_type)), dims)

    return [info(v) for v in graph.input], [info(v) for v in graph.output]


def expected_graphs(manifest: Manifest) -> list[tuple[str, g.GraphSpec, str, dict[str, int]]]:
    """(file, I/O table, io_dtype, fixed sizes) of each graph the manifest describes."""
    graphs = []
    if manifest.vision is not None:
        v = manifest.vision
        graphs.append((v.file.path, g.vision_graph(v.dynamic_resolution, v.fixed_tokens), v.io_dtype,
                       {g.CHANNELS: 3, g.LANG_DIM: v.lang_dim, g.IMAGE_SIZE: v.image_size,
                        g.IMAGE_TOKENS: v.image_tokens}))
    if manifest.decoder is not None:
        d = manifest.decoder
        graphs.append((d.file.path, g.decoder_graph(d.num_layers, d.kv_cache, d.graph, d.kv_cache_dtype), d.io_dtype,
                       {g.HIDDEN: d.hidden_size, g.KV_HEADS: d.num_kv_heads, g.HEAD_DIM: d.head_dim,
                        g.VOCAB: d.vocab_size}))
    return graphs


def check_onnx_files(stage: Path, manifest: Manifest, written: list[str]) -> None:
    """Every graph in ``written`` matches the contract exactly, or a ContractError names how."""
    for name, spec, io_dtype, sizes in expected_graphs(manifest):
        if name in written:
            problem = spec.mismatch(*onnx_io(stage / name), io_dtype, sizes, strict=True)
            if problem:
                raise ContractError(f"the exported {name} {problem} (runtime/graphs.py): an exporter "
                                    "bug, nothing was written; please report it")


def checked_manifest(stage: Path, sections: dict[str, Any], written: list[str]) -> Manifest:
    """The new sections, typed and checked, after their ONNX files were checked too."""
    try:
        manifest = Manifest.from_sections(sections)
    except DsvlEdgeError as err:
        raise ContractError(str(err)) from None
    check_onnx_files(stage, manifest, written)
    return manifest
