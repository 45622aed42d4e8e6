"""Quantized projections of the torch backend (FP8 W8A8, INT8 SmoothQuant W8A8, INT8/INT4
weight-only): the packed weight layouts (:mod:`.layout`), PyTorch references
(:mod:`.triton_reference`) and GPU kernels (:mod:`.triton_kernels`)."""
