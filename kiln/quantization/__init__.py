"""Quantization: formats (named presets), their numerics, calibration and the accuracy gate.

- :mod:`kiln.quantization.config`: the ``quantization`` record of a checkpoint (torch-free).
- :mod:`kiln.quantization.formats`: quantize / dequantize / fake-quantize, the reference numerics.

This package's ``__init__`` imports nothing, so torch-free readers stay torch-free.
"""
