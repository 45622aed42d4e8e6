"""Fused operations: spec, PyTorch reference, ONNX forms and kernels, one folder each."""
