"""Exporters: PyTorch DSVL -> ONNX (vision, decoder), TensorRT engines; see README."""

__version__ = "0.1.0"
