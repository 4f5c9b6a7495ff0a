"""Fold what a fixed-resolution graph computes from its input's shape alone.

The tracer records every ``tensor.shape[i]`` as ``Shape``/``Gather``/``Unsqueeze``/``Concat``
arithmetic, and the vision graph resizes its position tables from the traced patch grid: more
than half of a `small` vision graph's nodes depend on no pixel value. With only the batch
dynamic, most of that is the same on every call. Here the nodes that read no pixel value are
run (ONNX Runtime, CPU) at three batch sizes; each value they hand to the rest of the graph that
comes out the same at all three becomes an initializer, and the nodes left unused go. What
depends on the batch stays computed. numpy, onnx and onnxruntime only.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

BATCHES = (1, 2, 3)


def fold_batch_independent(path: Path, input_name: str) -> tuple[int, int]:
    """Rewrite ``path`` in place; returns (nodes before, nodes after). Weights in external data
    stay where they are; folded values are small and go inline."""
    import onnx
    from onnx import external_data_helper, helper, numpy_helper

    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    before = len(graph.node)
    source = next(i for i in graph.input if i.name == input_name)
    batch = source.type.tensor_type.shape.dim[0].dim_param
    shapes = inferred_shapes(model, batch)  # tensors whose shape is known but for the batch
    known = {t.name for t in graph.initializer}
    shape_only: set[str] = set(known)
    picked, probes = [], {}
    for node in graph.node:
        inputs = [name for name in node.input if name]
        from_shape = node.op_type == "Shape" and len(inputs) == 1 and inputs[0] in shapes
        if from_shape or all(name in shape_only for name in inputs):
            picked.append(node)
            shape_only.update(name for name in node.output if name)
            if from_shape:
                probes[inputs[0]] = shapes[inputs[0]]
    made = {name for node in picked for name in node.output if name}
    picked_ids = {id(node) for node in picked}  # not ``in picked``: protobuf compares deeply
    used_by_rest = {name for node in graph.node if id(node) not in picked_ids for name in node.input}
    used_by_rest |= {o.name for o in graph.output}
    frontier = sorted(made & used_by_rest)
    if not frontier:
        return before, before

    needed = {name for node in picked for name in node.input if name in known}
    tensors = []
    for tensor in graph.initializer:
        if tensor.name in needed:
            copy = onnx.TensorProto()
            copy.CopyFrom(tensor)
            if external_data_helper.uses_external_data(copy):
                external_data_helper.load_external_data_for_tensor(copy, str(path.parent))
                copy.data_location = onnx.TensorProto.DEFAULT
                del copy.external_data[:]
            tensors.append(copy)
    # each tensor a Shape reads becomes an input of the subgraph, fed zeros of its shape
    inputs = [helper.make_tensor_value_info(name, elem, [batch if d is None else d for d in dims])
              for name, (elem, dims) in probes.items()]
    sub = helper.make_graph(picked, "shape_only", inputs, [helper.make_empty_tensor_value_info(n) for n in frontier],
                            initializer=tensors)
    sub_model = helper.make_model(sub, opset_imports=model.opset_import, ir_version=model.ir_version)
    values = [run_at_batch(sub_model, probes, size) for size in BATCHES]

    folded = {}
    for index, name in enumerate(frontier):
        first = values[0][index]
        if all(v[index].shape == first.shape and np.array_equal(v[index], first) for v in values[1:]):
            folded[name] = first
    if not folded:
        return before, before
    drop_unused(graph, set(folded))
    still_made = {name for node in graph.node for name in node.output}  # kept for another output
    for name, value in folded.items():
        if name not in still_made:
            graph.initializer.append(numpy_helper.from_array(np.asarray(value), name))
    onnx.save(model, str(path))
    return before, len(graph.node)


def inferred_shapes(model, batch: str) -> dict[str, tuple[int, list[int | None]]]:
    """(element type, dims with None for the batch) of every tensor ONNX's shape inference
    pins down to the input's batch and fixed sizes (the graph's input among them)."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)
    out = {}
    for value in [*inferred.graph.input, *inferred.graph.value_info]:
        tensor = value.type.tensor_type
        if not tensor.HasField("shape"):
            continue
        dims = [d.dim_value if d.HasField("dim_value") else (None if d.dim_param == batch else "?")
                for d in tensor.shape.dim]
        if "?" not in dims:
            out[value.name] = (tensor.elem_type, dims)
    return out


def run_at_batch(sub_model, probes: dict, batch: int) -> list[np.ndarray]:
    """The shape-only subgraph's outputs at ``batch`` images (the probed tensors are zeros: only
    their shapes are read)."""
    import onnxruntime as ort
    from onnx import helper

    feeds = {name: np.zeros([batch if d is None else d for d in dims], helper.tensor_dtype_to_np_dtype(elem))
             for name, (elem, dims) in probes.items()}
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(sub_model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return session.run(names, feeds)


def drop_unused(graph, produced_elsewhere: set[str]) -> None:
    """Remove the nodes whose outputs nothing reads now (walking back from the graph's outputs),
    and the initializers no node reads."""
    wanted = {o.name for o in graph.output}
    keep = []
    for node in reversed(graph.node):
        outputs = [name for name in node.output if name]
        if any(name in wanted and name not in produced_elsewhere for name in outputs):
            keep.append(node)
            wanted.update(name for name in node.input if name)
    keep.reverse()
    del graph.node[:]
    graph.node.extend(keep)
    read = {name for node in keep for name in node.input}
    read |= {o.name for o in graph.output}
    unread = [t for t in graph.initializer if t.name not in read and t.name not in produced_elsewhere]
    for tensor in unread:
        graph.initializer.remove(tensor)
