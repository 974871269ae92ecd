"""ONNX export (optimum + onnxruntime weight-only quantization); see convert.py."""
