"""export/torch_onnx.py: the traced export without the exporter's copies of the weights still
gives the module's outputs, folds the weight transposes and writes page-aligned external data."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

torch = pytest.importorskip("torch")

from export import torch_onnx  # noqa: E402


class TwoLinears(torch.nn.Module):
    """Linear layers on a 3-D input: the exporter writes MatMul(x, Transpose(W)), to be folded."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.first = torch.nn.Linear(16, 32)
        self.second = torch.nn.Linear(32, 8)
        self.register_buffer("scale", torch.full((8,), 0.5))

    def forward(self, x):
        return self.second(torch.relu(self.first(x))) * self.scale


def _export(tmp_path, monkeypatch, threshold: int):
    monkeypatch.setattr(torch_onnx, "EXTERNAL_DATA_THRESHOLD", threshold)
    module = TwoLinears().eval()
    path = tmp_path / "m.onnx"
    torch_onnx.export_onnx(module, (torch.randn(2, 3, 16),), path, ["x"], ["y"],
                           {"x": {0: "batch"}, "y": {0: "batch"}}, 18)
    return module, path


@pytest.mark.parametrize("threshold", [1 << 30, 0], ids=["inline", "external"])
def test_outputs_match_the_module(tmp_path, monkeypatch, threshold):
    module, path = _export(tmp_path, monkeypatch, threshold)
    x = np.random.default_rng(0).standard_normal((5, 3, 16)).astype(np.float32)
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    with torch.no_grad():
        want = module(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert not list(tmp_path.glob("*.graph.onnx")), "the weightless intermediate graph is left behind"


def test_weight_transposes_are_folded_and_inputs_are_only_the_users(tmp_path, monkeypatch):
    _, path = _export(tmp_path, monkeypatch, 1 << 30)
    model = onnx.load(str(path))
    initializers = {t.name for t in model.graph.initializer}
    assert [i.name for i in model.graph.input] == ["x"]
    assert not [n for n in model.graph.node if n.op_type == "Transpose" and n.input[0] in initializers]
    assert model.graph.output[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert model.graph.output[0].type.tensor_type.shape.dim[2].dim_value == 8


def test_external_data_is_one_page_aligned_file(tmp_path, monkeypatch):
    _, path = _export(tmp_path, monkeypatch, 0)
    model = onnx.load(str(path), load_external_data=False)
    files, offsets = set(), []
    for tensor in model.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            info = {e.key: e.value for e in tensor.external_data}
            files.add(info["location"])
            offsets.append(int(info.get("offset", 0)))
    assert files == {"m.onnx.data"}
    assert offsets and all(offset % torch_onnx.PAGE == 0 for offset in offsets)
