"""A torch module to ONNX without the exporter's in-memory copies of the weights.

torch's TorchScript exporter builds the whole ModelProto, weights included, then serializes it
and hands the bytes to Python: three copies of the weights beside the module's own. For
dsvl-7b's 0.4B-parameter CLIP tower + perceiver that was a 6.6 GB peak for 1.6 GB of weights. Here the
exporter writes the graph only (``export_params=False``); the module's own tensors are attached
as initializers without copying (onnx_ir wraps their memory), onnxscript's constant folder folds what
the exporter would have folded (the weight transposes of every Linear, shape arithmetic), and
onnx_ir writes the external data tensor by tensor. Peak: the module plus its folded weights.
"""

from __future__ import annotations

import gc
import logging
from pathlib import Path

from export.cli import ExportError
from runtime import contract as c

# Above this many bytes of weights the graph goes external: protobuf caps a model at 2 GiB, and an
# inline model is held three times while saving (proto, serialization, bytes): a 0.8 GB fp16
# tower saved inline peaked 2.3 GB over its own size.
EXTERNAL_DATA_THRESHOLD = 256 << 20
PAGE = 4096  # external tensors start on page boundaries, so ONNX Runtime can map them


def export_onnx(module, args: tuple, path: Path, input_names: list[str],
                output_names: list[str], dynamic_axes: dict, opset: int) -> None:
    """TorchScript-based export (dynamo=False keeps traced shapes dynamic; see NOTES), with the
    weights attached afterwards (module docstring). Output dims the exporter's shape inference
    left unknown but ``dynamic_axes`` does not declare dynamic (the resamplers' 256 tokens, a
    fixed resolution's patch count, the logits' vocabulary behind GroupQueryAttention) are fixed
    to what the traced module returns: the trace baked them."""
    if opset < 17:
        raise ExportError(f"--opset {opset} is too old: 17 or newer is needed (LayerNormalization)")
    import onnx_ir as ir
    import torch

    raw = path.with_suffix(".graph.onnx")
    with torch.no_grad():
        # No constant folding here: folded weights would exist only inside the exporter.
        torch.onnx.export(module, args, str(raw), input_names=input_names,
                          output_names=output_names, dynamic_axes=dynamic_axes,
                          opset_version=opset, dynamo=False, do_constant_folding=False,
                          export_params=False)
        traced = module(*args)
    model = ir.load(str(raw))
    raw.unlink()
    _attach_weights(model, module, set(input_names))
    _fold(model)
    traced = traced if isinstance(traced, (tuple, list)) else (traced,)
    for output, tensor in zip(model.graph.outputs, traced, strict=True):
        dynamic = dynamic_axes.get(output.name, {})
        output.shape = ir.Shape([dim if isinstance(dim, int) or axis in dynamic else int(tensor.shape[axis])
                                 for axis, dim in enumerate(output.shape)])
    large = sum(v.const_value.nbytes for v in model.graph.initializers.values()) > EXTERNAL_DATA_THRESHOLD
    ir.save(model, str(path), external_data=path.name + c.EXTERNAL_DATA_SUFFIX if large else None,
            size_threshold_bytes=1024, alignment=PAGE, align_threshold=0, max_workers=1)
    del model
    gc.collect()  # an onnx_ir graph is a web of cycles: its folded weights go only with the collector


def _attach_weights(model, module, user_inputs: set[str]) -> None:
    """The graph's parameter inputs become initializers holding the module's tensors (no copy).
    The exporter names them after the module's parameters and buffers, equal ones merged."""
    import onnx_ir as ir

    tensors = dict(module.named_parameters()) | dict(module.named_buffers())
    for value in list(model.graph.inputs):
        if value.name in user_inputs:
            continue
        if value.name not in tensors:
            raise ExportError(f"the exported graph takes {value.name!r}, which is neither an input "
                              "nor a parameter of the module")
        model.graph.inputs.remove(value)
        value.const_value = ir.Tensor(tensors[value.name].detach().numpy(), name=value.name)
        model.graph.register_initializer(value)


def _fold(model) -> None:
    """Fold constants of any size (the weight transposes are as large as the weights), then drop
    what the folding left unused and lift the remaining constants to initializers, as the
    exporter's own folding did. Not ``onnxscript.optimizer.optimize``: its rewrite rules are
    module-level objects that keep the last graph they matched, and with it every weight."""
    import onnx_ir.passes.common as passes
    import onnxscript.optimizer

    logger = logging.getLogger("onnxscript")
    level = logger.level
    logger.setLevel(logging.ERROR)  # the folder logs each op it declines to fold
    try:
        onnxscript.optimizer.fold_constants(model, input_size_limit=1 << 62, output_size_limit=1 << 62)
    finally:
        logger.setLevel(level)
    for cleanup in (passes.IdentityEliminationPass(), passes.RemoveUnusedNodesPass(),
                    passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)):
        cleanup(model)
