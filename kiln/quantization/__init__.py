"""Quantization: formats (named presets), their numerics, calibration and the accuracy gate.

- :mod:`kiln.quantization.config`: the ``quantization`` record of a checkpoint (torch-free).
- :mod:`kiln.quantization.formats`: quantize / dequantize / fake-quantize, the reference numerics.
- :mod:`kiln.quantization.options`: ``QuantizeOptions``, the options of ``kiln quantize`` (torch-free).
- :mod:`kiln.quantization.quantize`: ``quantize()``, the layer-by-layer run and the output.
- :mod:`kiln.quantization.data`: calibration / evaluation text -> token samples.
- :mod:`kiln.quantization.transforms`: statistics, SmoothQuant / AWQ smoothing, one layer's tensors.
- :mod:`kiln.quantization.layerio`: read one layer merged, write a quantized checkpoint's ranks.
- :mod:`kiln.quantization.accuracy`: the accuracy gate's figures and refusal.

This package's ``__init__`` imports nothing, so torch-free readers stay torch-free.
"""
